"""The RPG loss library: pure tensor functions (the math: docs/rpg_math.md).

loss, metrics = policy_loss("rpg_reinforce_urkl", logprobs, old_logprobs, advantages,
                            response_mask, config=LossConfig(beta=1e-4, clip="dual"))
"""

from megatron_rpg.losses import baselines, rpg  # noqa: F401  (register the surrogates)
from megatron_rpg.losses.advantages import ESTIMATORS, compute_advantages
from megatron_rpg.losses.aggregation import (
    AGG_MODES,
    aggregate,
    count_sequences,
    count_tokens,
    token_weights,
)
from megatron_rpg.losses.config import LossConfig
from megatron_rpg.losses.kl import DIVERGENCES, k1, k2, k3
from megatron_rpg.losses.policy import (
    policy_loss,
    rollout_is_weights,
    separable_policy_loss,
    token_policy_loss,
)
from megatron_rpg.losses.registry import LOSSES, register_loss

__all__ = [
    "AGG_MODES",
    "DIVERGENCES",
    "ESTIMATORS",
    "LOSSES",
    "LossConfig",
    "aggregate",
    "compute_advantages",
    "count_sequences",
    "count_tokens",
    "k1",
    "k2",
    "k3",
    "policy_loss",
    "register_loss",
    "rollout_is_weights",
    "separable_policy_loss",
    "token_policy_loss",
    "token_weights",
]
