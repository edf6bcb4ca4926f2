"""Baselines shipped beside RPG for the comparison table (spec sections 3 and 7).

All use the PPO surrogate on the given advantages: -w*A with clip='none', PPO dual-clip with
clip='dual' (dual_clip_c = inf gives the single clip of the published GRPO / DAPO).

    grpo:               PPO + beta*k3(pi_ref/pi_theta), no importance weight on the KL (as
                        published; its expected KL gradient is E_old[(1 - 1/r) grad lp], which is
                        not the gradient of -beta*UKL(pi_theta || pi_ref)). k3 exactly as verl's
                        low_var_kl (where the paper's baselines ran): log r clamped to [-20, 20]
                        inside it (exp(-log r) is past fp32's range below log r ~ -88), then k3
                        clamped to [-10, 10] (its gradient is zero where |log r| is large enough
                        for k3 > 10: log r > 11 or log r < -2.4).
    grpo_kl_corrected:  PPO + beta*w*k3(pi_ref/pi_theta), whose expected gradient is
                        E_old[w log r grad lp], the urkl gradient; w*k3 is written as
                        exp(log w - log r) - w*(1 - log r), finite where w underflows.
    dapo, ppo_clip, reinforce_pp:  PPO alone. DAPO's other parts (dynamic sampling, overlong
                        shaping) live in the trainer and rewards; REINFORCE++'s KL is in its
                        advantages (megatron_rpg.losses.advantages.reinforce_pp_advantages).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rpg.losses.clipping import ppo_dual_clip
from megatron_rpg.losses.config import LossConfig
from megatron_rpg.losses.kl import k3
from megatron_rpg.losses.registry import Surrogate, TokenTerms, register_loss


def ppo_surrogate(terms: TokenTerms, config: LossConfig) -> Surrogate:
    w = torch.exp(terms.log_ratio)
    if config.clip == "none":
        return Surrogate(-w * terms.advantages)
    clipped = ppo_dual_clip(
        w, terms.advantages, config.eps_low, config.eps_high, config.dual_clip_c
    )
    return Surrogate(clipped.loss, clipped)


def _with_kl(surrogate: Surrogate, kl: Tensor) -> Surrogate:
    return Surrogate(surrogate.loss + kl, surrogate.clipped, kl)


K3_LOG_RATIO_BOUND = 20.0  # verl's clamp of log r in its k3 ("low_var_kl")
K3_BOUND = 10.0  # verl's clamp of k3 itself


@register_loss("grpo", has_kl=True, clip_modes=("none", "dual"))
def grpo(terms: TokenTerms, config: LossConfig) -> Surrogate:
    log_r = terms.log_ref_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    kl = k3(log_r).clamp(-K3_BOUND, K3_BOUND)
    return _with_kl(ppo_surrogate(terms, config), config.beta * kl)


@register_loss("grpo_kl_corrected", has_kl=True, clip_modes=("none", "dual"))
def grpo_kl_corrected(terms: TokenTerms, config: LossConfig) -> Surrogate:
    log_w, log_r = terms.log_ratio, terms.log_ref_ratio
    weighted_k3 = torch.exp(log_w - log_r) - torch.exp(log_w) * (1.0 - log_r)  # w * k3(log r)
    return _with_kl(ppo_surrogate(terms, config), config.beta * weighted_k3)


for _name in ("dapo", "ppo_clip", "reinforce_pp"):
    register_loss(_name, has_kl=False, clip_modes=("none", "dual"))(ppo_surrogate)
