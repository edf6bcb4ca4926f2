"""Vocab-parallel log-probs and entropy against full-vocabulary math.

Tolerances: float64 inputs, so the sharded online log-sum-exp must equal torch.log_softmax to
~1e-12 (a handful of ulps on values of order 1-10); bf16 inputs are compared to the fp32 reference
at bf16's resolution of the logits (2^-8 relative).
"""

import pytest
import torch

from megatron_rpg.logprobs import (
    fused_logprobs,
    fused_logprobs_loss,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)

TOKENS, VOCAB, HIDDEN = 45, 48, 12  # VOCAB divisible by 1, 2, 4


def problem(dtype=torch.float64, real_vocab=VOCAB):
    """Rows of `weight` past real_vocab are vocabulary padding (random, to be ignored)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, TOKENS // 3, HIDDEN, generator=g, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype) * 0.7
    targets = torch.randint(real_vocab, (3, TOKENS // 3), generator=g)
    upstream = torch.randn(2, 3, TOKENS // 3, generator=g, dtype=torch.float64)
    return hidden, weight, targets, upstream


def reference(hidden, weight, targets, upstream, temperature, real_vocab=VOCAB):
    """Real vocabulary only: log_softmax + gather, entropy, and the grads of
    sum(u0*lp + u1*entropy); padding rows and columns get zero gradient."""
    hidden = hidden.double().requires_grad_()
    weight = weight.double()[:real_vocab].requires_grad_()
    logits = (hidden @ weight.t()).detach().requires_grad_()

    def outputs(logits):
        logp = torch.log_softmax(logits / temperature, -1)
        return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    lp, ent = outputs(logits)
    (grad_logits,) = torch.autograd.grad((upstream[0] * lp + upstream[1] * ent).sum(), logits)
    lp2, ent2 = outputs(hidden @ weight.t())
    grad_h, grad_w = torch.autograd.grad(
        (upstream[0] * lp2 + upstream[1] * ent2).sum(), (hidden, weight)
    )
    padding = VOCAB - real_vocab
    grad_logits = torch.cat(
        [grad_logits, grad_logits.new_zeros(*grad_logits.shape[:-1], padding)], -1
    )
    grad_w = torch.cat([grad_w, grad_w.new_zeros(padding, grad_w.shape[1])])
    return lp.detach(), ent.detach(), grad_logits, grad_h, grad_w


def sharded(temperature, chunk_size, dtype=torch.float64, real_vocab=VOCAB):
    """On each TP rank: its vocabulary shard through both paths; returns this rank's results."""
    import torch.distributed as dist

    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    hidden, weight, targets, upstream = problem(dtype, real_vocab)
    real = dict(vocab_size=real_vocab)
    shard = weight.chunk(world)[rank]
    logits = (hidden @ shard.t()).detach().requires_grad_()
    logits_before = logits.detach().clone()
    lp, ent = vocab_parallel_logprobs_and_entropy(
        logits, targets, temperature, group, chunk_size, **real
    )
    (grad_logits,) = torch.autograd.grad((upstream[0] * lp + upstream[1] * ent).sum(), logits)
    lp_only = vocab_parallel_logprobs(logits, targets, temperature, group, chunk_size, **real)
    ent_only = vocab_parallel_entropy(logits, temperature, group, chunk_size, **real)

    h = hidden.clone().requires_grad_()
    w = shard.clone().requires_grad_()
    f_lp, f_ent = fused_logprobs(h, w, targets, temperature, group, chunk_size, **real)
    grad_h, grad_w = torch.autograd.grad((upstream[0] * f_lp + upstream[1] * f_ent).sum(), (h, w))

    u, v = upstream[0].reshape(-1), upstream[1].reshape(-1)
    loss, l_lp, l_ent = fused_logprobs_loss(
        h,
        w,
        targets,
        lambda lp, ent, rows: u[rows] * lp + v[rows] * ent,
        temperature,
        group,
        chunk_size,
        **real,
    )
    l_grad_h, l_grad_w = torch.autograd.grad(loss, (h, w))
    return {
        "lp": lp.detach(),
        "ent": ent.detach(),
        "lp_only": lp_only.detach(),
        "ent_only": ent_only.detach(),
        "grad_logits": grad_logits,
        "unchanged": torch.equal(logits.detach(), logits_before),
        "f_lp": f_lp.detach(),
        "f_ent": f_ent.detach(),
        "grad_h": grad_h,
        "grad_w": grad_w,
        "l_lp": l_lp,
        "l_ent": l_ent,
        "l_grad_h": l_grad_h,
        "l_grad_w": l_grad_w,
        "loss": loss.detach(),
        "f_loss": (u * f_lp.reshape(-1) + v * f_ent.reshape(-1)).sum(),
    }


def check_against_reference(results, temperature, atol, real_vocab=VOCAB):
    want_lp, want_ent, want_grad_logits, want_grad_h, want_grad_w = reference(
        *problem(real_vocab=real_vocab), temperature, real_vocab
    )
    close = lambda a, b: torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol)  # noqa: E731
    for r in results:
        for key in ("lp", "lp_only", "f_lp", "l_lp"):
            close(r[key], want_lp)
        for key in ("ent", "ent_only", "f_ent", "l_ent"):
            close(r[key], want_ent)
        close(r["loss"], r["f_loss"].detach().double())
        for key in ("grad_h", "l_grad_h"):  # hidden is replicated: every rank has the full grad
            close(r[key], want_grad_h)
        assert r["unchanged"]
    close(torch.cat([r["grad_logits"] for r in results], -1), want_grad_logits)
    close(torch.cat([r["grad_w"] for r in results], 0), want_grad_w)
    close(torch.cat([r["l_grad_w"] for r in results], 0), want_grad_w)


@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, 1024), (0.6, 7), (1.3, 1)])
def test_tp2_equals_full_vocabulary(pool2, temperature, chunk_size):
    check_against_reference(pool2.run(sharded, temperature, chunk_size), temperature, 1e-12)


def test_tp4_equals_full_vocabulary(pool4):
    check_against_reference(pool4.run(sharded, 0.8, 5), 0.8, 1e-12)


@pytest.mark.parametrize("real_vocab", [45, 30])  # 30: TP rank 3's shard is all padding
def test_padded_vocabulary_entries_are_excluded(pool4, real_vocab):
    results = pool4.run(sharded, 0.9, 8, torch.float64, real_vocab)
    check_against_reference(results, 0.9, 1e-12, real_vocab)


def omitted_group_under_megatron_tp2(temperature):
    """Megatron's TP2 initialized, the group omitted: the logits are still read as a shard."""
    import torch.distributed as dist

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(tensor_parallel=2), seed=0)
    hidden, weight, targets, _ = problem()
    shard = weight.chunk(2)[dist.get_rank()]
    return vocab_parallel_logprobs(hidden @ shard.t(), targets, temperature)


def test_an_omitted_group_is_megatrons_tp_group_when_initialized(pool2):
    want_lp = reference(*problem(), 0.9)[0]
    for lp in pool2.run(omitted_group_under_megatron_tp2, 0.9):  # was off by up to 13 nats
        torch.testing.assert_close(lp, want_lp, atol=1e-12, rtol=0)


def test_single_process_without_group_equals_full_vocabulary():
    hidden, weight, targets, upstream = problem()
    logits = (hidden @ weight.t()).requires_grad_()
    lp, ent = vocab_parallel_logprobs_and_entropy(logits, targets, 0.9, chunk_size=4)
    want_lp, want_ent, want_grad, _, _ = reference(hidden, weight, targets, upstream, 0.9)
    torch.testing.assert_close(lp, want_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad((upstream[0] * lp + upstream[1] * ent).sum(), logits)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=0)


def test_bf16_inputs_compute_in_fp32(pool2):
    results = pool2.run(sharded, 1.0, 16, torch.bfloat16)
    want_lp, want_ent, *_ = reference(*problem(torch.bfloat16), 1.0)
    for r in results:
        assert r["lp"].dtype == torch.float32 and r["f_lp"].dtype == torch.float32
        # logits are rounded to bf16 (rel. 2^-8 of |logit| <= ~10): ~0.05 absolute at worst
        torch.testing.assert_close(r["lp"].double(), want_lp, atol=0.05, rtol=0)
        torch.testing.assert_close(r["f_lp"].double(), want_lp, atol=0.05, rtol=0)
        torch.testing.assert_close(r["f_ent"].double(), want_ent, atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: vocab_parallel_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4).long()),
            r"targets \(2, 4\) must match the leading dims of \(2, 3, 5\)",
        ),
        (
            lambda: vocab_parallel_logprobs(torch.zeros(2, 5), torch.zeros(2)),
            r"targets must be integer token ids",
        ),
        (
            lambda: vocab_parallel_entropy(torch.zeros(2, 5), temperature=0.0),
            r"temperature must be > 0",
        ),
        (
            lambda: fused_logprobs(torch.zeros(2, 4), torch.zeros(5, 3), torch.zeros(2).long()),
            r"hidden \[..., 4\] does not match output weight \(5, 3\)",
        ),
    ],
)
def test_bad_shapes_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
