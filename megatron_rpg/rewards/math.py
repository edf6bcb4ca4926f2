"""Math answer grading with math-verify: numeric and symbolic equivalence of the extracted final
answer and the reference (fractions, radicals, intervals, sets, units in text, LaTeX forms).

Run it through the sandbox (rewards/sandbox.py): symbolic simplification of untrusted text can
take unbounded time and memory. math-verify parses LaTeX and plain expressions with its own
parser and sympy; it never evaluates text as Python.
"""

from __future__ import annotations

from megatron_rpg.rewards.extract import extract_answer

# data.answer_extraction -> the sandbox's grader (rewards/sandbox.py GRADERS)
MATH_GRADERS = {"strict": "math", "last_number": "math_last_number"}


def _latex(text: str) -> str:
    text = text.strip()
    return text if text.startswith("$") else f"${text}$"


def grade_math(response: str, answer: str) -> float:
    """1.0 when the response's final answer (Answer: line, else last \\boxed{}) is equivalent
    to the reference, else 0.0."""
    return _verify(extract_answer(response), answer)


def grade_math_last_number(response: str, answer: str) -> float:
    """grade_math, with the response's last number as its answer when it states none."""
    return _verify(extract_answer(response, last_number=True), answer)


def _verify(predicted: str | None, answer: str) -> float:
    from math_verify import parse, verify

    if predicted is None:
        return 0.0
    gold = parse(_latex(answer))
    guess = parse(_latex(predicted))
    if not gold or not guess:
        return 0.0
    return 1.0 if verify(gold, guess) else 0.0
