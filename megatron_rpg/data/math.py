"""Math problems with reference answers from a JSON lines file (DAPO-Math-17k, GSM8K train, ...),
prompted in the DAPO style and graded by math-verify in the sandbox (rewards/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rpg.data.records import read_records, take

PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}"
)


class MathDataset:
    grader = "math"

    def __init__(self, path: str | Path, prompt_key: str = "problem", answer_key: str = "answer"):
        self.problems = read_records(path, {"problem": prompt_key, "answer": answer_key})

    def prompt(self, problem: dict[str, str]) -> str:
        return PROMPT_TEMPLATE.format(problem=problem["problem"])

    def answer(self, problem: dict[str, str]) -> str:
        return problem["answer"]

    def batch(self, seed: int, position: int, count: int) -> list[Any]:
        return take(self.problems, seed, position, count)
