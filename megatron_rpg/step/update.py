"""The update stage of an RL step, given its mini-batches (step/batch.py) with their advantages
(spec sections 1-5, 8).

    attach_logprobs(policy, minis, "old_logprobs", options, groups)    # pi_old, when needed
    metrics, grad_norms, skipped = update_policy(policy, optimizer, minis, options, ...)
    step_metrics = reduce_metrics(metrics, grad_norms, updates, layout, last_stage)

The step's sequences are cut into mini-batches of optimizer.mini_batch_size (one optimizer step
each, for each of ppo_epochs), and each mini-batch into this data-parallel rank's length-bucketed
micro-batches. Every micro-batch's loss is its share of the mini-batch's loss (the mini-batch's
global token and sequence counts, which MiniBatch carries), so the update does not depend on the
layout. A token-separable loss (every loss of megatron_rpg.losses: separable_policy_loss) takes
its gradients through the output layer in the forward pass (optimizer.loss_in_forward). A
mini-batch whose gradients are not finite on any rank is skipped (no optimizer step) and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpg.forward_backward import (
    LogprobOptions,
    LossFn,
    ScheduleTimes,
    TokenLossFn,
    forward_backward,
)
from megatron_rpg.logprobs import TokenLoss
from megatron_rpg.losses import policy_loss, separable_policy_loss
from megatron_rpg.losses.aggregation import masked_mean
from megatron_rpg.losses.config import LossConfig
from megatron_rpg.parallel import ParallelLayout, ProcessGroups
from megatron_rpg.step.batch import Batch, MiniBatch

Losses = Callable[[MiniBatch], tuple[LossFn, TokenLossFn | None]]


class PassStopped(Exception):
    """A stop was requested between two passes over the step's mini-batches."""


def attach_logprobs(
    chunks: list[Any],
    minis: list[MiniBatch],
    key: str,
    options: LogprobOptions,
    groups: ProcessGroups,
    stop_requested: Callable[[], bool] | None = None,
    times: ScheduleTimes | None = None,
) -> None:
    """Forward only: each micro-batch gets its log-probs under `chunks` as micro[key] (on the
    last pipeline stage). `stop_requested` (collective) is asked between two mini-batches:
    True raises PassStopped. `times` accumulates the schedules' times."""
    for index, mini in enumerate(minis):
        if index and stop_requested is not None and stop_requested():
            raise PassStopped(f"after {index} of its {len(minis)} mini-batches")
        outputs = forward_backward(chunks, mini.micros, options, groups=groups, times=times)
        for micro, out in zip(mini.micros, outputs, strict=False):  # [] off the last stage
            micro[key] = out["logprobs"]


@dataclass(frozen=True)
class LossSettings:
    """What the update needs to know of the loss: its name (algorithm.loss), its section
    (loss), and whether its gradients are taken in the forward pass (optimizer.loss_in_forward)."""

    name: str
    config: LossConfig
    in_forward: bool = True


def policy_losses(settings: LossSettings, mini: MiniBatch) -> tuple[LossFn, TokenLossFn | None]:
    """The micro-batch loss share of the configured loss with the mini-batch's counts, and its
    per-token form for the fused path (None: loss_in_forward off, or a sequence-level rollout
    weight without pi_old's log-probs, which the whole sequence would need)."""
    name, loss_config = settings.name, settings.config
    counts = {"num_tokens": mini.num_tokens, "num_sequences": mini.num_sequences}

    def loss(lp: Tensor, entropy: Tensor, micro: Batch) -> tuple[Tensor, dict[str, Any]]:
        mask = micro["response_mask"]
        value, metrics = policy_loss(
            name,
            lp,
            micro.get("old_logprobs", lp.detach()),
            micro["advantages"],
            mask,
            micro.get("ref_logprobs"),
            micro["rollout_logprobs"],
            loss_config,
            **counts,
        )
        metrics["entropy/mean"] = masked_mean(entropy.detach(), mask)
        metrics["loss_share"] = value.detach()
        return value, metrics

    def token_loss(micro: Batch) -> TokenLoss:
        terms = separable_policy_loss(
            name,
            micro.get("old_logprobs"),
            micro["advantages"],
            micro["response_mask"],
            micro.get("ref_logprobs"),
            micro["rollout_logprobs"],
            loss_config,
            **counts,
        )
        return lambda lp, entropy, rows: terms(lp, rows)

    has_old = "old_logprobs" in mini.micros[0] if mini.micros else False
    separable = settings.in_forward and (loss_config.rollout_is != "sequence" or has_old)
    return loss, token_loss if separable else None


def grads_finite(policy: list[Any]) -> bool:
    """Whether every gradient on every rank is finite (collective)."""
    bad = torch.zeros(1)
    for chunk in policy:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", param.grad)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def update_policy(
    policy: list[Any],
    optimizer: Any,
    minis: list[MiniBatch],
    options: LogprobOptions,
    groups: ProcessGroups,
    epochs: int,
    losses: Losses,
    stop_requested: Callable[[], bool] | None = None,
    times: ScheduleTimes | None = None,
) -> tuple[list[dict[str, Any]], list[float], int]:
    """For each of `epochs`, one optimizer step per mini-batch: (the last stage's micro-batch
    metrics, the grad norms of the steps taken, the number of steps skipped as non-finite).
    `stop_requested` (collective) is asked between two optimizer steps: True raises
    PassStopped, leaving the update part-done (the caller puts the state back)."""
    metrics: list[dict[str, Any]] = []
    grad_norms: list[float] = []
    skipped = 0
    total = epochs * len(minis)
    for index, mini in enumerate(minis * epochs):
        if index and stop_requested is not None and stop_requested():
            raise PassStopped(f"after {index} of its {total} optimizer steps")
        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss_fn, token_loss_fn = losses(mini)
        metrics += forward_backward(
            policy, mini.micros, options, loss_fn, token_loss_fn, groups=groups, times=times
        )
        if not grads_finite(policy):
            skipped += 1
            continue
        _, grad_norm, _ = optimizer.step()
        grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
    return metrics, grad_norms, skipped


def reduce_metrics(
    metrics: list[dict[str, Any]],
    grad_norms: list[float],
    updates: int,
    layout: ParallelLayout,
    last_stage: bool,
) -> dict[str, float]:
    """The last stage's micro-batch metrics averaged over micro-batches and data-parallel ranks;
    the loss is the mean over the `updates` optimizer steps of their summed shares. Collective;
    the same dict on every rank."""
    local = [{k: float(v) for k, v in m.items()} for m in metrics]
    if not (layout.tp_rank == 0 and last_stage):
        local = []
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, local)
    everything = [m for part in gathered for m in part]
    keys = sorted({k for m in everything for k in m} - {"loss_share", "tokens"})
    out = {k: sum(m[k] for m in everything) / len(everything) for k in keys}
    out["loss"] = sum(m["loss_share"] for m in everything) / updates
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    return out


def pipeline_bubble(times: ScheduleTimes) -> float:
    """The step's pipeline idle fraction (ScheduleTimes.bubble), averaged over every rank;
    collective."""
    bubble = torch.tensor([times.bubble], dtype=torch.float64)
    dist.all_reduce(bubble)
    return float(bubble.item()) / dist.get_world_size()
