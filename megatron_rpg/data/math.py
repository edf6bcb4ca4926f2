"""Math problems with reference answers from a JSON lines file (DAPO-Math-17k, GSM8K train, ...),
prompted in the DAPO style and graded by math-verify in the sandbox (rewards/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rpg.data.records import read_records, take
from megatron_rpg.rewards.math import MATH_GRADERS

# DAPO-Math-17k's prompt, word for word (the RPG authors' README, complex-reasoning/RPG)
PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    '{problem}\n\nRemember to put your answer on its own line after "Answer:".'
)
# data.prompt_template -> the text around a problem ("plain": the problem alone, for a chat model
# whose own style of answer the grader reads with answer_extraction='last_number')
PROMPT_TEMPLATES = {"dapo": PROMPT_TEMPLATE, "plain": "{problem}"}


class MathDataset:
    def __init__(
        self,
        path: str | Path,
        prompt_key: str = "problem",
        answer_key: str = "answer",
        answer_extraction: str = "strict",
        prompt_template: str = "dapo",
    ):
        self.problems = read_records(path, {"problem": prompt_key, "answer": answer_key})
        self.grader = MATH_GRADERS[answer_extraction]
        self.template = PROMPT_TEMPLATES[prompt_template]

    def prompt(self, problem: dict[str, str]) -> str:
        return self.template.format(problem=problem["problem"])

    def answer(self, problem: dict[str, str]) -> str:
        return problem["answer"]

    def batch(self, seed: int, position: int, count: int) -> list[Any]:
        return take(self.problems, seed, position, count)
