"""The loss library's config section (`loss:` in a run's YAML)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_rpg.config_schema import UNBOUNDED, Section, check


@dataclass
class LossConfig(Section):
    """Knobs of the loss library (megatron_rpg.losses; spec sections 1-5, 8).

    beta: KL coefficient; clip: 'none', 'dual' (RPG-Style Clip / PPO dual-clip) or 'truncate'
    (truncated importance weight inside the stop-gradient, RPG-REINFORCE only); eps_low/eps_high:
    ratio clip range (1 - eps_low, 1 + eps_high); dual_clip_c: dual-clip bound c > 1 (inf disables);
    agg: aggregation over tokens; kl_anchor: 'old' (pi_ref = pi_old, the paper's iterative
    reference update) or 'ref' (a separate reference model); rollout_is: truncated importance
    sampling against the rollout engine's log-probs, per 'token' or 'sequence', capped at
    rollout_is_cap; rollout_is_on_kl: the weight multiplies the whole token loss, KL included
    (true: unbiased for every anchor, docs/rpg_math.md section 5) or the policy-gradient part only
    (false: verl's placement, for parity runs; needs the KL as a term of its own);
    kl_estimate_clamp: None, or c: the fully differentiable RPG losses' per-token
    KL estimate (ufkl, urkl, rkl; fkl is not clamped) is clamped to [-c, c], as the authors'
    release does (c = 10), so its gradient is zero where the clamp is active (docs/rpg_math.md).
    """

    beta: float = 1e-4
    clip: Literal["none", "dual", "truncate"] = "dual"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float = field(default=10.0, metadata=UNBOUNDED)
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    kl_anchor: Literal["old", "ref"] = "old"
    rollout_is: Literal["none", "token", "sequence"] = "none"
    rollout_is_cap: float = field(default=2.0, metadata=UNBOUNDED)
    rollout_is_on_kl: bool = True
    kl_estimate_clamp: float | None = None

    def validate(self) -> None:
        check("beta", self.beta, self.beta >= 0 and math.isfinite(self.beta), "finite, >= 0")
        check("eps_low", self.eps_low, 0 <= self.eps_low < 1, "in [0, 1)")
        check("eps_high", self.eps_high, self.eps_high >= 0, ">= 0")
        check("dual_clip_c", self.dual_clip_c, self.dual_clip_c > 1, "> 1 (inf disables it)")
        check("rollout_is_cap", self.rollout_is_cap, self.rollout_is_cap > 0, "> 0 (inf allowed)")
        clamp = self.kl_estimate_clamp
        check("kl_estimate_clamp", clamp, clamp is None or clamp > 0, "null (off) or > 0")
