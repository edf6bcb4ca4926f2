"""Exact-match grading for the synthetic task (plain string comparison: nothing is evaluated)."""

from __future__ import annotations


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response, stripped of surrounding whitespace, is exactly the answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0
