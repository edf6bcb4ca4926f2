"""Rank functions for tests/test_rollout.py and tests/test_vllm.py: a policy at TP x PP takes an
optimizer step and syncs into a rollout engine (embedded on rank 0, vLLM colocated in every
rank, or a vLLM server)."""

import torch
import torch.distributed as dist

from hf_cases import FAMILIES, load_in_layout
from model_cases import wrap_ddp

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38], [1, 2, 3, 4, 5]]


def embedded_engine(hf_config):
    from megatron_rpg.rollout import EmbeddedEngine

    return EmbeddedEngine(hf_config) if dist.get_rank() == 0 else None


def colocated_engine(hf_config, model_dir, tensor_parallel):
    """The engine; the trainer sharing its process keeps its torch threads (vLLM's CPU worker
    sets one for serving)."""
    import torch

    from megatron_rpg.rollout.vllm_engine import VLLMEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # more than one, whatever this rank's share of the cores
    engine = VLLMEngine(model_dir, tensor_parallel, dtype="float32", kv_cache_gb=0.25)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    return engine


def server_engine(hf_config, url, full_sync_every=1):
    from megatron_rpg.rollout.vllm_engine import VLLMServerEngine

    return VLLMServerEngine(
        url, hf_config, "mrpg_gloo", timeout_s=120, full_sync_every=full_sync_every
    )


def _trainer_logprobs(chunks, arch, tokens):
    """Next-token log-probs [b, s-1] on the last stage's ranks, None elsewhere."""
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward

    out = forward_backward(chunks, [{"tokens": tokens}], LogprobOptions(arch.vocab_size))
    return out[0]["logprobs"] if out else None


def _rollout(engine, params):
    """Every rank gets the tokens [b, prompt + response] and the engine's log-probs: a
    collective engine generates on every rank, the others on rank 0, which broadcasts."""
    if engine is not None and engine.collective:
        groups = engine.generate(PROMPTS, params)
    else:
        payload = [engine.generate(PROMPTS, params) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        groups = payload[0]
    rows = [(p, r) for p, group in zip(PROMPTS, groups, strict=True) for r in group]
    return (
        torch.tensor([p + r.token_ids for p, r in rows]),
        torch.tensor([r.logprobs for _, r in rows]),
    )


def sync_after_step(name, hf_state, tp, pp, make_engine=embedded_engine, families=FAMILIES):
    """Initial weights synced; one Adam step; engine log-probs vs the trainer's before and after
    the second sync. Returns the bytes this rank handed over in both syncs and, on the last
    stage (None elsewhere), the max |difference| before and after and every prompt's
    responses."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.rollout import SamplingParams, sync_weights

    arch, chunks = load_in_layout(name, hf_state, tp, pp, families)
    engine = make_engine(families[name])
    try:
        first = sync_weights(chunks, arch, engine)
        params = SamplingParams(n=2, max_tokens=6, seed=7)
        policy = wrap_ddp(chunks)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, bf16=False, fp16=False), policy
        )
        tokens, _ = _rollout(engine, params)
        for m in policy:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        options = LogprobOptions(vocab_size=arch.vocab_size)
        forward_backward(policy, [{"tokens": tokens}], options, lambda lp, ent, b: (-lp.sum(), {}))
        optimizer.step()

        response = slice(len(PROMPTS[0]) - 1, None)  # log-probs of the response tokens
        tokens, stale = _rollout(engine, params)
        trainer = _trainer_logprobs(policy, arch, tokens)
        second = sync_weights(chunks, arch, engine)
        tokens, fresh = _rollout(engine, params)
        trainer_fresh = _trainer_logprobs(policy, arch, tokens)
    finally:
        if engine is not None:
            engine.close()
    result = {"bytes": (first.bytes, second.bytes), "before": None}
    if trainer is not None:
        result["before"] = (trainer[:, response] - stale).abs().max().item()
        result["after"] = (trainer_fresh[:, response] - fresh).abs().max().item()
        result["responses"] = tokens[:, len(PROMPTS[0]) :].tolist()
    return result


def delta_syncs(name, hf_state, tp, pp, make_engine, families):
    """A served engine with full_sync_every=3. Sync 1 is full; after an update that moves every
    10th element of every weight (as a small step in bf16 leaves most elements' bits alone),
    sync 2 is a delta. Then rank 0 changes one weight the prompts use and records it as sent
    (the engine misses it): sync 3's checksums disagree and everything is sent again. Syncs 4
    and 5 are deltas of nothing, 6 is full. Returns each rank's (kind, bytes) history and, on
    the last stage, the max |engine - trainer| log-prob difference after syncs 2 and 3."""
    from megatron_rpg.rollout import SamplingParams, sync_weights

    arch, chunks = load_in_layout(name, hf_state, tp, pp, families)
    engine = make_engine(families[name])
    params = SamplingParams(n=2, max_tokens=6, seed=7)
    response = slice(len(PROMPTS[0]) - 1, None)

    def difference():
        tokens, engine_logprobs = _rollout(engine, params)
        trainer = _trainer_logprobs(chunks, arch, tokens)
        return None if trainer is None else (trainer[:, response] - engine_logprobs).abs().max()

    try:
        sync_weights(chunks, arch, engine)
        from megatron.core import parallel_state

        # one seed per stage: a weight replicated over the TP ranks stays the same on each
        generator = torch.Generator().manual_seed(parallel_state.get_pipeline_model_parallel_rank())
        with torch.no_grad():
            for chunk in chunks:
                for weight in chunk.parameters():
                    every_tenth = weight.view(-1)[::10]
                    every_tenth += 0.05 * torch.randn(every_tenth.shape, generator=generator)
        sync_weights(chunks, arch, engine)
        after_delta = difference()
        if dist.get_rank() == 0:  # stage 0, TP rank 0: its first bucket starts with the embedding
            transfer = engine._transfer
            first = transfer.source.stream.export_buckets[0].tensors[0]
            assert first.name == "model.embed_tokens.weight"
            embedding = chunks[0].embedding.word_embeddings.weight
            token, hidden = PROMPTS[0][0], embedding.shape[1]
            with torch.no_grad():
                embedding[token, 0] += 0.5
            transfer.engine.sent[0][token * hidden] = embedding[token, 0].item()
        sync_weights(chunks, arch, engine)
        after_resync = difference()
        for _ in range(3):
            sync_weights(chunks, arch, engine)
        history = engine.sync_history
    finally:
        engine.close()
    return {"history": history, "after_delta": after_delta, "after_resync": after_resync}
