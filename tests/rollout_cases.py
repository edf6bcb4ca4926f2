"""Rank functions for tests/test_rollout.py: a policy at TP x PP takes an optimizer step and
syncs into the embedded engine held by rank 0."""

import torch
import torch.distributed as dist

from hf_cases import FAMILIES, load_in_layout
from model_cases import wrap_ddp

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]]


def _trainer_logprobs(chunks, arch, tokens):
    """Next-token log-probs [b, s-1] on the last stage's ranks, None elsewhere."""
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward

    out = forward_backward(chunks, [{"tokens": tokens}], LogprobOptions(arch.vocab_size))
    return out[0]["logprobs"] if out else None


def _rollout(engine, params):
    """Rank 0 samples; every rank gets the tokens [b, prompt + response] and rank 0's log-probs."""
    payload = [None]
    if dist.get_rank() == 0:
        groups = engine.generate(PROMPTS, params)
        rows = [(p, r) for p, group in zip(PROMPTS, groups, strict=True) for r in group]
        tokens = torch.tensor([p + r.token_ids for p, r in rows])
        payload = [(tokens, torch.tensor([r.logprobs for _, r in rows]))]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def sync_after_step(name, hf_state, tp, pp):
    """Initial weights synced; one Adam step; engine log-probs vs the trainer's before and after
    the second sync. Returns, per rank, (before, after) max |difference| on the last stage."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.rollout import EmbeddedEngine, SamplingParams, sync_weights

    arch, chunks = load_in_layout(name, hf_state, tp, pp)
    engine = EmbeddedEngine(FAMILIES[name]) if dist.get_rank() == 0 else None
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
    if trainer is None:
        return None
    return {
        "before": (trainer[:, response] - stale).abs().max().item(),
        "after": (trainer_fresh[:, response] - fresh).abs().max().item(),
        "bytes": (first.bytes, second.bytes),
    }
