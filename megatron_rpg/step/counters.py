"""The run's counters, a checkpoint component (Stateful: state_dict / load_state_dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RunCounters:
    step: int = 0  # RL steps done
    data_position: int = 0  # prompts consumed (more than steps x prompts with DAPO)
    skipped_steps: int = 0  # optimizer steps skipped as non-finite

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.data_position = state["step"], state["data_position"]
        self.skipped_steps = state["skipped_steps"]
