"""Rewards: graders of a response against a reference answer, and reward shaping."""

from megatron_rpg.rewards.exact import exact_match
from megatron_rpg.rewards.shaping import overlong_penalty, task_reward

__all__ = ["exact_match", "overlong_penalty", "task_reward"]
