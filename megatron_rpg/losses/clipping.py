"""Ratio clipping: PPO dual-clip (RPG-Style Clip, Algorithm 1) and the RPG-REINFORCE clip
(Algorithm 2), spec section 4.

Each function returns the per-token loss and boolean masks of the tokens that took a branch with no
gradient: `upper` (ratio above 1 + eps_high with a non-negative advantage), `lower` (ratio below
1 - eps_low with a negative advantage) and `dual` (ratio above the dual-clip bound c with a
negative advantage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClippedLoss:
    loss: Tensor  # [batch, response_len]
    upper: Tensor  # bool, same shape
    lower: Tensor
    dual: Tensor


def ppo_dual_clip(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip_c: float
) -> ClippedLoss:
    """PPO dual-clip on the ratio w with a gradient-free advantage A:

        L = max(-w*A, -clip(w, 1 - eps_low, 1 + eps_high)*A)      if A >= 0
        L = min(that, -c*A)                                       if A < 0

    Its gradient is -A*grad(w) except where a clip is active, where it is zero.
    `dual_clip_c = inf` gives the plain (single) PPO clip.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    loss = torch.where(negative, torch.minimum(loss, -advantages * dual_clip_c), loss)
    return ClippedLoss(
        loss=loss,
        upper=(advantages > 0) & (ratio > 1.0 + eps_high),
        lower=negative & (ratio < 1.0 - eps_low),
        dual=negative & (ratio > dual_clip_c),
    )


def rpg_reinforce_clip(
    logprobs: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    kl_weight: Tensor,
    kl_weight_over_w: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float,
) -> ClippedLoss:
    """RPG-REINFORCE with RPG-Style Clip, Algorithm 2 as written (spec section 4).

    A_R = A, C_KL = kl_weight (no gradient), A' = A_R + C_KL/w (C_KL/w = kl_weight_over_w, computed
    without dividing by a w that may underflow), l = -lp, psi = A'*l. Per token:

        psi >= 0:  w < 1+eps_high:  psi*SG(w)                                (gradient through l)
                   else:            (A_R*(1+eps_high) + C_KL)*SG(l)          (no gradient)
        psi <  0:  w <= 1-eps_low:  (A_R*(1-eps_low) + C_KL)*SG(l)           (no gradient)
                   w < c:           psi*SG(w)                                (gradient through l)
                   else:            (A_R*c + C_KL)*SG(l)                     (no gradient)

    The gradient branch has gradient -(w*A + C_KL)*grad(lp) = -Weight*grad(lp) (spec section 2),
    so the whole is PPO dual-clip on w*SG(A') token by token whenever l > 0.
    """
    w = ratio.detach()
    c_kl = kl_weight.detach()
    nll = -logprobs
    nll_const = nll.detach()
    psi = (advantages + kl_weight_over_w.detach()) * nll
    with_grad = (advantages * w + c_kl) * nll  # psi * SG(w), without the product 0 * inf
    upper_value = (advantages * (1.0 + eps_high) + c_kl) * nll_const
    lower_value = (advantages * (1.0 - eps_low) + c_kl) * nll_const
    dual_value = (advantages * dual_clip_c + c_kl) * nll_const

    positive = psi.detach() >= 0
    upper = positive & (w >= 1.0 + eps_high)
    lower = ~positive & (w <= 1.0 - eps_low)
    dual = ~positive & ~lower & (w >= dual_clip_c)
    loss = torch.where(
        positive,
        torch.where(upper, upper_value, with_grad),
        torch.where(lower, lower_value, torch.where(dual, dual_value, with_grad)),
    )
    return ClippedLoss(loss=loss, upper=upper, lower=lower, dual=dual)


def truncation_masks(ratio: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Where w = clip(w, 1 - eps_low, 1 + eps_high) changes w: (upper, lower)."""
    return ratio > 1.0 + eps_high, ratio < 1.0 - eps_low
