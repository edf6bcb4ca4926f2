"""The policy update of one RL step, given its rollout batch and advantages (spec sections 1-5, 8).

    minis = mini_batches(batch, advantages, config.optimizer, layout, device)
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

from megatron_rpg.config import OptimizerConfig, RunConfig
from megatron_rpg.forward_backward import (
    LogprobOptions,
    LossFn,
    ScheduleTimes,
    TokenLossFn,
    forward_backward,
)
from megatron_rpg.logprobs import TokenLoss
from megatron_rpg.losses import policy_loss, separable_policy_loss
from megatron_rpg.losses.advantages import reinforce_pp_returns, whiten
from megatron_rpg.losses.aggregation import masked_mean
from megatron_rpg.parallel import ParallelLayout, ProcessGroups
from megatron_rpg.rl_batch import RolloutBatch, length_bucketed

Batch = dict[str, Tensor]


@dataclass
class MiniBatch:
    micros: list[Batch]  # this rank's micro-batches
    num_tokens: float  # response tokens of the whole mini-batch (every data-parallel rank)
    num_sequences: float


Losses = Callable[[MiniBatch], tuple[LossFn, TokenLossFn | None]]


def mini_batches(
    batch: RolloutBatch,
    advantages: Tensor,
    o: OptimizerConfig,
    layout: ParallelLayout,
    device: torch.device,
) -> list[MiniBatch]:
    """This rank's micro-batches per mini-batch, length-bucketed (rl_batch.length_bucketed) and
    each trimmed to its longest sequence; the loss is a sum over tokens with the mini-batch's
    counts, so the grouping leaves it unchanged."""
    lengths = batch.lengths()
    minis = []
    for start in range(0, len(batch), o.mini_batch_size):
        micros = []
        for rows in length_bucketed(
            lengths[start : start + o.mini_batch_size],
            o.micro_batch_size,
            layout.dp_rank,
            layout.data_parallel,
            fewest=2 * layout.pipeline_parallel if layout.pipeline_parallel > 1 else 1,
        ):
            index = start + rows
            micro = {**batch.rows(index), "advantages": advantages[index]}
            micros.append({k: v.to(device) for k, v in micro.items()})
        tokens = batch.response_mask[start : start + o.mini_batch_size].sum()
        minis.append(MiniBatch(micros, float(tokens), float(o.mini_batch_size)))
    return minis


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


def reinforce_pp_advantages(minis: list[MiniBatch], kl_in_reward: float, dp_group: Any) -> None:
    """REINFORCE++ token advantages on the last stage: returns with the KL to the reference
    (pi_old when kl_anchor=old) in the reward, whitened over the whole step: every micro-batch of
    every data-parallel rank (losses/advantages.py)."""
    micros = [m for mini in minis for m in mini.micros]
    if not micros or "old_logprobs" not in micros[0]:
        return  # not the last pipeline stage: the loss is not computed here
    returns = torch.cat(
        [
            reinforce_pp_returns(
                m["advantages"],
                m["response_mask"],
                m["old_logprobs"],
                m.get("ref_logprobs", m["old_logprobs"]),
                kl_in_reward,
            ).reshape(-1)
            for m in micros
        ]
    )  # flattened: the micro-batches differ in width
    masks = torch.cat([m["response_mask"].reshape(-1) for m in micros])
    whitened = whiten(returns, masks, dp_group).split([m["response_mask"].numel() for m in micros])
    for micro, advantages in zip(micros, whitened, strict=True):
        micro["advantages"] = advantages.reshape(micro["response_mask"].shape)


def policy_losses(config: RunConfig, mini: MiniBatch) -> tuple[LossFn, TokenLossFn | None]:
    """The micro-batch loss share of the configured loss with the mini-batch's counts, and its
    per-token form for the fused path (None: optimizer.loss_in_forward off, or a sequence-level
    rollout weight without pi_old's log-probs, which the whole sequence would need)."""
    c = config
    counts = {"num_tokens": mini.num_tokens, "num_sequences": mini.num_sequences}

    def loss(lp: Tensor, entropy: Tensor, micro: Batch) -> tuple[Tensor, dict[str, Any]]:
        mask = micro["response_mask"]
        value, metrics = policy_loss(
            c.algorithm.loss,
            lp,
            micro.get("old_logprobs", lp.detach()),
            micro["advantages"],
            mask,
            micro.get("ref_logprobs"),
            micro["rollout_logprobs"],
            c.loss,
            **counts,
        )
        metrics["entropy/mean"] = masked_mean(entropy.detach(), mask)
        metrics["loss_share"] = value.detach()
        return value, metrics

    def token_loss(micro: Batch) -> TokenLoss:
        terms = separable_policy_loss(
            c.algorithm.loss,
            micro.get("old_logprobs"),
            micro["advantages"],
            micro["response_mask"],
            micro.get("ref_logprobs"),
            micro["rollout_logprobs"],
            c.loss,
            **counts,
        )
        return lambda lp, entropy, rows: terms(lp, rows)

    has_old = "old_logprobs" in mini.micros[0] if mini.micros else False
    separable = c.optimizer.loss_in_forward and (c.loss.rollout_is != "sequence" or has_old)
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
