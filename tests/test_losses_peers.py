"""Where docs/rpg_math.md says we compute as the authors' release (complex-reasoning/RPG,
verl/trainer/ppo/core_algos.py) or as verl (verl/trainer/ppo/core_algos.py and
verl/utils/torch_functional.py), a direct transcription of their formula on the same tensors,
float64, to 1e-9 relative, values and gradients. The transcriptions are written out here from
their code (not imported: neither is a dependency)."""

import pytest
import torch

from megatron_rpg.losses import LossConfig, token_policy_loss
from megatron_rpg.losses.advantages import compute_advantages, whiten

pytestmark = pytest.mark.usefixtures("float64_by_default")


def authors_kl_penalty(logprob, ref_logprob, kind):
    """The authors' kl_penalty for the fully differentiable RPG losses and low_var_kl."""
    log_ratio = logprob - ref_logprob
    w = torch.exp(log_ratio)
    if kind == "fkl":  # 'rpg_fkl': not clamped
        return -logprob + ref_logprob
    if kind == "rkl":
        return torch.clamp(w * log_ratio, min=-10, max=10)
    if kind == "ufkl":
        return torch.clamp(w - log_ratio - 1, min=-10, max=10)
    if kind == "urkl":
        return torch.clamp(w * (log_ratio - 1) + 1, min=-10, max=10)
    raise ValueError(kind)


def verl_low_var_kl(logprob, ref_logprob):
    """verl's kl_penalty 'low_var_kl' (k3): both clamps."""
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    ratio = torch.exp(kl)
    return torch.clamp(ratio - kl - 1, min=-10, max=10)


def verl_masked_whiten(values, mask):
    """verl.utils.torch_functional.masked_whiten (shift_mean=True) with masked_var unbiased."""
    mean = (values * mask).sum() / mask.sum()
    variance = ((values - mean) ** 2 * mask).sum() / mask.sum()
    variance = variance * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def tensors(seed=0, spread=3.0):
    """Log-ratios wide enough that the [-10, 10] clamps are active on some tokens."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 9, generator=g) * 4 - 0.1
    lp = (old + spread * torch.randn(6, 9, generator=g)).clamp(max=-1e-3).requires_grad_()
    advantages = torch.randn(6, generator=g)
    mask = torch.rand(6, 9, generator=g) < 0.8
    mask[:, 0] = True
    return lp, old, advantages, mask


def rel_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["ufkl", "urkl", "rkl", "fkl"])
def test_kl_estimate_clamp_is_the_authors_kl_loss(divergence):
    """rpg_<div> with loss.kl_estimate_clamp=10, clip none, anchor pi_old: -w*A + beta *
    the authors' clamped kl_penalty(lp, lp_old), token by token, and its gradient (zero where
    the clamp is active)."""
    lp, old, adv, mask = tensors()
    beta = 0.3
    config = LossConfig(beta=beta, clip="none", kl_estimate_clamp=10.0)
    ours, _ = token_policy_loss(f"rpg_{divergence}", lp, old, adv, mask, config=config)
    w = torch.exp(lp - old)
    theirs = (-w * adv[:, None] + beta * authors_kl_penalty(lp, old, divergence)) * mask
    rel_close(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours.sum(), lp)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), lp)
    rel_close(grad_ours, grad_theirs)
    if divergence != "fkl":  # the clamp is active somewhere: without it the numbers differ
        unclamped, _ = token_policy_loss(
            f"rpg_{divergence}", lp, old, adv, mask, config=LossConfig(beta=beta, clip="none")
        )
        assert (unclamped - theirs).abs().max() > 1.0


@pytest.mark.parametrize("divergence", ["urkl", "rkl"])
def test_the_clamp_zeroes_the_folded_kl_gradient_where_active(divergence):
    """With RPG-Style Clip the KL of urkl/rkl is folded into A_hat: where the estimate is clamped
    its share of A_hat is 0, so the loss is the dual clip on A alone there."""
    lp, old, adv, mask = tensors(seed=1)
    config = LossConfig(beta=0.3, clip="dual", kl_estimate_clamp=10.0)
    clamped, _ = token_policy_loss(f"rpg_{divergence}", lp, old, adv, mask, config=config)
    no_kl, _ = token_policy_loss(
        f"rpg_{divergence}", lp, old, adv, mask, config=LossConfig(beta=0.0, clip="dual")
    )
    log_w = (lp - old).detach()
    w = log_w.exp()
    estimate = w * log_w - w + 1 if divergence == "urkl" else w * log_w
    active = (estimate.abs() > 10) & mask
    assert active.any() and (~active & mask).any()
    rel_close(clamped[active], no_kl[active])
    assert (clamped[~active & mask] - no_kl[~active & mask]).abs().max() > 1e-6


def test_grpo_k3_is_verls_low_var_kl():
    lp, _, adv, mask = tensors(seed=2, spread=8.0)
    ref = lp.detach() + 12 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
    old = lp.detach()  # w = 1: the loss is -A + beta*k3
    beta = 0.2
    config = LossConfig(beta=beta, clip="none", kl_anchor="ref")
    ours, _ = token_policy_loss("grpo", lp, old, adv, mask, ref, config=config)
    theirs = (-torch.exp(lp - old) * adv[:, None] + beta * verl_low_var_kl(lp, ref)) * mask
    rel_close(ours, theirs)
    rel_close(*(torch.autograd.grad(x.sum(), lp)[0] for x in (ours, theirs)))
    assert (verl_low_var_kl(lp, ref) == 10).any()  # the outer clamp is exercised


def test_whitening_is_verls_masked_whiten():
    g = torch.Generator().manual_seed(4)
    values, mask = torch.randn(5, 7, generator=g) * 3 + 1, torch.rand(5, 7, generator=g) < 0.7
    rel_close(whiten(values, mask), verl_masked_whiten(values, mask.double()) * mask)


def test_reinforce_pp_and_baseline_advantages_whiten_as_verl():
    g = torch.Generator().manual_seed(5)
    rewards = torch.randint(0, 2, (6,), generator=g).double()
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.arange(6)[None] < torch.tensor([1, 6, 3, 2, 4, 5])[:, None]
    old, ref = -torch.rand(6, 6, generator=g), -torch.rand(6, 6, generator=g)
    got = compute_advantages(
        "reinforce_pp", rewards, response_mask=mask, old_logprobs=old, ref_logprobs=ref, beta=0.1
    )
    # verl's REINFORCE++: token rewards, discounted (gamma 1) returns, masked_whiten, * mask
    token_rewards = -0.1 * (old - ref) * mask
    last = mask.sum(-1) - 1
    token_rewards[torch.arange(6), last] += rewards
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(6)
    for t in reversed(range(6)):
        running = token_rewards[:, t] + running
        returns[:, t] = running
        running = running * mask[:, t]
    rel_close(got, verl_masked_whiten(returns, mask.double()) * mask)
    baseline = compute_advantages("group_mean_whitened", rewards, groups, response_mask=mask)
    centred = compute_advantages("group_mean", rewards, groups)[:, None].expand(-1, 6)
    rel_close(
        baseline[:, None].expand(-1, 6)[mask], verl_masked_whiten(centred, mask.double())[mask]
    )


def test_verls_placement_of_the_rollout_weight():
    """loss.rollout_is_on_kl=false: the rollout weight on the policy-gradient part alone, the KL
    added unweighted, as verl adds its KL loss to its (weighted) policy loss."""
    lp, old, adv, mask = tensors(seed=6, spread=0.5)
    g = torch.Generator().manual_seed(7)
    ref = lp.detach() + 0.5 * torch.randn(lp.shape, generator=g)
    rollout = old + 0.3 * torch.randn(lp.shape, generator=g)
    common = dict(clip="dual", kl_anchor="ref", rollout_is="token", rollout_is_cap=2.0)
    config = LossConfig(beta=0.2, rollout_is_on_kl=False, **common)
    ours, _ = token_policy_loss("grpo", lp, old, adv, mask, ref, rollout, config=config)
    policy_part, _ = token_policy_loss(
        "grpo", lp, old, adv, mask, None, rollout, config=LossConfig(beta=0.0, **common)
    )
    theirs = policy_part + 0.2 * verl_low_var_kl(lp, ref) * mask
    rel_close(ours, theirs)
    weighted, _ = token_policy_loss(
        "grpo", lp, old, adv, mask, ref, rollout, config=LossConfig(beta=0.2, **common)
    )
    assert (weighted - theirs).abs().max() > 1e-3  # the default weighs the KL too
