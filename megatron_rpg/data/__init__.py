"""Data sets of prompts with verifiable answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_rpg.data.arithmetic import ArithmeticTask, Problem
from megatron_rpg.data.math import PROMPT_TEMPLATE, PROMPT_TEMPLATES, MathDataset
from megatron_rpg.data.records import read_records, take
from megatron_rpg.data.task import Task

if TYPE_CHECKING:
    from megatron_rpg.config import DataConfig


def build_task(data: DataConfig) -> ArithmeticTask | MathDataset:
    """The training task that `data` describes (data.task: arithmetic or math)."""
    if data.task == "arithmetic":
        return ArithmeticTask(data.max_operand, data.operators)
    return MathDataset(
        data.train_path,
        data.prompt_key,
        data.answer_key,
        data.answer_extraction,
        data.prompt_template,
    )


__all__ = [
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATES",
    "ArithmeticTask",
    "MathDataset",
    "Problem",
    "Task",
    "build_task",
    "read_records",
    "take",
]
