"""The batch stage of an RL step: rollout results -> the step's tensors, cut into mini-batches (one
optimizer step each) of length-bucketed micro-batches.

    batch = build_batch(prompts, responses, rewards, pad_id)
    minis = mini_batches(batch, advantages, mini_batch_size, micro_batch_size, layout, device)

Layout (forward_backward.py's convention): tokens [B, S] hold prompt + response, right-padded;
log-prob position i predicts token i+1, so a response of R tokens after a prompt of P tokens
occupies positions P-1 .. P+R-2 of the [B, S-1] tensors (response_mask, rollout_logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rpg.parallel import ParallelLayout
from megatron_rpg.rollout.protocol import Response

Batch = dict[str, Tensor]


@dataclass
class RolloutBatch:
    tokens: Tensor  # [B, S] long
    response_mask: Tensor  # [B, S-1] bool
    rollout_logprobs: Tensor  # [B, S-1] float32, 0 outside the mask
    rewards: Tensor  # [B] float32
    group_ids: Tensor  # [B] long: the prompt each response answers
    prompt_lengths: Tensor  # [B] long
    response_lengths: Tensor  # [B] long
    truncated: Tensor  # [B] bool: finished by length, not by a stop token

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def lengths(self) -> Tensor:
        """[B] prompt + response tokens of each sequence (its width without padding)."""
        return self.prompt_lengths + self.response_lengths

    def rows(self, index: Tensor) -> dict[str, Tensor]:
        """Selected sequences as a micro-batch dict (the keys losses and forward_backward read),
        only as wide as the longest of them: columns of padding alone are dropped (causal
        attention: no token depends on the padding after it)."""
        width = int(self.lengths()[index].max())
        return {
            "tokens": self.tokens[index, :width],
            "response_mask": self.response_mask[index, : width - 1],
            "rollout_logprobs": self.rollout_logprobs[index, : width - 1],
        }


def pack_sequences(
    prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """(tokens [B, S], continuation mask [B, S-1]) of prompt + continuation rows, right-padded to
    the longest: the mask is True at the log-prob positions that predict a continuation token."""
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1, dtype=torch.bool)
    for b, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        p, c = len(prompt), len(continuation)
        tokens[b, : p + c] = torch.tensor([*prompt, *continuation])
        mask[b, p - 1 : p + c - 1] = True
    return tokens, mask


def build_batch(
    prompts: Sequence[Sequence[int]],
    response_groups: Sequence[Sequence[Response]],
    rewards: Sequence[Sequence[float]],
    pad_id: int,
) -> RolloutBatch:
    """The step's batch: every response of group g follows prompt g; rewards[g][i] is the
    reward of response i of group g."""
    rows = [
        (g, prompts[g], r, rewards[g][i])
        for g, group in enumerate(response_groups)
        for i, r in enumerate(group)
    ]
    if not rows:
        raise ValueError("build_batch: no responses")
    tokens, mask = pack_sequences(
        [p for _, p, _, _ in rows], [r.token_ids for _, _, r, _ in rows], pad_id
    )
    rollout = torch.zeros(mask.shape, dtype=torch.float32)
    rollout[mask] = torch.tensor(
        [x for _, _, r, _ in rows for x in r.logprobs], dtype=torch.float32
    )
    return RolloutBatch(
        tokens=tokens,
        response_mask=mask,
        rollout_logprobs=rollout,
        rewards=torch.tensor([reward for *_, reward in rows], dtype=torch.float32),
        group_ids=torch.tensor([g for g, *_ in rows]),
        prompt_lengths=torch.tensor([len(p) for _, p, _, _ in rows]),
        response_lengths=torch.tensor([len(r.token_ids) for _, _, r, _ in rows]),
        truncated=torch.tensor([r.finish_reason == "length" for _, _, r, _ in rows]),
    )


# What one more micro-batch costs beyond its token slots (the schedule's per-micro-batch work,
# smaller matmuls), in token slots: benchmarks/results_train_step_smollm2_cpu.txt, run 7.
MICRO_BATCH_COST_SLOTS = 64


def length_bucketed(
    lengths: Tensor,
    micro_batch_size: int,
    dp_rank: int = 0,
    data_parallel: int = 1,
    fewest: int = 1,
) -> list[Tensor]:
    """Row indices of this data-parallel rank's micro-batches for one mini-batch of sequences
    with `lengths`: longest first, dealt round-robin to the DP ranks (each gets a like share of
    long and short), then cut into micro-batches of neighbouring lengths and at most
    micro_batch_size sequences. Each micro-batch is as wide as its first (longest) sequence; the
    cuts minimise the token slots, rows x width summed over the micro-batches, plus
    MICRO_BATCH_COST_SLOTS per micro-batch (exactly, by dynamic programming over the cut points:
    with sorted lengths the best split into contiguous runs is the best split overall), among
    the cuts into at least `fewest` micro-batches (or one per row, if fewer rows): a pipeline of
    P stages is asked for 2P, so that its schedule is not mostly filling and draining."""
    order = torch.argsort(lengths, descending=True, stable=True)[dp_rank::data_parallel]
    sizes = _cheapest_cuts([int(n) for n in lengths[order]], micro_batch_size, fewest)
    return list(order.split(sizes))


def _cheapest_cuts(widths: list[int], most: int, fewest: int = 1) -> list[int]:
    """Sizes of contiguous runs of the descending `widths`, each of at most `most`, at least
    min(fewest, len(widths)) runs, minimising sum(size * first width + MICRO_BATCH_COST_SLOTS);
    among equal costs, the smallest largest run (a pipeline waits for its largest micro-batch)."""
    count = len(widths)
    need = max(1, min(fewest, count))
    none = (float("inf"), 0)
    # best[start][k]: (cost, largest run) of the cheapest cuts of widths[start:] into >= k runs
    best = [[none] * (need + 1) for _ in range(count + 1)]
    size = [[0] * (need + 1) for _ in range(count + 1)]
    best[count][0] = (0.0, 0)
    for start in range(count - 1, -1, -1):
        for k in range(need + 1):
            options = []
            for run in range(1, min(most, count - start) + 1):
                rest_cost, rest_largest = best[start + run][max(k - 1, 0)]
                cost = run * widths[start] + MICRO_BATCH_COST_SLOTS + rest_cost
                options.append((cost, max(run, rest_largest), -run))  # then fewer micro-batches
            cost, largest, fewer = min(options)
            best[start][k], size[start][k] = (cost, largest), -fewer
    sizes, start, k = [], 0, need
    while start < count:
        run = size[start][k]
        sizes.append(run)
        start, k = start + run, max(k - 1, 0)
    return sizes


@dataclass
class MiniBatch:
    micros: list[Batch]  # this rank's micro-batches
    num_tokens: float  # response tokens of the whole mini-batch (every data-parallel rank)
    num_sequences: float


def mini_batches(
    batch: RolloutBatch,
    advantages: Tensor,
    mini_batch_size: int,
    micro_batch_size: int,
    layout: ParallelLayout,
    device: torch.device,
) -> list[MiniBatch]:
    """This rank's micro-batches per mini-batch, length-bucketed (length_bucketed) and each
    trimmed to its longest sequence; the loss is a sum over tokens with the mini-batch's counts,
    so the grouping leaves it unchanged."""
    lengths = batch.lengths()
    minis = []
    for start in range(0, len(batch), mini_batch_size):
        micros = []
        for rows in length_bucketed(
            lengths[start : start + mini_batch_size],
            micro_batch_size,
            layout.dp_rank,
            layout.data_parallel,
            fewest=2 * layout.pipeline_parallel if layout.pipeline_parallel > 1 else 1,
        ):
            index = start + rows
            micro = {**batch.rows(index), "advantages": advantages[index]}
            micros.append({k: v.to(device) for k, v in micro.items()})
        tokens = batch.response_mask[start : start + mini_batch_size].sum()
        minis.append(MiniBatch(micros, float(tokens), float(mini_batch_size)))
    return minis
