"""The RPG surrogates (spec sections 1, 2, 4): four divergences x {fully differentiable, REINFORCE}.

Every surrogate satisfies E_{pi_old}[grad L] = -grad J exactly, J = E_{pi_theta}[R] - beta*D
(tested by exact enumeration in tests/test_losses_enumeration.py), unless a clip is active.

Fully differentiable, `rpg_<div>`:   L = -w*A + beta*estimate_D(w, r, rho)          (section 1)
    with clip='dual' (Algorithm 1):  L = dual_clip(w, SG(A_hat)) [+ beta*estimate_D if not folded],
    A_hat = A + C_KL/w for urkl and rkl, A_hat = A for fkl and ufkl.
REINFORCE, `rpg_reinforce_<div>`:    L = -SG(w*A + C_KL) * lp                        (section 2)
    clip='dual': Algorithm 2; clip='truncate': w -> clip(w, 1-eps_low, 1+eps_high) inside SG.

loss.kl_estimate_clamp = c (the authors' release: 10) clamps the fully differentiable forms'
estimate_D to [-c, c] for ufkl, urkl and rkl, as the authors' KL loss does: where the clamp is
active the KL term is the constant +-beta*c and its gradient is zero, folded into A_hat or not.
The REINFORCE forms are left as they are (the authors' REINFORCE loss does not clamp its C_KL).
"""

from __future__ import annotations

import functools
import math

import torch

from megatron_rpg.losses.clipping import (
    ClippedLoss,
    ppo_dual_clip,
    rpg_reinforce_clip,
    truncation_masks,
)
from megatron_rpg.losses.config import LossConfig
from megatron_rpg.losses.kl import DIVERGENCES, Divergence
from megatron_rpg.losses.registry import Surrogate, TokenTerms, register_loss


def rpg_loss(divergence: Divergence, terms: TokenTerms, config: LossConfig) -> Surrogate:
    log_w, log_r, log_rho, adv = (
        terms.log_ratio,
        terms.log_ref_ratio,
        terms.log_rho,
        terms.advantages,
    )
    w = torch.exp(log_w)
    estimate = divergence.estimate(log_w, log_r, log_rho)
    bound = config.kl_estimate_clamp if divergence.clamped_by_authors else None
    kl_live = torch.ones_like(estimate) if bound is None else (estimate.detach().abs() <= bound)
    if bound is not None:
        estimate = estimate.clamp(-bound, bound)
    kl_term = config.beta * estimate
    if config.clip == "none":
        return Surrogate(-w * adv + kl_term, kl=kl_term)
    if divergence.folds_into_advantage:  # the KL's gradient, zero where the clamp is active
        kl_over_w = divergence.kl_weight_over_w(config.beta, log_w, log_r, log_rho) * kl_live
        adv_hat = (adv + kl_over_w).detach()
        clipped = ppo_dual_clip(w, adv_hat, config.eps_low, config.eps_high, config.dual_clip_c)
        return Surrogate(clipped.loss, clipped)
    clipped = ppo_dual_clip(w, adv, config.eps_low, config.eps_high, config.dual_clip_c)
    return Surrogate(clipped.loss + kl_term, clipped, kl_term)


def rpg_reinforce_loss(divergence: Divergence, terms: TokenTerms, config: LossConfig) -> Surrogate:
    log_w, log_r, log_rho, adv = (
        terms.log_ratio,
        terms.log_ref_ratio,
        terms.log_rho,
        terms.advantages,
    )
    w = torch.exp(log_w)
    if config.clip == "dual":
        c_kl = divergence.kl_weight(config.beta, log_w, log_r, log_rho)
        c_kl_over_w = divergence.kl_weight_over_w(config.beta, log_w, log_r, log_rho)
        clipped = rpg_reinforce_clip(
            terms.logprobs,
            w,
            adv,
            c_kl,
            c_kl_over_w,
            config.eps_low,
            config.eps_high,
            config.dual_clip_c,
        )
        return Surrogate(clipped.loss, clipped)
    if config.clip == "truncate":
        log_w_bar = log_w.clamp(math.log1p(-config.eps_low), math.log1p(config.eps_high))
        log_r_bar = log_w_bar - log_rho  # log r = log w - log rho
        c_kl = divergence.kl_weight(config.beta, log_w_bar, log_r_bar, log_rho)
        weight = torch.exp(log_w_bar) * adv + c_kl
        upper, lower = truncation_masks(w.detach(), config.eps_low, config.eps_high)
        loss = -weight.detach() * terms.logprobs
        clipped = ClippedLoss(loss, upper, lower, torch.zeros_like(upper))
        return Surrogate(loss, clipped, -c_kl.detach() * terms.logprobs)
    c_kl = divergence.kl_weight(config.beta, log_w, log_r, log_rho)
    weight = w * adv + c_kl
    return Surrogate(-weight.detach() * terms.logprobs, kl=-c_kl.detach() * terms.logprobs)


def kl_inside_clip(name: str, clip: str) -> bool:
    """Whether the loss `name` with loss.clip=`clip` has its KL inside the clip, not as a term of
    its own: Algorithm 1 folds urkl's and rkl's into A_hat, Algorithm 2 every REINFORCE form's
    into its weight."""
    if name.startswith("rpg_reinforce_"):
        return clip == "dual"
    if name.startswith("rpg_") and name[4:] in DIVERGENCES:
        return clip == "dual" and DIVERGENCES[name[4:]].folds_into_advantage
    return False


for _divergence in DIVERGENCES.values():
    register_loss(f"rpg_{_divergence.name}", has_kl=True, clip_modes=("none", "dual"))(
        functools.partial(rpg_loss, _divergence)
    )
    register_loss(
        f"rpg_reinforce_{_divergence.name}", has_kl=True, clip_modes=("none", "dual", "truncate")
    )(functools.partial(rpg_reinforce_loss, _divergence))
