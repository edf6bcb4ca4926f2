"""Reward shaping against DAPO's formula (eq. 13) at the boundaries, and exact match."""

import pytest

from megatron_rpg.rewards import exact_match, overlong_penalty


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (15, -0.75), (16, -1.0), (17, -1.0)],
)
def test_overlong_penalty_is_linear_over_the_buffer(length, expected):
    assert overlong_penalty(length, max_tokens=16, buffer=4, penalty=1.0) == expected
    assert overlong_penalty(length, max_tokens=16, buffer=4, penalty=0.5) == expected * 0.5


def test_overlong_penalty_off_without_a_buffer():
    assert overlong_penalty(100, max_tokens=16, buffer=0) == 0.0


def test_exact_match_compares_text_only():
    assert exact_match(" 12\n", "12") == 1.0
    assert exact_match("12.0", "12") == 0.0
    assert exact_match("__import__('os')", "12") == 0.0
