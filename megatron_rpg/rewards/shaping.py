"""Reward shaping: the task reward's scale, and DAPO's soft overlong punishment.

A grade g in [0, 1] (1: right) becomes the task reward

    R_task = c + (1 - c) g        c = incorrect_reward: 0 gives {0, 1}, DAPO's scorer -1 {-1, +1}

DAPO (arXiv 2503.14476, eq. 13): the soft overlong punishment.

With max_tokens L_max and buffer L_cache, a response of |y| tokens gets

    R_length(y) = 0                                   |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                = -1                                  |y| > L_max

times `penalty`, added to the task reward. buffer = 0 turns it off.
"""

from __future__ import annotations


def task_reward(grade: float, incorrect_reward: float = 0.0) -> float:
    return incorrect_reward + (1.0 - incorrect_reward) * grade


def overlong_penalty(length: int, max_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    if buffer <= 0:
        return 0.0
    free = max_tokens - buffer
    if length <= free:
        return 0.0
    if length > max_tokens:
        return -penalty
    return penalty * (free - length) / buffer
