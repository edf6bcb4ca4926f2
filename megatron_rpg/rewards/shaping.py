"""Reward shaping (DAPO, arXiv 2503.14476, eq. 13): the soft overlong punishment.

With max_tokens L_max and buffer L_cache, a response of |y| tokens gets

    R_length(y) = 0                                   |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                = -1                                  |y| > L_max

times `penalty`, added to the task reward. buffer = 0 turns it off.
"""

from __future__ import annotations


def overlong_penalty(length: int, max_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    if buffer <= 0:
        return 0.0
    free = max_tokens - buffer
    if length <= free:
        return 0.0
    if length > max_tokens:
        return -penalty
    return penalty * (free - length) / buffer
