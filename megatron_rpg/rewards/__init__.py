"""Rewards: graders of a response against a reference answer."""

from megatron_rpg.rewards.exact import exact_match

__all__ = ["exact_match"]
