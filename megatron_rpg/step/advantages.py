"""The advantage stage of an RL step: pure, it returns new tensors and leaves its inputs alone.

    advantages = sequence_advantages("group_mean", batch)           # [B] (or [B, S-1])
    minis = reinforce_pp_token_advantages(minis, kl_in_reward, dp_group)

Outcome estimators (group_mean, group_mean_std, batch_mean, group_mean_whitened) are computed
from the step's rewards before the mini-batches are cut: every rank holds the whole batch, so
no collective is needed. REINFORCE++ needs pi_old's (and the reference's) log-probs, which exist
only on the last pipeline stage after the log-prob pass: its returns are computed per micro-batch
there and whitened over the whole step, every micro-batch of every data-parallel rank (two
all-reduces over the data-parallel group: losses/advantages.py, `whiten`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from megatron_rpg.losses import compute_advantages
from megatron_rpg.losses.advantages import reinforce_pp_returns, whiten
from megatron_rpg.step.batch import MiniBatch, RolloutBatch

TOKEN_LEVEL = ("reinforce_pp",)  # estimators computed after the log-prob pass


def sequence_advantages(estimator: str, batch: RolloutBatch) -> Tensor:
    """The advantages of an outcome estimator over the step's batch; for a token-level
    estimator, the rewards themselves (its advantages come after the log-prob pass)."""
    if estimator in TOKEN_LEVEL:
        return batch.rewards.clone()
    return compute_advantages(
        estimator, batch.rewards, batch.group_ids, response_mask=batch.response_mask
    )


def reinforce_pp_token_advantages(
    minis: list[MiniBatch], kl_in_reward: float, dp_group: Any
) -> list[MiniBatch]:
    """REINFORCE++ token advantages on the last stage: returns with the KL to the reference
    (pi_old when kl_anchor=old) in the reward (each micro-batch's "advantages" holds its
    rewards), whitened over the whole step. New mini-batches whose micro-batches carry them;
    off the last stage (no log-probs there) the mini-batches unchanged."""
    micros = [m for mini in minis for m in mini.micros]
    if not micros or "old_logprobs" not in micros[0]:
        return minis
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
    whitened = iter(
        whiten(returns, masks, dp_group).split([m["response_mask"].numel() for m in micros])
    )
    return [
        replace(
            mini,
            micros=[
                {**m, "advantages": next(whitened).reshape(m["response_mask"].shape)}
                for m in mini.micros
            ],
        )
        for mini in minis
    ]
