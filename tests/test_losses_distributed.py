"""Token-mean over micro-batches and data-parallel ranks uses the step's global counts: splitting
a batch over 2 gloo ranks x 2 micro-batches leaves the loss and its gradient unchanged."""

import torch

from megatron_rpg.losses import LOSSES, LossConfig, count_sequences, count_tokens, policy_loss

CASES = [
    (name, agg)
    for name in ("rpg_reinforce_urkl", "rpg_ufkl", "grpo_kl_corrected", "dapo")
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
]


def split_over_ranks_and_micro_batches(cases, use_global_counts=True):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 8, 6, 5
    f64 = dict(dtype=torch.float64)
    theta = torch.randn(batch, length, vocab, generator=g, **f64)  # the "policy" parameters
    tokens = torch.randint(vocab, (batch, length, 1), generator=g)
    gather = lambda logits: torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)  # noqa: E731
    old = gather(theta + 0.4 * torch.randn(theta.shape, generator=g, **f64))
    ref = gather(theta + 0.4 * torch.randn(theta.shape, generator=g, **f64))
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])  # ragged, one empty response
    mask = torch.arange(length)[None] < lengths[:, None]
    adv = torch.randn(batch, generator=g, **f64)

    out = []
    for name, agg in cases:
        config = LossConfig(beta=0.1 if LOSSES[name].has_kl else 0.0, agg=agg, kl_anchor="ref")
        p = theta.clone().requires_grad_()
        full, _ = policy_loss(name, gather(p), old, adv, mask, ref, config=config)
        (full_grad,) = torch.autograd.grad(full, p)

        mine = torch.arange(batch).chunk(world)[rank]
        counts = torch.stack([count_tokens(mask[mine]), count_sequences(mask[mine])]).double()
        dist.all_reduce(counts)  # what the trainer does once per step
        p = theta.clone().requires_grad_()
        lp = gather(p)
        total = torch.zeros((), **f64)
        for micro in mine.chunk(2):
            kw = dict(num_tokens=counts[0], num_sequences=counts[1]) if use_global_counts else {}
            loss, _ = policy_loss(
                name,
                lp[micro],
                old[micro],
                adv[micro],
                mask[micro],
                ref[micro],
                config=config,
                **kw,
            )
            loss.backward(retain_graph=True)
            total += loss.detach()
        dist.all_reduce(total)
        dist.all_reduce(p.grad)  # SUM over data-parallel ranks, not the average
        out.append((full.detach(), full_grad, total, p.grad))
    return out


def test_data_parallel_micro_batches_match_the_full_batch(pool2):
    per_rank = pool2.run(split_over_ranks_and_micro_batches, CASES)
    for rank_results in per_rank:
        for (name, agg), (full, full_grad, total, grad) in zip(CASES, rank_results, strict=True):
            torch.testing.assert_close(total, full, atol=1e-13, rtol=0, msg=f"{name} {agg}")
            torch.testing.assert_close(grad, full_grad, atol=1e-13, rtol=0, msg=f"{name} {agg}")
            assert full_grad.abs().max() > 1e-3


def test_local_counts_would_be_wrong(pool2):
    """Negative control: normalizing each micro-batch by its own token count is not the mean."""
    cases = [("rpg_reinforce_urkl", "token-mean")]
    ((full, _, total, _),) = pool2.run(split_over_ranks_and_micro_batches, cases, False)[0]
    assert abs((total / 4 - full).item()) > 1e-3
