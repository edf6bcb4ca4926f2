"""The supervised warm-up `train` runs on a fresh model before RL (config section `sft`).

Next-token cross-entropy on the answer tokens (and the end of sequence) of task examples:

    L = - sum_{answer tokens t} log pi(y_t | x, y_<t) / (number of answer tokens in the batch)

with its own Adam (the RL optimizer starts fresh afterwards). Examples are drawn with a seeded
generator; on the arithmetic task each answer is right with probability sft.correct_fraction.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from megatron_rpg.config import SFTConfig
from megatron_rpg.data import ArithmeticTask
from megatron_rpg.forward_backward import LogprobOptions, forward_backward
from megatron_rpg.parallel import ParallelLayout
from megatron_rpg.run.progress import Progress
from megatron_rpg.step.batch import pack_sequences
from megatron_rpg.tokenizer import HFTokenizer, Tokenizer


def supervised_warmup(
    c: SFTConfig,
    policy: list[Any],
    optimizer: Any,
    task: ArithmeticTask,
    tokenizer: Tokenizer | HFTokenizer,
    layout: ParallelLayout,
    vocab_size: int,
    seed: int,
    show_progress: bool = False,
) -> None:
    """`c.steps` steps of `optimizer` (its own, lr c.lr) on the model chunks `policy`.
    Collective over the model's ranks."""
    options = LogprobOptions(vocab_size)
    rng = random.Random(seed)
    progress = Progress(c.steps, "sft", enabled=show_progress)

    def loss_fn(lp: torch.Tensor, entropy: torch.Tensor, batch: dict) -> tuple:
        value = -(lp * batch["response_mask"]).sum() / batch["count"]
        return value, {"loss": value.detach()}

    for _ in range(c.steps):
        rows = []
        for problem in (rng.choice(task.problems) for _ in range(c.batch_size)):
            prompt = tokenizer.encode_prompt(task.prompt(problem))  # as the rollout sees it
            answer = tokenizer.encode(task.noisy_answer(problem, c.correct_fraction, rng))
            rows.append((prompt, [*answer, tokenizer.eos_id]))
        tokens, mask = pack_sequences([p for p, _ in rows], [a for _, a in rows], tokenizer.pad_id)
        mine = slice(layout.dp_rank, None, layout.data_parallel)
        micro = {"tokens": tokens[mine], "response_mask": mask[mine], "count": mask.sum().float()}

        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(policy, [micro], options, loss_fn, groups=layout.groups)
        optimizer.step()
        loss = float(out[0]["loss"]) * layout.data_parallel if out else float("nan")
        progress.update(1, loss=loss)
    progress.close()
