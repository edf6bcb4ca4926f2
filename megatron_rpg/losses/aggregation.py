"""Aggregation of a per-token loss matrix into the step's scalar loss (spec section 8).

With micro-batches and data parallelism the mean must be over the whole step, not a mean of
micro-batch means. Every mode is therefore a *sum* divided by a step-wide count:

    token-mean:           sum_{b,t} m*L / N_tokens
    seq-mean-token-sum:   sum_b (sum_t m*L) / N_seqs
    seq-mean-token-mean:  sum_b (sum_t m*L / sum_t m) / N_seqs

Pass N_tokens / N_seqs of the whole step (all micro-batches, all data-parallel ranks); summing
the returned values over micro-batches and ranks then gives exactly the full-batch loss, and
summing (not averaging) the gradients over data-parallel ranks gives its gradient.
N_seqs counts sequences with at least one valid token. Without counts, this batch's are used.
Every mode is a weighted sum over tokens, sum_{b,t} w_{b,t} L_{b,t}, with weights that depend only
on the mask and the counts (token_weights): a loss whose per-token terms depend only on their own
token is separable, which the fused token-loss path uses (losses/policy.py: separable_policy_loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def count_tokens(response_mask: Tensor) -> Tensor:
    return response_mask.sum()


def count_sequences(response_mask: Tensor) -> Tensor:
    return (response_mask.sum(dim=-1) > 0).sum()


def aggregate(
    token_loss: Tensor,
    response_mask: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Tensor:
    """Reduce `token_loss` [batch, response_len] to a scalar; see the module docstring."""
    mask = response_mask.to(token_loss.dtype)
    masked = token_loss * mask
    if mode == "token-mean":
        denominator = count_tokens(mask) if num_tokens is None else num_tokens
        return masked.sum() / _at_least_one(denominator, token_loss)
    seq_tokens = mask.sum(dim=-1)
    if mode == "seq-mean-token-sum":
        per_sequence = masked.sum(dim=-1)
    elif mode == "seq-mean-token-mean":
        per_sequence = masked.sum(dim=-1) / seq_tokens.clamp(min=1.0)
    else:
        raise ValueError(f"loss aggregation mode {mode!r} is not one of {AGG_MODES}")
    denominator = count_sequences(mask) if num_sequences is None else num_sequences
    return per_sequence.sum() / _at_least_one(denominator, token_loss)


def token_weights(
    response_mask: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """w [batch, response_len] with aggregate(L, mask, mode, counts) = sum_{b,t} w_{b,t} L_{b,t}:
    m / N_tokens, m / N_seqs, or m / (sum_t m) / N_seqs."""
    mask = response_mask.to(dtype)
    if mode == "token-mean":
        denominator = count_tokens(mask) if num_tokens is None else num_tokens
        return mask / _at_least_one(denominator, mask)
    if mode == "seq-mean-token-sum":
        per_token = mask
    elif mode == "seq-mean-token-mean":
        per_token = mask / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    else:
        raise ValueError(f"loss aggregation mode {mode!r} is not one of {AGG_MODES}")
    denominator = count_sequences(mask) if num_sequences is None else num_sequences
    return per_token / _at_least_one(denominator, mask)


def _at_least_one(count: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1.0)


def masked_mean(values: Tensor, response_mask: Tensor) -> Tensor:
    """Mean of `values` over valid tokens (0 when there are none)."""
    mask = response_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
