"""KL estimators and the four RPG divergences as per-token, importance-weighted terms.

Notation (docs/rpg_math.md), per response token, samples drawn from pi_old:

    log_w   = lp - lp_old    importance log-ratio       (carries gradient)
    log_r   = lp - lp_ref    log-ratio to the KL anchor (carries gradient)
    log_rho = lp_ref - lp_old                           (no gradient)

With the anchor pi_ref = pi_old (the paper's iterative reference update) log_r = log_w, rho = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


def k1(log_ratio: Tensor) -> Tensor:
    """k1 = log(p/q): unbiased for KL(p||q) when samples come from p."""
    return log_ratio


def k2(log_ratio: Tensor) -> Tensor:
    """k2 = (log(p/q))^2 / 2: low-variance, biased estimator of KL(p||q) under p."""
    return 0.5 * log_ratio.square()


def k3(log_ratio: Tensor) -> Tensor:
    """k3 = y - 1 - log y with y = q/p = exp(-log_ratio).

    Under p, E[k3] = UKL(p||q) = KL(p||q) for normalized p, q (Remark 3.5); always >= 0.
    """
    return torch.exp(-log_ratio) - 1.0 + log_ratio


class _DivergenceTerm(Protocol):
    def __call__(self, log_w: Tensor, log_r: Tensor, log_rho: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Divergence:
    """One RPG divergence D between pi_theta and the anchor pi_ref.

    estimate(log_w, log_r, log_rho): per-token term with E_old[estimate] = D exactly (spec table 1,
        written with the constants that make its value the divergence, not only its gradient).
    kl_weight(log_w, log_r, log_rho): C_KL of spec section 2/4, the KL part of the REINFORCE weight,
        defined by  beta * grad(estimate) = -C_KL * grad(lp);  Weight = w*A + C_KL.
    kl_weight_over_w(log_w, log_r, log_rho): C_KL / w, written without the division: w = exp(log_w)
        is 0 in fp32 below log_w ~ -103 and C_KL with it, where the quotient is still finite.
    folds_into_advantage: Algorithm 1 folds the KL into the regularized advantage
        A_hat = A + C_KL / w (urkl, rkl); for fkl/ufkl A_hat = A and the KL term stays outside
        the clip.
    clamped_by_authors: the authors' release clamps this estimate to [-10, 10] per token in its
        KL loss (ufkl, urkl, rkl; not fkl): loss.kl_estimate_clamp reproduces it.
    """

    name: str
    description: str
    estimate: _DivergenceTerm
    kl_weight_unscaled: _DivergenceTerm
    kl_weight_over_w_unscaled: _DivergenceTerm
    folds_into_advantage: bool
    clamped_by_authors: bool

    def kl_weight(self, beta: float, log_w: Tensor, log_r: Tensor, log_rho: Tensor) -> Tensor:
        return beta * self.kl_weight_unscaled(log_w, log_r, log_rho)

    def kl_weight_over_w(
        self, beta: float, log_w: Tensor, log_r: Tensor, log_rho: Tensor
    ) -> Tensor:
        return beta * self.kl_weight_over_w_unscaled(log_w, log_r, log_rho)


# UKL(pi_ref || pi_theta) = E_old[rho*(-log r) + (w - rho)];   C_KL = beta*(rho - w)
UFKL = Divergence(
    name="ufkl",
    description="unnormalized forward KL, UKL(pi_ref || pi_theta)",
    estimate=lambda log_w, log_r, log_rho: (
        torch.exp(log_w) - torch.exp(log_rho) * log_r - torch.exp(log_rho)
    ),
    kl_weight_unscaled=lambda log_w, log_r, log_rho: torch.exp(log_rho) - torch.exp(log_w),
    kl_weight_over_w_unscaled=lambda log_w, log_r, log_rho: torch.exp(log_rho - log_w) - 1.0,
    folds_into_advantage=False,
    clamped_by_authors=True,
)

# UKL(pi_theta || pi_ref) = E_old[w*log r + (rho - w)];   C_KL = -beta*w*log r
URKL = Divergence(
    name="urkl",
    description="unnormalized reverse KL, UKL(pi_theta || pi_ref)",
    estimate=lambda log_w, log_r, log_rho: (
        torch.exp(log_w) * log_r - torch.exp(log_w) + torch.exp(log_rho)
    ),
    kl_weight_unscaled=lambda log_w, log_r, log_rho: -torch.exp(log_w) * log_r,
    kl_weight_over_w_unscaled=lambda log_w, log_r, log_rho: -log_r,
    folds_into_advantage=True,
    clamped_by_authors=True,
)

# KL(pi_ref || pi_theta) = E_old[-rho*log r];   C_KL = beta*rho
FKL = Divergence(
    name="fkl",
    description="forward KL, KL(pi_ref || pi_theta)",
    estimate=lambda log_w, log_r, log_rho: -torch.exp(log_rho) * log_r,
    kl_weight_unscaled=lambda log_w, log_r, log_rho: torch.exp(log_rho),
    kl_weight_over_w_unscaled=lambda log_w, log_r, log_rho: torch.exp(log_rho - log_w),
    folds_into_advantage=False,
    clamped_by_authors=False,
)

# KL(pi_theta || pi_ref) = E_old[w*log r];   C_KL = -beta*w*(log r + 1)
RKL = Divergence(
    name="rkl",
    description="reverse KL, KL(pi_theta || pi_ref)",
    estimate=lambda log_w, log_r, log_rho: torch.exp(log_w) * log_r,
    kl_weight_unscaled=lambda log_w, log_r, log_rho: -torch.exp(log_w) * (log_r + 1.0),
    kl_weight_over_w_unscaled=lambda log_w, log_r, log_rho: -(log_r + 1.0),
    folds_into_advantage=True,
    clamped_by_authors=True,
)

DIVERGENCES: dict[str, Divergence] = {d.name: d for d in (UFKL, URKL, FKL, RKL)}
