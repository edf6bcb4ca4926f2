"""The supervised warm-up `train` runs on a fresh model before RL (config section `sft`).

Next-token cross-entropy on the answer tokens (and the end of sequence) of task examples:

    L = - sum_{answer tokens t} log pi(y_t | x, y_<t) / (number of answer tokens in the batch)

with its own Adam (the RL optimizer starts fresh afterwards). Examples are drawn with a seeded
generator; on the arithmetic task each answer is right with probability sft.correct_fraction.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from megatron_rpg.forward_backward import LogprobOptions, forward_backward
from megatron_rpg.progress import Progress

if TYPE_CHECKING:
    from megatron_rpg.trainer import Trainer


def supervised_warmup(trainer: Trainer) -> None:
    c = trainer.config.sft
    task, tokenizer, layout = trainer.task, trainer.tokenizer, trainer.layout
    optimizer = trainer.make_optimizer(c.lr, weight_decay=0.0)
    options = LogprobOptions(trainer.arch.vocab_size)
    rng = random.Random(trainer.config.seed)
    progress = Progress(c.steps, "sft", enabled=trainer.rank == 0)

    def loss_fn(lp: torch.Tensor, entropy: torch.Tensor, batch: dict) -> tuple:
        value = -(lp * batch["mask"]).sum() / batch["count"]
        return value, {"loss": value.detach()}

    for _ in range(c.steps):
        rows = []
        for problem in (rng.choice(task.problems) for _ in range(c.batch_size)):
            prompt = tokenizer.encode_prompt(task.prompt(problem))  # as the rollout sees it
            answer = tokenizer.encode(task.noisy_answer(problem, c.correct_fraction, rng))
            rows.append((prompt, [*answer, tokenizer.eos_id]))
        width = max(len(p) + len(a) for p, a in rows)
        tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
        for b, (prompt, answer) in enumerate(rows):
            tokens[b, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[b, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
        mine = slice(layout.dp_rank, None, layout.data_parallel)
        micro = {"tokens": tokens[mine], "mask": mask[mine], "count": mask.sum().float()}

        for chunk in trainer.policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(trainer.policy, [micro], options, loss_fn)
        optimizer.step()
        loss = float(out[0]["loss"]) * layout.data_parallel if out else float("nan")
        progress.update(1, loss=loss)
    progress.close()
