"""Aggregation, advantage estimators, input validation and robustness of the loss library."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_rpg.losses import (
    LOSSES,
    LossConfig,
    aggregate,
    compute_advantages,
    count_sequences,
    count_tokens,
    policy_loss,
    separable_policy_loss,
    token_weights,
)
from megatron_rpg.losses.rpg import kl_inside_clip

pytestmark = pytest.mark.usefixtures("float64_by_default")


# ----------------------------------------------------------------------------- aggregation

LOSS_MATRIX = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),  # the empty sequence is not counted
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ],
)
def test_aggregation_modes_by_hand(mode, expected):
    assert aggregate(LOSS_MATRIX, MASK, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_micro_batch_sums_with_global_counts_equal_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    losses = torch.randn(8, 5, generator=g)
    mask = torch.rand(8, 5, generator=g) > 0.3
    full = aggregate(losses, mask, mode)
    n_tok, n_seq = count_tokens(mask), count_sequences(mask)
    parts = [
        aggregate(losses[i : i + 2], mask[i : i + 2], mode, n_tok, n_seq) for i in (0, 2, 4, 6)
    ]
    torch.testing.assert_close(sum(parts), full, atol=1e-14, rtol=0)
    if mode == "token-mean":  # a mean of micro-batch token means is not the token mean
        local = [aggregate(losses[i : i + 2], mask[i : i + 2], mode) for i in (0, 2, 4, 6)]
        assert abs(torch.stack(local).mean().item() - full.item()) > 1e-3


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_token_weights_reproduce_the_aggregation(mode):
    weighted = (token_weights(MASK, mode, 7.0, 3.0, torch.float64) * LOSS_MATRIX).sum()
    assert weighted.item() == pytest.approx(aggregate(LOSS_MATRIX, MASK, mode, 7.0, 3.0).item())
    assert (token_weights(MASK, mode) * LOSS_MATRIX).sum().item() == pytest.approx(
        aggregate(LOSS_MATRIX, MASK, mode).item()
    )


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, metrics = policy_loss(
        "rpg_reinforce_urkl",
        lp,
        lp.detach() - 0.3,
        torch.ones(2),
        torch.zeros(2, 3, dtype=torch.bool),
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics["tokens"].item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))


# ----------------------------------------------------------------------------- advantages


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    mean_adv = compute_advantages("group_mean", rewards, groups)
    torch.testing.assert_close(mean_adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    std = torch.tensor([1.0, 0.0, 0.0]).std()  # unbiased, as GRPO
    grpo_adv = compute_advantages("group_mean_std", rewards, groups)
    torch.testing.assert_close(grpo_adv[:3], mean_adv[:3] / (std + 1e-6))
    assert torch.equal(grpo_adv[3:], torch.zeros(3))  # all-equal rewards: zero, finite
    torch.testing.assert_close(compute_advantages("batch_mean", rewards), rewards - 4 / 6)


def test_reinforce_pp_baseline_whitens_group_advantages_over_tokens():
    """group_mean_whitened against verl's recipe written out: the group-mean advantage broadcast
    to every response token, then whitened over all valid tokens of the batch."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    mask = torch.arange(5)[None] < torch.tensor([1, 5, 3, 2, 4, 2])[:, None]
    got = compute_advantages("group_mean_whitened", rewards, groups, response_mask=mask)
    tokens = compute_advantages("group_mean", rewards, groups)[:, None].expand(-1, 5)[mask]
    mean, std = tokens.mean(), tokens.std(unbiased=True)  # verl's masked_whiten: unbiased
    want = (compute_advantages("group_mean", rewards, groups) - mean) / (std**2 + 1e-8).sqrt()
    torch.testing.assert_close(got, want)
    whitened_tokens = got[:, None].expand(-1, 5)[mask]
    assert abs(whitened_tokens.mean()) < 1e-6 and abs(whitened_tokens.std() - 1) < 1e-5
    with pytest.raises(ValueError, match="needs group_ids and response_mask"):
        compute_advantages("group_mean_whitened", rewards, groups)


def test_group_advantages_need_two_responses_per_prompt():
    with pytest.raises(ValueError, match=r"rollout.n >= 2"):
        compute_advantages("group_mean", torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, -2.0]])
    beta = 0.1
    # token rewards: -beta*(old - ref), plus R at the last valid token; returns = suffix sums
    r0 = [-0.05, 0.0 + 1.0]  # sequence 0: two valid tokens, reward 1
    r1 = [0.05, 0.0, -0.1 + 0.0]  # sequence 1: three valid tokens, reward 0
    flat = torch.tensor([r0[0] + r0[1], r0[1], sum(r1), r1[1] + r1[2], r1[2]])
    whitened = (flat - flat.mean()) / (flat.var(unbiased=True) + 1e-8).sqrt()
    got = compute_advantages(
        "reinforce_pp", rewards, response_mask=mask, old_logprobs=old, ref_logprobs=ref, beta=beta
    )
    torch.testing.assert_close(got[mask], whitened)
    assert torch.equal(got[~mask], torch.zeros(1))


# ----------------------------------------------------------------------------- validation


def _inputs(batch=2, length=3):
    lp = torch.full((batch, length), -1.0)
    return lp, lp - 0.1, torch.ones(batch), torch.ones(batch, length, dtype=torch.bool)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "rpg_nope"}, r"unknown loss 'rpg_nope'.*rpg_urkl"),
        (
            {"old_logprobs": torch.zeros(2, 4)},
            r"old_logprobs has shape \(2, 4\); logprobs has \(2, 3\)",
        ),
        ({"advantages": torch.zeros(3)}, r"advantages must be \[batch\]"),
        (
            {"config": LossConfig(clip="truncate")},
            r"'rpg_urkl' does not support loss.clip='truncate'",
        ),
        ({"name": "dapo"}, r"'dapo' has no KL term in the loss; set loss.beta=0"),
        (
            {"config": LossConfig(kl_anchor="ref")},
            r"kl_anchor='ref' with loss 'rpg_urkl' needs ref_logprobs",
        ),
        ({"ref_logprobs": torch.zeros(2, 3)}, r"kl_anchor='old' uses old_logprobs"),
        ({"config": LossConfig(rollout_is="token")}, r"rollout_is='token' needs rollout_logprobs"),
        ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, r"logprobs must be a floating"),
    ],
)
def test_invalid_inputs_name_the_problem(kwargs, message):
    lp, old, adv, mask = _inputs()
    args = {
        "name": "rpg_urkl",
        "logprobs": lp,
        "old_logprobs": old,
        "advantages": adv,
        "response_mask": mask,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        policy_loss(**args)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("clip", "soft", r"'clip': got 'soft'; allowed: one of \['none', 'dual', 'truncate'\]"),
        ("dual_clip_c", 1.0, r"'dual_clip_c': got 1.0; allowed: > 1"),
        ("eps_low", 1.0, r"'eps_low': got 1.0; allowed: in \[0, 1\)"),
        ("beta", -1.0, r"'beta': got -1.0"),
        ("agg", "sum", r"'agg': got 'sum'"),
    ],
)
def test_loss_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**{field: value})


# ----------------------------------------------------------------------------- properties

VALID_CLIPS = [(name, clip) for name, spec in sorted(LOSSES.items()) for clip in spec.clip_modes]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    length=st.integers(1, 6),
    agg=st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]),
    anchor=st.sampled_from(["old", "ref"]),
    rollout_is=st.sampled_from(["none", "token", "sequence"]),
    equal_rewards=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@pytest.mark.parametrize(("name", "clip"), VALID_CLIPS)
def test_extreme_inputs_give_finite_loss_and_gradient(
    name, clip, data, batch, length, agg, anchor, rollout_is, equal_rewards, dtype
):
    """Log-probs anywhere in [-50, 0] (gaps up to +-50), any mask (empty too), equal rewards."""
    shape = (batch, length)
    logprob = st.floats(-50.0, 0.0, allow_nan=False)

    def tensor(elements):
        values = data.draw(st.lists(elements, min_size=batch * length, max_size=batch * length))
        return torch.tensor(values, dtype=dtype).reshape(shape)

    lp = tensor(logprob).requires_grad_()
    old, ref, rollout = tensor(logprob), tensor(logprob), tensor(logprob)
    mask = tensor(st.booleans()).bool()
    rewards = torch.full((batch,), 0.5) if equal_rewards else tensor(st.floats(-1, 1))[:, 0]
    adv = rewards - rewards.mean()
    config = LossConfig(
        beta=0.1 if LOSSES[name].has_kl else 0.0,
        clip=clip,
        agg=agg,
        kl_anchor=anchor,
        rollout_is=rollout_is,
    )
    loss, metrics = policy_loss(
        name,
        lp,
        old,
        adv.to(dtype),
        mask,
        ref_logprobs=ref if anchor == "ref" else None,
        rollout_logprobs=rollout,
        config=config,
    )
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("gap", [-90.0, -103.5, -110.0, -300.0])  # w = exp(gap): 0 below ~-103
@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize(("name", "clip"), VALID_CLIPS)
def test_every_surrogate_is_finite_where_the_ratio_underflows(name, clip, anchor, gap):
    """fp32 log-probs with lp - lp_old = gap: C_KL / w was 0 / 0 there and the mini-batch was
    skipped as non-finite; the quotient is now taken in log space."""
    lp = torch.tensor([[-0.5, -2.0, -40.0]], dtype=torch.float32).requires_grad_()
    old = lp.detach() - gap
    config = LossConfig(beta=0.1 if LOSSES[name].has_kl else 0.0, clip=clip, kl_anchor=anchor)
    loss, _ = policy_loss(
        name,
        lp,
        old,
        torch.full((1,), 0.7, dtype=lp.dtype),
        torch.ones_like(lp, dtype=torch.bool),
        ref_logprobs=lp.detach() - 1.0 if anchor == "ref" else None,
        config=config,
    )
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(lp.grad).all(), (loss, lp.grad)


# ----------------------------------------------------------------------------- token path


@pytest.mark.parametrize("on_policy", [False, True], ids=["old", "on_policy"])
@pytest.mark.parametrize("rollout_is", ["none", "token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize(("name", "clip"), VALID_CLIPS)
def test_separable_form_sums_to_the_loss_chunk_by_chunk(name, clip, agg, rollout_is, on_policy):
    """The fused path's per-token terms, computed a few flattened tokens at a time (chunks that
    cut through sequences), sum to policy_loss in value and gradient; ratios away from 1 so that
    clips are active, a reference anchor, counts of a larger step."""
    check_separable(name, clip, agg, rollout_is, on_policy, on_kl=True)


VERL_PLACEMENT = [(n, c) for n, c in VALID_CLIPS if LOSSES[n].has_kl and not kl_inside_clip(n, c)]


@pytest.mark.parametrize("rollout_is", ["token", "sequence"])
@pytest.mark.parametrize(("name", "clip"), VERL_PLACEMENT)
def test_separable_form_with_the_weight_off_the_kl(name, clip, rollout_is):
    """loss.rollout_is_on_kl=false (verl's placement): the token path still sums to the loss."""
    check_separable(name, clip, "token-mean", rollout_is, on_policy=False, on_kl=False)


def check_separable(name, clip, agg, rollout_is, on_policy, on_kl):
    if on_policy and rollout_is == "sequence":
        with pytest.raises(ValueError, match="rollout_is='sequence'"):
            separable_policy_loss(
                name,
                None,
                torch.zeros(3),
                torch.ones(3, 5, dtype=torch.bool),
                rollout_logprobs=torch.zeros(3, 5),
                config=LossConfig(rollout_is="sequence"),
            )
        return
    generator = torch.Generator().manual_seed(7)
    shape = (3, 5)
    lp = (-torch.rand(shape, generator=generator) * 3).requires_grad_()
    old = None if on_policy else lp.detach() + torch.randn(shape, generator=generator) * 0.5
    ref = lp.detach() + torch.randn(shape, generator=generator) * 0.3
    rollout = lp.detach() + torch.randn(shape, generator=generator) * 0.4
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.1, 0.3])
    config = LossConfig(
        beta=0.2 if LOSSES[name].has_kl else 0.0,
        clip=clip,
        agg=agg,
        kl_anchor="ref",
        rollout_is=rollout_is,
        rollout_is_on_kl=on_kl,
        eps_low=0.1,
        eps_high=0.1,
        dual_clip_c=1.5,
    )
    counts = {"num_tokens": 11.0, "num_sequences": 4.0}
    args = (adv, mask, ref, None if rollout_is == "none" else rollout, config)
    whole, _ = policy_loss(name, lp, lp.detach() if on_policy else old, *args, **counts)
    (want,) = torch.autograd.grad(whole, lp)
    terms = separable_policy_loss(name, old, *args, **counts)
    flat = lp.reshape(-1)
    parts = [terms(flat[rows], rows) for rows in (slice(0, 4), slice(4, 11), slice(11, 15))]
    total = torch.cat(parts).sum()
    (got,) = torch.autograd.grad(total, lp)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert want.abs().max() > 0
