"""Data sets of prompts with verifiable answers."""

from megatron_rpg.data.arithmetic import ArithmeticTask, Problem

__all__ = ["ArithmeticTask", "Problem"]
