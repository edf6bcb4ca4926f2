"""Data sets of prompts with verifiable answers."""

from __future__ import annotations

from megatron_rpg.data.arithmetic import ArithmeticTask, Problem
from megatron_rpg.data.math import PROMPT_TEMPLATE, PROMPT_TEMPLATES, MathDataset
from megatron_rpg.data.records import read_records, take
from megatron_rpg.data.task import Task

__all__ = [
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATES",
    "ArithmeticTask",
    "MathDataset",
    "Problem",
    "Task",
    "read_records",
    "take",
]
