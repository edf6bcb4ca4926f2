"""A task's grader over a run: exact match in this process, or a math-verify grader in the
sandboxed pool (rewards/sandbox.py), started on first use and closed with the run. A response whose
grading timed out, crashed or raised scores 0 and is counted in `failures`.

    grade = TaskGrader(task.grader)
    rewards = grade([(response_text, reference_answer), ...])
    grade.close()
"""

from __future__ import annotations

from typing import Any

from megatron_rpg.rewards.exact import exact_match
from megatron_rpg.rewards.sandbox import GraderPool


class TaskGrader:
    def __init__(self, kind: str):
        self.kind = kind  # "exact" or a grader of rewards/sandbox.py
        self.failures = 0  # graded 0 after a timeout, crash or grader error
        self._pool: GraderPool | None = None

    @property
    def pool(self) -> GraderPool:
        """The sandboxed pool (started now if it is not running); benchmarks grade in it too."""
        if self._pool is None:
            self._pool = GraderPool()
        return self._pool

    def __call__(self, items: list[tuple[str, Any]]) -> list[float]:
        """Rewards of (response text, reference) pairs, in order."""
        if self.kind == "exact":
            return [exact_match(text, answer) for text, answer in items]
        scores, stats = self.pool.grade(self.kind, items)
        self.failures += stats["timeouts"] + stats["crashes"] + stats["errors"]
        return scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
