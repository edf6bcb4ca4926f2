"""RPG-Style Clip (spec section 4), token by token, against independent reference formulas."""

import pytest
import torch

from megatron_rpg.losses import LossConfig, token_policy_loss

pytestmark = pytest.mark.usefixtures("float64_by_default")


EPS_LOW, EPS_HIGH, C = 0.2, 0.28, 3.0

# C_KL per divergence, general anchor (spec sections 2 and 4), written out independently.
C_KL = {
    "ufkl": lambda w, log_r, rho, beta: beta * (rho - w),
    "urkl": lambda w, log_r, rho, beta: -beta * w * log_r,
    "fkl": lambda w, log_r, rho, beta: beta * rho,
    "rkl": lambda w, log_r, rho, beta: -beta * w * (log_r + 1),
}


def random_tokens(seed: int, shape=(64, 8)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g) * 3 - 0.01  # l = -lp > 0
    old = lp + 0.5 * torch.randn(shape, generator=g)  # many ratios outside the clip range
    ref = lp + 0.5 * torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    return lp, old, ref, adv


def ppo_dual_clip_reference(ratio, adv):
    """PPO dual-clip (Ye et al. 2020) on a constant advantage, per token."""
    clipped = torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
    loss = torch.max(-ratio * adv, -clipped * adv)
    return torch.where(adv < 0, torch.min(loss, -C * adv), loss)


def per_token_grad(name, lp, old, ref, adv, config):
    lp = lp.clone().requires_grad_()
    token_loss, metrics = token_policy_loss(
        name,
        lp,
        old,
        adv,
        torch.ones_like(lp, dtype=torch.bool),
        ref_logprobs=ref if config.kl_anchor == "ref" else None,
        config=config,
    )
    (grad,) = torch.autograd.grad(token_loss.sum(), lp)
    return grad, metrics


def anchor_terms(lp, old, ref, anchor):
    w = torch.exp(lp - old)
    if anchor == "old":
        return w, lp - old, torch.ones_like(w)
    return w, lp - ref, torch.exp(ref - old)


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("div", list(C_KL))
def test_reinforce_dual_clip_has_ppo_dual_clip_gradient_on_effective_advantage(div, anchor):
    lp, old, ref, adv = random_tokens(seed=0)
    beta = 0.2
    config = LossConfig(
        beta=beta, clip="dual", eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=C, kl_anchor=anchor
    )
    got, metrics = per_token_grad(f"rpg_reinforce_{div}", lp, old, ref, adv, config)

    w, log_r, rho = anchor_terms(lp, old, ref, anchor)
    adv_eff = adv + C_KL[div](w, log_r, rho, beta) / w  # A' = A_R + C_KL / w
    x = lp.clone().requires_grad_()
    (want,) = torch.autograd.grad(ppo_dual_clip_reference(torch.exp(x - old), adv_eff).sum(), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)

    # The clip fractions count exactly the tokens whose gradient the clip removed.
    upper = (adv_eff >= 0) & (w >= 1 + EPS_HIGH)
    lower = (adv_eff < 0) & (w <= 1 - EPS_LOW)
    dual = (adv_eff < 0) & (w >= C)
    assert upper.any() and lower.any() and dual.any()
    for side, hit in (("upper", upper), ("lower", lower), ("dual", dual)):
        assert metrics[f"clip/{side}"].item() == pytest.approx(hit.double().mean().item())
    assert bool((got[upper | lower | dual] == 0).all())
    assert bool((got[~(upper | lower | dual)] != 0).all())


def test_algorithm2_matches_sign_of_advantage_branching_when_beta_is_zero():
    """The authors' code branches on sign(A), Algorithm 2 on sign(A'): equal when beta = 0."""
    lp, old, _, adv = random_tokens(seed=1)
    config = LossConfig(beta=0.0, clip="dual", eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=C)
    got, _ = per_token_grad("rpg_reinforce_urkl", lp, old, None, adv, config)
    x = lp.clone().requires_grad_()
    (want,) = torch.autograd.grad(ppo_dual_clip_reference(torch.exp(x - old), adv).sum(), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_algorithm2_and_sign_of_advantage_branching_differ_when_kl_flips_the_sign():
    # One token: A = 0.05 > 0 but A' = A - beta*log w < 0 at w = 2.0 (urkl, beta = 0.2).
    lp = torch.tensor([[-1.0]])
    old = lp - torch.log(torch.tensor(2.0))
    adv = torch.tensor([0.05])
    config = LossConfig(beta=0.2, clip="dual", eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=C)
    got, metrics = per_token_grad("rpg_reinforce_urkl", lp, old, None, adv, config)
    # Algorithm 2: psi < 0 and 1 - eps_low < w < c: gradient -(w*A + C_KL) = -w*A' != 0.
    adv_eff = 0.05 - 0.2 * torch.log(torch.tensor(2.0))
    torch.testing.assert_close(got, -(2.0 * adv_eff).reshape(1, 1), atol=1e-12, rtol=0)
    # Branching on sign(A) > 0 would clip this token (w > 1 + eps_high) and give zero gradient.
    assert metrics["clip/upper"].item() == 0.0


@pytest.mark.parametrize("anchor", ["old", "ref"])
@pytest.mark.parametrize("div", list(C_KL))
def test_truncated_form_uses_clipped_ratio_inside_stop_gradient(div, anchor):
    lp, old, ref, adv = random_tokens(seed=2)
    beta = 0.2
    config = LossConfig(
        beta=beta, clip="truncate", eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_anchor=anchor
    )
    got, metrics = per_token_grad(f"rpg_reinforce_{div}", lp, old, ref, adv, config)
    w, log_r, rho = anchor_terms(lp, old, ref, anchor)
    w_bar = w.clamp(1 - EPS_LOW, 1 + EPS_HIGH)
    log_r_bar = log_r + torch.log(w_bar) - torch.log(w)  # log r moves with log w
    weight = w_bar * adv + C_KL[div](w_bar, log_r_bar, rho, beta)
    torch.testing.assert_close(got, -weight, atol=1e-12, rtol=0)
    assert metrics["clip/upper"].item() == pytest.approx((w > 1 + EPS_HIGH).double().mean().item())
    assert metrics["clip/lower"].item() == pytest.approx((w < 1 - EPS_LOW).double().mean().item())


@pytest.mark.parametrize("name", ["rpg_urkl", "rpg_rkl", "rpg_ufkl", "rpg_fkl"])
def test_fully_differentiable_dual_clip_algorithm1(name):
    """Algorithm 1: PPO dual-clip on A_hat (urkl, rkl fold the KL in), plus the unclipped KL term
    for fkl/ufkl. Outside every clip the gradient equals the unclipped surrogate's."""
    lp, old, _, adv = random_tokens(seed=3)
    beta = 0.2
    config = LossConfig(beta=beta, clip="dual", eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=C)
    got, metrics = per_token_grad(name, lp, old, None, adv, config)
    unclipped, _ = per_token_grad(name, lp, old, None, adv, LossConfig(beta=beta, clip="none"))
    w = torch.exp(lp - old)
    div = name.split("_")[1]
    folds = div in ("urkl", "rkl")
    a_hat = adv + C_KL[div](w, lp - old, torch.ones_like(w), beta) / w if folds else adv
    clipped = ((a_hat > 0) & (w > 1 + EPS_HIGH)) | ((a_hat < 0) & ((w < 1 - EPS_LOW) | (w > C)))
    assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(got[~clipped], unclipped[~clipped], atol=1e-12, rtol=0)
    kl_only = 0.0 if folds else (-C_KL[div](w, lp - old, torch.ones_like(w), beta))[clipped]
    torch.testing.assert_close(
        got[clipped], torch.zeros_like(got[clipped]) + kl_only, atol=1e-12, rtol=0
    )
    total = sum(metrics[f"clip/{s}"].item() for s in ("upper", "lower", "dual"))
    assert total == pytest.approx(clipped.double().mean().item())


@pytest.mark.parametrize("name", ["grpo", "dapo", "ppo_clip", "reinforce_pp"])
def test_baselines_use_ppo_dual_clip(name):
    lp, old, _, adv = random_tokens(seed=4)
    config = LossConfig(beta=0.0, clip="dual", eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=C)
    got, _ = per_token_grad(name, lp, old, None, adv, config)
    x = lp.clone().requires_grad_()
    (want,) = torch.autograd.grad(ppo_dual_clip_reference(torch.exp(x - old), adv).sum(), x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
