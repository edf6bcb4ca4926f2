"""Name -> surrogate registry (`@register_loss`), as verl's `register_policy_loss`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from megatron_rpg.losses.clipping import ClippedLoss
from megatron_rpg.losses.config import LossConfig


@dataclass(frozen=True)
class TokenTerms:
    """The per-token quantities every surrogate reads, [batch, response_len], zero where masked.

    log_ratio = log w = lp - lp_old and log_ref_ratio = log r = lp - lp_ref carry gradient;
    log_rho = lp_ref - lp_old and advantages do not.
    With kl_anchor='old': log r = log w and log_rho = 0.
    """

    logprobs: Tensor
    log_ratio: Tensor
    log_ref_ratio: Tensor
    log_rho: Tensor
    advantages: Tensor


@dataclass
class Surrogate:
    """A surrogate's per-token loss, where a clip removed the gradient (None: no clip), and the
    loss's KL part when it is a term of its own (None: no KL, or the KL inside a clip)."""

    loss: Tensor
    clipped: ClippedLoss | None = None
    kl: Tensor | None = None


SurrogateFn = Callable[[TokenTerms, LossConfig], Surrogate]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: SurrogateFn
    has_kl: bool  # the loss has a beta-weighted KL term (needs the anchor's log-probs if 'ref')
    clip_modes: tuple[str, ...]  # LossConfig.clip values it supports


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, *, has_kl: bool, clip_modes: tuple[str, ...]
) -> Callable[[SurrogateFn], SurrogateFn]:
    def decorator(fn: SurrogateFn) -> SurrogateFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossSpec(name, fn, has_kl, clip_modes)
        return fn

    return decorator
