"""What a training task gives the trainer, the rollout loop and the greedy evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Task(Protocol):
    @property
    def problems(self) -> Sequence[Any]:
        """Every problem, in the task's order."""
        ...

    @property
    def grader(self) -> str:
        """A grader of rewards/sandbox.py (or "exact", graded in process)."""
        ...

    def prompt(self, problem: Any) -> str: ...

    def answer(self, problem: Any) -> str: ...

    def batch(self, seed: int, position: int, count: int) -> list[Any]:
        """`count` problems from the run's global position `position` (data/records.take)."""
        ...
