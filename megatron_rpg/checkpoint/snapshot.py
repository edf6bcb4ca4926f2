"""The rank's training state at the start of an update, in host memory, to put back when the
update is stopped part-way (a signal between two of its optimizer steps).

    snapshot = UpdateSnapshot.take(policy, optimizer, scheduler)
    ...  # optimizer steps
    snapshot.restore()          # weights, optimizer and scheduler as they were at take()

What is copied: every model parameter (the weights the forward pass reads), and for each of
Megatron's optimizers (a ChainedOptimizer's parts, or the one) the tensors its torch optimizer
updates: the parameters of its param groups (the fp32 main copies, or their distributed shards)
and every entry of its per-parameter state (Adam's moments and step); plus the scheduler's
step count (its load_state_dict adds to the live count instead of setting it). Restoring copies
in place, so the tensors keep their identity (DDP's buffers, the optimizer's references); state
created after take() (a first step's Adam moments) is dropped.
Host memory: the weights plus the optimizer's share, per rank (18 GB per GPU for the 70B recipe,
docs/scaling.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [part.optimizer for part in parts]


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value


@dataclass
class UpdateSnapshot:
    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its copy)
    states: list[tuple[Any, dict[Any, dict[str, Any]]]]  # (live state, its copy)
    scheduler: Any  # Megatron's OptimizerParamScheduler
    scheduler_steps: int

    @classmethod
    def take(cls, policy: list[Any], optimizer: Any, scheduler: Any) -> UpdateSnapshot:
        live = [p for chunk in policy for p in chunk.parameters()]
        states = []
        for torch_optimizer in _torch_optimizers(optimizer):
            live += [p for group in torch_optimizer.param_groups for p in group["params"]]
            state = torch_optimizer.state
            states.append(
                (state, {p: {k: _host_copy(v) for k, v in s.items()} for p, s in state.items()})
            )
        unique = list({id(t): t for t in live}.values())
        return cls([(t, _host_copy(t)) for t in unique], states, scheduler, scheduler.num_steps)

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, copy in self.tensors:
            tensor.copy_(copy)
        for state, saved in self.states:
            for param in [p for p in state if p not in saved]:
                del state[param]
            for param, entries in saved.items():
                for key, value in entries.items():
                    if torch.is_tensor(value):
                        state[param][key].copy_(value)
                    else:
                        state[param][key] = value
        self.scheduler.num_steps = self.scheduler_steps
        self.scheduler.step(0)  # the param groups' lr and weight decay of that step
