"""Advantage estimators for outcome rewards (spec notation; section 7 for REINFORCE++).

Sequence rewards R_i, [batch]; `group_ids` [batch] says which prompt each response answers.

    group_mean:      A_i = R_i - mean_{j in g(i)} R_j                      (RPG default)
    group_mean_std:  A_i = (R_i - mean_g R) / (std_g R + eps)              (GRPO; unbiased std)
    batch_mean:      A_i = R_i - mean_j R_j
    group_mean_whitened:  A_i = R_i - mean_g R, then whitened over the batch's response tokens
                     (each sequence weighted by its token count, as verl's masked whitening of
                     the broadcast advantage): REINFORCE++-Baseline, the paper's Tables 5, 7, 8
    reinforce_pp:    token rewards r_t = -beta*(lp_old_t - lp_ref_t), plus R_i at the last valid
                     token; returns G_t = sum_{s>=t} r_s; whitened over all valid tokens of the
                     batch: A_t = (G_t - mean G) / sqrt(var G + 1e-8)     (REINFORCE++)

Whitening is verl's masked_whiten: the masked mean, the masked *unbiased* variance (n - 1), and
(x - mean) * rsqrt(var + 1e-8), over every data-parallel rank's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

ESTIMATORS: tuple[str, ...] = (
    "group_mean",
    "group_mean_std",
    "batch_mean",
    "group_mean_whitened",
    "reinforce_pp",
)


WHITEN_EPS = 1e-8  # verl's masked_whiten: inside the square root


def _group_index(group_ids: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    if group_ids.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be [batch]; got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, index = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(index).to(rewards.dtype)
    if bool((counts < 2).any()):
        raise ValueError(
            "group advantages need at least 2 responses per prompt (rollout.n >= 2); "
            f"group sizes are {counts.long().tolist()}"
        )
    return index, counts


def _group_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, values
    )


def group_mean_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    index, counts = _group_index(group_ids, rewards)
    mean = _group_sum(rewards, index, counts.numel()) / counts
    return rewards - mean[index]


def group_mean_std_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    index, counts = _group_index(group_ids, rewards)
    mean = _group_sum(rewards, index, counts.numel()) / counts
    centred = rewards - mean[index]
    var = _group_sum(centred.square(), index, counts.numel()) / (counts - 1.0)
    return centred / (var.sqrt()[index] + eps)


def batch_mean_advantages(rewards: Tensor) -> Tensor:
    return rewards - rewards.mean()


def group_mean_whitened_advantages(
    rewards: Tensor, group_ids: Tensor, token_counts: Tensor
) -> Tensor:
    """Group-mean advantages whitened as `whiten` whitens them broadcast over each response's
    tokens (verl's masked_whiten): the token-weighted mean and unbiased variance."""
    centred = group_mean_advantages(rewards, group_ids)
    weights = token_counts.to(centred.dtype)
    total = weights.sum()
    mean = (weights * centred).sum() / total.clamp(min=1.0)
    variance = (weights * (centred - mean).square()).sum() / (total - 1).clamp(min=1.0)
    return (centred - mean) * torch.rsqrt(variance + WHITEN_EPS)


def reinforce_pp_returns(
    rewards: Tensor, response_mask: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, beta: float
) -> Tensor:
    """REINFORCE++ returns G_t [batch, T] before whitening; R_i is added at the last masked
    position of row i (responses may start anywhere in the row, e.g. after the prompt)."""
    mask = response_mask.to(old_logprobs.dtype)
    if mask.shape != old_logprobs.shape or ref_logprobs.shape != old_logprobs.shape:
        raise ValueError("response_mask, old_logprobs and ref_logprobs must have the same shape")
    token_rewards = -beta * (old_logprobs - ref_logprobs) * mask
    has_tokens = mask.sum(dim=-1) > 0
    last = mask.shape[-1] - 1 - mask.flip(-1).argmax(dim=-1)  # the last masked position
    rows = torch.arange(rewards.numel(), device=rewards.device)[has_tokens]
    token_rewards[rows, last[has_tokens]] += rewards[has_tokens].to(token_rewards.dtype)
    return token_rewards.flip(-1).cumsum(-1).flip(-1) * mask


def whiten(values: Tensor, mask: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """(values - mean) * rsqrt(var + 1e-8) over the masked entries, zero elsewhere, as verl's
    masked_whiten: var is the unbiased masked variance, sum (x - mean)^2 / (n - 1). Mean and
    variance are taken over every rank of `group` when one is given (two all-reduces). With a
    single valid entry (n = 1, where verl refuses) every value is 0."""
    mask = mask.to(values.dtype)
    totals = torch.stack([(values * mask).sum(), mask.sum()])
    if group is not None:
        torch.distributed.all_reduce(totals, group=group)
    count = totals[1]
    mean = totals[0] / count.clamp(min=1.0)
    square = ((values - mean) * mask).square().sum()
    if group is not None:
        torch.distributed.all_reduce(square, group=group)
    variance = square / (count - 1).clamp(min=1.0)
    return (values - mean) * torch.rsqrt(variance + WHITEN_EPS) * mask


def reinforce_pp_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    beta: float,
) -> Tensor:
    """REINFORCE++ token advantages [batch, response_len] (see the module docstring)."""
    returns = reinforce_pp_returns(rewards, response_mask, old_logprobs, ref_logprobs, beta)
    return whiten(returns, response_mask)


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    response_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """Dispatch on the estimator's name; [batch] for outcome estimators, [batch, T] otherwise."""
    if estimator in ("group_mean", "group_mean_std"):
        if group_ids is None:
            raise ValueError(f"advantage estimator {estimator!r} needs group_ids")
        if estimator == "group_mean":
            return group_mean_advantages(rewards, group_ids)
        return group_mean_std_advantages(rewards, group_ids)
    if estimator == "batch_mean":
        return batch_mean_advantages(rewards)
    if estimator == "group_mean_whitened":
        if group_ids is None or response_mask is None:
            raise ValueError(f"advantage estimator {estimator!r} needs group_ids and response_mask")
        return group_mean_whitened_advantages(rewards, group_ids, response_mask.sum(dim=-1))
    if estimator == "reinforce_pp":
        if response_mask is None or old_logprobs is None or ref_logprobs is None:
            raise ValueError(
                "advantage estimator 'reinforce_pp' needs response_mask, old_logprobs "
                "and ref_logprobs"
            )
        return reinforce_pp_advantages(rewards, response_mask, old_logprobs, ref_logprobs, beta)
    raise ValueError(f"advantage estimator {estimator!r} is not one of {ESTIMATORS}")
