"""The iterative reference update of spec section 6, after a step: pi_ref <- pi_theta every
`interval` optimizer steps (0: never), or when the moving-average KL(pi_theta || pi_ref)

    kl_average <- 0.9 kl_average + 0.1 kl_step

exceeds `kl_target` (0: off); the average restarts at 0 after an update. A checkpoint component
(Stateful: the average)."""

from __future__ import annotations

from typing import Any

from megatron_rpg.models import ReferenceModel

KL_AVERAGE_DECAY = 0.9


def reference_update_due(
    optimizer_steps: int, interval: int, kl_average: float, kl_target: float
) -> bool:
    every = interval > 0 and optimizer_steps % interval == 0
    return every or (kl_target > 0 and kl_average > kl_target)


class ReferenceSchedule:
    def __init__(self, reference: ReferenceModel | None, interval: int, kl_target: float):
        self.reference, self.interval, self.kl_target = reference, interval, kl_target
        self.kl_average = 0.0

    def after_step(self, policy: list[Any], optimizer_steps: int, kl: float) -> None:
        """Average the step's KL and copy the policy into the reference when due (no reference,
        kl_anchor 'old': the anchor is pi_old, updated every step by construction)."""
        self.kl_average = KL_AVERAGE_DECAY * self.kl_average + (1 - KL_AVERAGE_DECAY) * kl
        if self.reference is None:
            return
        if reference_update_due(optimizer_steps, self.interval, self.kl_average, self.kl_target):
            self.reference.update_reference(policy)
            self.kl_average = 0.0

    def restart_from(self, policy: list[Any]) -> None:
        """pi_ref <- pi_theta now (after the supervised warm-up), if there is a reference."""
        if self.reference is not None:
            self.reference.update_reference(policy)

    def state_dict(self) -> dict[str, Any]:
        return {"kl_average": self.kl_average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_average = state["kl_average"]
