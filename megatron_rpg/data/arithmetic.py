"""The embedded verifiable task: integer arithmetic with an exact-answer reward.

    task = ArithmeticTask(max_operand=9, seed=0)
    task.prompt(problem) -> "7+5="      task.answer(problem) -> "12"

Problems are all pairs (a, b) with 0 <= a, b <= max_operand, for the operators chosen. The
supervised warm-up (sft.py) teaches the format from examples whose answer is right only with
probability `sft.correct_fraction` (else a random number of the answer range): the warmed-up
policy knows the answer but samples it rarely, and RL has to make it reliable.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from megatron_rpg.data.records import take


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int


OPERATORS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


class ArithmeticTask:
    grader = "exact"

    def __init__(self, max_operand: int, operators: str = "+"):
        unknown = set(operators) - set(OPERATORS)
        operands = range(max_operand + 1)
        if unknown or not operators:
            raise ValueError(f"data.operators={operators!r}: use characters of '+-*'")
        self.problems = [Problem(a, op, b) for op in operators for a in operands for b in operands]
        answers = [OPERATORS[p.op](p.a, p.b) for p in self.problems]
        self.answer_range = (min(answers), max(answers))

    def prompt(self, problem: Problem) -> str:
        return f"{problem.a}{problem.op}{problem.b}="

    def answer(self, problem: Problem) -> str:
        return str(OPERATORS[problem.op](problem.a, problem.b))

    def noisy_answer(self, problem: Problem, correct_fraction: float, rng: random.Random) -> str:
        if rng.random() < correct_fraction:
            return self.answer(problem)
        return str(rng.randint(*self.answer_range))

    def corpus(self) -> list[str]:
        """Text to train the tokenizer on: every prompt and answer."""
        return [self.prompt(p) + self.answer(p) for p in self.problems]

    def batch(self, seed: int, position: int, count: int) -> list[Problem]:
        """`count` problems from global position `position` of the run (data/records.take)."""
        return take(self.problems, seed, position, count)
