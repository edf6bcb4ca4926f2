"""Rank functions for tests/test_models.py: tiny HF configs, shared full weights, and the same
computation in any TP x PP layout or as a single-process full-vocabulary reference."""

import torch

from hf_cases import FAMILIES

CONFIGS = {name: FAMILIES[name] for name in ("qwen3", "qwen2", "llama")}


def micro_batches(count=4, batch=2, seq=12, vocab=200, scored=False, ragged=False):
    """scored: each micro-batch has a response_mask (a prompt of 3 to 5 tokens, then holes), and
    the upstream gradients are 0 off it, as a masked loss's are. ragged: widths 12, 11, 9, 12
    (odd ones: not a multiple of TP), as length-bucketed micro-batches are."""
    g = torch.Generator().manual_seed(1)
    out = []
    for index in range(count):
        width = (12, 11, 9, 12)[index % 4] if ragged else seq
        mb = {
            "tokens": torch.randint(vocab, (batch, width), generator=g),
            # d loss / d (lp, entropy): [b, s-1, 2], per position as the loss's own inputs are
            "upstream": torch.randn(2, batch, width - 1, generator=g).movedim(0, -1),
        }
        if scored:
            prompt = torch.randint(2, 5, (batch, 1), generator=g)
            holes = torch.rand(batch, width - 1, generator=g) < 0.2
            mask = (torch.arange(width - 1)[None] >= prompt) & ~holes
            mb["response_mask"] = mask
            mb["upstream"] = mb["upstream"] * mask[..., None]
        out.append(mb)
    return out


def _setup(hf, tp, pp, layer_spec="local", sequence_parallel=False):
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    parallel = ParallelConfig(
        tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sequence_parallel
    )
    layout = initialize_model_parallel(parallel, seed=0)
    arch = ModelArch.from_hf(hf)
    chunks = build_model_chunks(arch, parallel, torch.float32, layer_spec=layer_spec)
    return layout, arch, chunks


def wrap_ddp(chunks):
    """Megatron DDP around each chunk, with finalize_model_grads (DP all-reduce) wired in."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return [DistributedDataParallel(config, ddp_config, c) for c in chunks]


def full_weights(name, seed=3):
    """Random full (TP1 x PP1) weights, larger than Megatron's init so that outputs are far from
    uniform; norms around 1."""
    _, _, (model,) = _setup(CONFIGS[name], 1, 1)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=g)
        out[key] = 1.0 + 0.1 * noise if "norm" in key else 0.15 * noise
    return out


def padded(values, width=11):
    """[b, w] -> [b, width] with zeros after (ragged micro-batches, stacked)."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def reference(name, weights, temperature, scored=False, ragged=False):
    """Single process, no TP/PP: full logits, log_softmax over the real vocabulary at every
    position (scored: the log-probs and entropies off the response_mask set to 0; ragged:
    padded with zeros to one width)."""
    _, arch, (model,) = _setup(CONFIGS[name], 1, 1)
    model.load_state_dict(weights, strict=False)
    lps, ents = [], []
    for mb in micro_batches(scored=scored, ragged=ragged):
        tokens = mb["tokens"]
        b, s = tokens.shape
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
        logits = model(tokens, torch.arange(s).expand(b, s), mask)[:, :-1, : arch.vocab_size]
        logp = torch.log_softmax(logits.double() / temperature, -1)
        lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        (mb["upstream"][..., 0] * lp + mb["upstream"][..., 1] * ent).sum().backward()
        keep = mb.get("response_mask", torch.ones_like(lp, dtype=torch.bool))
        lps.append(padded(torch.where(keep, lp.detach(), 0).float()))
        ents.append(padded(torch.where(keep, ent.detach(), 0).float()))
    grads = {k: p.grad for k, p in model.named_parameters()}
    return {"logprobs": torch.stack(lps), "entropy": torch.stack(ents), "grads": grads}


def in_layout(
    name,
    weights,
    tp,
    pp,
    fused,
    temperature,
    token_loss=False,
    scored=False,
    layer_spec="local",
    sequence_parallel=False,
    ragged=False,
):
    """The same computation through the builder, sharded loading, DDP and the pipeline schedule;
    each data-parallel rank takes its share of the micro-batches (scored: with response masks;
    ragged: of several widths). Weights and gradients under local-spec names, whatever
    layer_spec built the model."""
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import load_full_state_dict, sharded_parameters
    from megatron_rpg.models.hf_mapping import spec_name

    layout, arch, chunks = _setup(CONFIGS[name], tp, pp, layer_spec, sequence_parallel)
    local_name = {spec_name(k, layer_spec): k for k in weights}
    for chunk in chunks:
        load_full_state_dict(chunk, {spec_name(k, layer_spec): v for k, v in weights.items()})
    ddp = wrap_ddp(chunks)
    mine = micro_batches(scored=scored, ragged=ragged)[layout.dp_rank :: layout.data_parallel]
    options = LogprobOptions(vocab_size=arch.vocab_size, temperature=temperature, fused=fused)

    forward = forward_backward(ddp, mine, options)

    def loss_fn(lp, ent, batch):
        return (batch["upstream"][..., 0] * lp + batch["upstream"][..., 1] * ent).sum(), {}

    def loss_fn_with_metrics(lp, ent, batch):
        return loss_fn(lp, ent, batch)[0], {"logprobs": lp, "entropy": ent}

    def token_loss_fn(batch):
        def terms(lp, ent, rows):
            u, v = batch["upstream"].reshape(-1, 2)[rows].unbind(-1)
            return u * lp + v * ent

        return terms

    if token_loss:
        trained = forward_backward(ddp, mine, options, loss_fn_with_metrics, token_loss_fn)
        for out, fwd in zip(trained, forward, strict=True):  # loss_fn saw the same log-probs
            torch.testing.assert_close(out["logprobs"], fwd["logprobs"], atol=1e-6, rtol=0)
            # fused: loss_fn ran for metrics only, on detached log-probs (gradients came in forward)
            assert out["logprobs"].requires_grad is not fused
    else:
        forward_backward(ddp, mine, options, loss_fn)
    grads = {
        local_name.get(name, name): (param.main_grad.clone(), split, gated)
        for chunk in chunks
        for name, param, split, gated in sharded_parameters(chunk)
    }
    return {
        "layout": layout,
        "logprobs": [padded(out["logprobs"]) for out in forward],
        "entropy": [padded(out["entropy"]) for out in forward],
        "grads": grads,
    }


def reference_update(name, weights):
    """Policy at TP=2 trained 2 steps; the reference must not move until update_reference()."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import ReferenceModel, build_model_chunks, load_full_state_dict

    _, arch, chunks = _setup(CONFIGS[name], 2, 1)
    for chunk in chunks:
        load_full_state_dict(chunk, weights)
    policy = wrap_ddp(chunks)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=False, fp16=False), policy
    )
    ref = ReferenceModel(
        build_model_chunks(arch, ParallelConfig(tensor_parallel=2), torch.float32), policy
    )
    snapshot = lambda ms: [p.detach().clone() for m in ms for p in m.parameters()]  # noqa: E731
    at_start = snapshot(ref.chunks)
    options = LogprobOptions(vocab_size=arch.vocab_size)
    ref_lp_before = forward_backward(ref.chunks, micro_batches(1), options)[0]["logprobs"]
    for _ in range(2):
        for m in policy:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(policy, micro_batches(1), options, lambda lp, ent, b: (-lp.sum(), {}))
        optimizer.step()
    frozen = all(torch.equal(a, b) for a, b in zip(at_start, snapshot(ref.chunks), strict=True))
    moved = not all(torch.equal(a, b) for a, b in zip(at_start, snapshot(chunks), strict=True))
    ref_lp_after = forward_backward(ref.chunks, micro_batches(1), options)[0]["logprobs"]
    policy_lp = forward_backward(policy, micro_batches(1), options)[0]["logprobs"]
    ref.update_reference(policy)
    equal = all(
        torch.equal(a, b) for a, b in zip(snapshot(chunks), snapshot(ref.chunks), strict=True)
    )
    ref_lp_updated = forward_backward(ref.chunks, micro_batches(1), options)[0]["logprobs"]
    return {
        "frozen": frozen,
        "policy_moved": moved,
        "equal_after_update": equal,
        "no_grad": all(not p.requires_grad for m in ref.chunks for p in m.parameters()),
        "ref_lp_unchanged": torch.equal(ref_lp_before, ref_lp_after),
        "ref_lp_is_policy_lp": torch.equal(ref_lp_updated, policy_lp),
        "policy_gained": (policy_lp.mean() - ref_lp_before.mean()).item(),
    }


def padded_and_bucketed(name, weights, tp, pp):
    """One loss over 8 sequences of lengths 3..16, its gradients two ways: micro-batches in row
    order padded to the batch's width, and length-bucketed (step/batch.py: length_bucketed), each
    trimmed to its longest sequence. Per parameter, max |difference| / max |padded gradient|."""
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import load_full_state_dict
    from megatron_rpg.step.batch import RolloutBatch, length_bucketed

    layout, arch, chunks = _setup(CONFIGS[name], tp, pp)
    for chunk in chunks:
        load_full_state_dict(chunk, weights)
    ddp = wrap_ddp(chunks)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([16, 5, 9, 12, 3, 16, 7, 10])
    count, width = len(lengths), int(lengths.max())
    columns = torch.arange(width)
    tokens = torch.randint(1, arch.vocab_size, (count, width), generator=g)
    tokens[columns >= lengths[:, None]] = 0  # right padding
    mask = (columns[:-1] >= 1) & (columns[:-1] < lengths[:, None] - 1)  # a 2-token prompt
    upstream = torch.randn(2, count, width - 1, generator=g) * mask  # d loss / d (lp, entropy)
    batch = RolloutBatch(
        tokens,
        mask,
        torch.zeros(count, width - 1),
        torch.zeros(count),
        torch.arange(count),
        torch.full((count,), 2),
        lengths - 2,
        torch.zeros(count, dtype=torch.bool),
    )
    options = LogprobOptions(vocab_size=arch.vocab_size)

    def loss_fn(lp, ent, micro):
        return (micro["upstream"][0] * lp + micro["upstream"][1] * ent).sum(), {}

    def gradients(micros):
        for chunk in ddp:
            chunk.zero_grad_buffer()
        forward_backward(ddp, micros, options, loss_fn)
        return [p.main_grad.clone() for chunk in ddp for p in chunk.parameters()]

    mine = torch.arange(count)[layout.dp_rank :: layout.data_parallel]
    padded = [{"tokens": tokens[rows], "upstream": upstream[:, rows]} for rows in mine.split(2)]
    bucketed = []
    for rows in length_bucketed(lengths, 2, layout.dp_rank, layout.data_parallel):
        micro = batch.rows(rows)
        micro["upstream"] = upstream[:, rows, : micro["tokens"].shape[1] - 1]
        bucketed.append(micro)
    reference, trimmed = gradients(padded), gradients(bucketed)
    return {
        "relative": max(
            float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
            for a, b in zip(reference, trimmed, strict=True)
        ),
        "largest": min(float(a.abs().max()) for a in reference),
        "widths": sorted({m["tokens"].shape[1] for m in bucketed}, reverse=True),
        "columns": (
            sum(m["tokens"].numel() for m in padded),
            sum(m["tokens"].numel() for m in bucketed),
        ),
    }


def loading_errors(name, weights):
    """Each bad input, caught: (exception type, message)."""
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import load_full_state_dict

    _, arch, (chunk,) = _setup(CONFIGS[name], 2, 1)
    cases = {
        "missing": lambda: load_full_state_dict(
            chunk, {k: v for k, v in weights.items() if "layers.1.mlp.linear_fc2" not in k}
        ),
        "shape": lambda: load_full_state_dict(
            chunk, dict(weights, **{"decoder.final_layernorm.weight": torch.ones(65)})
        ),
        "micro_batches": lambda: forward_backward(
            [chunk], [], LogprobOptions(vocab_size=arch.vocab_size)
        ),
    }
    out = {}
    for key, call in cases.items():
        try:
            call()
            out[key] = None
        except (KeyError, ValueError) as err:
            out[key] = (type(err).__name__, str(err))
    return out


def update_paths(name, weights, tp, pp, loss_name, loss_overrides, with_old):
    """The trainer's micro-batch losses (step/update.py: policy_losses) on rollout-like
    micro-batches: the gradients with the loss taken in the forward pass against the recompute
    path's, on this rank's shard: max |difference| / max |gradient| over every parameter, and
    the metrics."""
    import dataclasses

    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.losses import LossConfig
    from megatron_rpg.models import load_full_state_dict, sharded_parameters
    from megatron_rpg.step.batch import MiniBatch
    from megatron_rpg.step.update import LossSettings, policy_losses

    layout, arch, chunks = _setup(CONFIGS[name], tp, pp)
    for chunk in chunks:
        load_full_state_dict(chunk, weights)
    ddp = wrap_ddp(chunks)
    options = LogprobOptions(vocab_size=arch.vocab_size, temperature=0.7)
    mine = micro_batches()[layout.dp_rank :: layout.data_parallel]
    forward = forward_backward(ddp, mine, options)  # the last stage's log-probs
    g = torch.Generator().manual_seed(5)
    micros = []
    for i, mb in enumerate(mine):
        b, s = mb["tokens"].shape
        lp = forward[i]["logprobs"] if forward else torch.zeros(b, s - 1)
        mask = torch.zeros(b, s - 1, dtype=torch.bool)
        mask[:, 3:] = torch.rand(b, s - 4, generator=g) < 0.9
        micro = {
            "tokens": mb["tokens"],
            "response_mask": mask,
            "advantages": torch.randn(b, generator=g),
            "rollout_logprobs": lp + 0.3 * torch.randn(b, s - 1, generator=g),
        }
        if loss_overrides.get("kl_anchor") == "ref":
            micro["ref_logprobs"] = lp + 0.3 * torch.randn(b, s - 1, generator=g)
        if with_old:
            micro["old_logprobs"] = lp + 0.2 * torch.randn(b, s - 1, generator=g)
        micros.append(micro)
    loss = LossConfig(**{**dataclasses.asdict(LossConfig()), **loss_overrides})
    tokens = float(sum(m["response_mask"].sum() for m in micros))
    mini = MiniBatch(micros, num_tokens=2 * tokens, num_sequences=16.0)  # a larger step's counts

    def gradients(loss_in_forward):
        loss_fn, token_loss_fn = policy_losses(LossSettings(loss_name, loss, loss_in_forward), mini)
        for chunk in ddp:
            chunk.zero_grad_buffer()
        out = forward_backward(ddp, mini.micros, options, loss_fn, token_loss_fn)
        grads = {n: p.main_grad.clone() for c in chunks for n, p, _, _ in sharded_parameters(c)}
        metrics = [{k: float(v) for k, v in m.items()} for m in out]
        return grads, metrics, token_loss_fn is not None

    fused, fused_metrics, used = gradients(True)
    recompute, recompute_metrics, _ = gradients(False)
    error = max(
        float((fused[n] - recompute[n]).abs().max() / recompute[n].abs().max().clamp(min=1e-30))
        for n in fused
    )
    return {
        "error": error,
        "used_token_path": used,
        "metrics": (fused_metrics, recompute_metrics),
        "largest": max(float(t.abs().max()) for t in recompute.values()),
    }
