"""The loss library's entry point: `policy_loss(name, ...) -> (loss, metrics)`.

Tensors are [batch, response_len]; advantages are [batch] (per sequence) or [batch, response_len].
Pure tensor math: no model, no process group. Global token/sequence counts for the aggregation
are passed in by the trainer (see aggregation.py).

Rollout/trainer mismatch (docs/rpg_math.md section 5): with rollout_is='token' each token's loss
is multiplied by SG(min(exp(lp_old - lp_rollout), C)); with 'sequence' by
SG(min(exp(sum_t (lp_old - lp_rollout)), C)). With rollout_is_on_kl false (verl's placement) only
the policy-gradient part is: loss = (loss - KL) * weight + KL, for losses whose KL is a term of
its own (refused where it is inside the clip). The gap metrics are reported whenever
rollout_logprobs are given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from megatron_rpg.losses.aggregation import aggregate, masked_mean, token_weights
from megatron_rpg.losses.config import LossConfig
from megatron_rpg.losses.kl import k1, k3
from megatron_rpg.losses.registry import LOSSES, LossSpec, TokenTerms
from megatron_rpg.losses.rpg import kl_inside_clip

Metrics = dict[str, Tensor]


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Scalar loss of the named surrogate, aggregated by `config.agg`, and detached metrics.

    num_tokens / num_sequences: counts of the whole step (all micro-batches and data-parallel
    ranks) so that summed micro-batch losses equal the full-batch loss; default: this batch's.
    """
    config = config or LossConfig()
    token_loss, metrics = token_policy_loss(
        name,
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        ref_logprobs,
        rollout_logprobs,
        config,
    )
    loss = aggregate(token_loss, response_mask, config.agg, num_tokens, num_sequences)
    return loss, metrics


def separable_policy_loss(
    name: str,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Callable[[Tensor, slice | Tensor], Tensor]:
    """policy_loss as a sum of per-token terms: terms(logprobs [c], rows) -> [c] for the tokens
    `rows` (a slice or indices) of the flattened [batch * response_len] tensors, with

        sum over all rows of terms(lp[rows], rows) = policy_loss(name, lp, ...)

    in value and gradient. Every registered surrogate is per token (TokenTerms); the aggregation
    is sum_{b,t} w_{b,t} L_{b,t} with weights from the mask and counts (token_weights); the rollout
    importance weights are stop-gradient. So a chunk of tokens is computed alone, which the fused
    path uses to take the loss's gradients in the forward pass (forward_backward: token_loss_fn).
    old_logprobs None: pi_old is the current policy (a single on-policy update), whose log-probs
    each chunk supplies itself; a sequence-level rollout weight then needs the whole sequence's,
    and is refused (ValueError).
    """
    config = config or LossConfig()
    mask = response_mask.bool()
    weights = token_weights(mask, config.agg, num_tokens, num_sequences, advantages.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape)
    sequence_weights = None
    if config.rollout_is == "sequence" and rollout_logprobs is not None:
        if old_logprobs is None:
            raise ValueError(
                "loss.rollout_is='sequence' weighs a sequence by all its tokens' pi_old: the token "
                "path needs old_logprobs"
            )
        sequence_weights = rollout_is_weights(
            old_logprobs, rollout_logprobs, mask, "sequence", config.rollout_is_cap
        ).expand(mask.shape)  # stop-gradient: the same factor for every chunk of a sequence

    def flat(tensor: Tensor | None, rows: slice | Tensor) -> Tensor | None:
        return None if tensor is None else tensor.reshape(-1)[rows][None]

    def terms(logprobs: Tensor, rows: slice | Tensor) -> Tensor:
        lp = logprobs[None]
        old = flat(old_logprobs, rows)
        token_loss, _ = token_policy_loss(
            name,
            lp,
            lp.detach() if old is None else old,
            cast(Tensor, flat(advantages, rows)),
            cast(Tensor, flat(mask, rows)),
            flat(ref_logprobs, rows),
            flat(rollout_logprobs, rows),
            config,
            rollout_weights=flat(sequence_weights, rows),
        )
        return (token_loss * cast(Tensor, flat(weights, rows)))[0]

    return terms


def token_policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    rollout_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Per-token loss [batch, response_len] (zero where masked) before aggregation, and metrics.
    rollout_weights: the rollout importance weights, given (a chunk of tokens cannot compute its
    sequence's), else computed from rollout_logprobs as loss.rollout_is says."""
    config = config or LossConfig()
    spec = _lookup(name)
    _validate(
        spec,
        config,
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        ref_logprobs,
        rollout_logprobs,
    )
    mask = response_mask.bool()
    # Masked positions may hold anything (padding): zero them so that they cannot produce inf/nan.
    lp = _masked(logprobs, mask)
    lp_old = _masked(old_logprobs.detach(), mask)
    log_ratio = lp - lp_old
    if config.kl_anchor == "ref" and ref_logprobs is not None:
        lp_ref = _masked(ref_logprobs.detach(), mask)
        log_ref_ratio, log_rho = lp - lp_ref, lp_ref - lp_old
    else:  # the anchor is pi_old (or beta = 0 and the anchor is irrelevant)
        log_ref_ratio, log_rho = log_ratio, torch.zeros_like(lp_old)
    adv = advantages.detach().to(lp.dtype)
    adv = _masked(adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv, mask)
    terms = TokenTerms(lp, log_ratio, log_ref_ratio, log_rho, adv)

    surrogate = spec.fn(terms, config)
    token_loss = surrogate.loss
    metrics: Metrics = {"tokens": mask.sum().to(lp.dtype)}
    if rollout_logprobs is not None:
        lp_rollout = _masked(rollout_logprobs.detach(), mask)
        metrics.update(_rollout_gap_metrics(lp_old, lp_rollout, mask))
        if config.rollout_is != "none":
            is_weight = rollout_weights
            if is_weight is None:
                is_weight = rollout_is_weights(
                    lp_old, lp_rollout, mask, config.rollout_is, config.rollout_is_cap
                )
            if config.rollout_is_on_kl or surrogate.kl is None:
                token_loss = token_loss * is_weight
            else:  # verl's placement: the policy-gradient part only
                token_loss = (token_loss - surrogate.kl) * is_weight + surrogate.kl
            metrics["rollout/is_weight_mean"] = masked_mean(is_weight.expand_as(lp), mask)
    token_loss = _masked(token_loss, mask)

    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        metrics["ratio/mean"] = masked_mean(ratio, mask)
        metrics["ratio/max"] = _masked(ratio, mask).max() if mask.any() else ratio.new_zeros(())
        metrics["kl/k1"] = masked_mean(k1(log_ref_ratio), mask)
        metrics["kl/k3"] = masked_mean(k3(log_ref_ratio), mask)
        clipped = surrogate.clipped
        for side in ("upper", "lower", "dual"):
            hit = getattr(clipped, side) if clipped is not None else torch.zeros_like(mask)
            metrics[f"clip/{side}"] = masked_mean((hit & mask).to(lp.dtype), mask)
    return token_loss, metrics


def rollout_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: str, cap: float
) -> Tensor:
    """SG(min(pi_old/pi_rollout, cap)) per token [B, T], or per sequence [B, 1]."""
    log_ratio = _masked(old_logprobs - rollout_logprobs, mask).detach()
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True)
    return torch.exp(log_ratio.clamp(max=math.log(cap)))


def _rollout_gap_metrics(lp_old: Tensor, lp_rollout: Tensor, mask: Tensor) -> Metrics:
    """|lp_old - lp_rollout| and KL(pi_rollout || pi_old) estimated on the rollout's samples."""
    gap = lp_rollout - lp_old
    return {
        "rollout/abs_gap_mean": masked_mean(gap.abs(), mask),
        "rollout/abs_gap_max": gap.abs().max() if mask.any() else gap.new_zeros(()),
        "rollout/kl_k1": masked_mean(k1(gap), mask),
        "rollout/kl_k3": masked_mean(k3(gap), mask),
    }


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _lookup(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {sorted(LOSSES)}")
    return LOSSES[name]


def _validate(
    spec: LossSpec,
    config: LossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None,
    rollout_logprobs: Tensor | None,
) -> None:
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(
            f"logprobs must be a floating [batch, response_len] tensor; got "
            f"{logprobs.dtype} of shape {tuple(logprobs.shape)}"
        )
    shape = tuple(logprobs.shape)
    named = {
        "old_logprobs": old_logprobs,
        "response_mask": response_mask,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
    }
    for key, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}; logprobs has {shape}")
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must be [batch] {shape[:1]} or [batch, response_len] {shape}; "
            f"got {tuple(advantages.shape)}"
        )
    if config.clip not in spec.clip_modes:
        raise ValueError(
            f"loss {spec.name!r} does not support loss.clip={config.clip!r}; "
            f"allowed: {list(spec.clip_modes)}"
        )
    if not spec.has_kl and config.beta != 0:
        raise ValueError(
            f"loss {spec.name!r} has no KL term in the loss; set loss.beta=0 (got {config.beta})"
        )
    if config.kl_anchor == "ref" and spec.has_kl and config.beta > 0 and ref_logprobs is None:
        raise ValueError(f"loss.kl_anchor='ref' with loss {spec.name!r} needs ref_logprobs")
    if config.kl_anchor == "old" and ref_logprobs is not None:
        raise ValueError(
            "loss.kl_anchor='old' uses old_logprobs as the KL anchor; ref_logprobs were given "
            "(set loss.kl_anchor='ref' to use them)"
        )
    if config.rollout_is != "none" and rollout_logprobs is None:
        raise ValueError(f"loss.rollout_is={config.rollout_is!r} needs rollout_logprobs")
    if not config.rollout_is_on_kl and kl_inside_clip(spec.name, config.clip):
        raise ValueError(
            f"loss.rollout_is_on_kl=false weighs the policy-gradient part alone, but loss "
            f"{spec.name!r} with loss.clip={config.clip!r} has its KL inside the clip"
        )
