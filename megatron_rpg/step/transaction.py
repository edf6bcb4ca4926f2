"""The stop-safe commit of an RL step: a step either completes, or a signal abandons it with the
run's state put back to that of its start, which a resumed run repeats (sampling is seeded by
(seed, step), the data order by (seed, epoch)).

    transaction = StepTransaction(stop, counters)     # notes the RNG states and data position
    ... collect ...  transaction.check("in its rollout")   # StepAbandoned after a signal
    transaction.guard_update(policy, optimizer, scheduler)  # a host copy, when a stop may come
    ... update ...   transaction.abandon_update(...)          # puts the copy back
    transaction.commit()

What is put back: the RNG states and the data position always; weights, optimizer and LR
schedule from the host copy (checkpoint/snapshot.py) when the update was under way. The
signal is looked at only where the caller asks (`stop_requested`), never during a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_rpg.checkpoint.snapshot import UpdateSnapshot
from megatron_rpg.checkpoint.train_state import rng_state, set_rng_state
from megatron_rpg.run.preemption import StopSignals
from megatron_rpg.step.counters import RunCounters


class StepAbandoned(Exception):
    """A signal stopped a step before it was done; the run's state is that of its start."""


class StepTransaction:
    def __init__(self, stop: StopSignals | None, counters: RunCounters):
        self.stop, self.counters = stop, counters
        self.rng, self.position = rng_state(), counters.data_position
        self.snapshot: UpdateSnapshot | None = None

    @property
    def stop_requested(self) -> Callable[[], bool] | None:
        """Collective: whether any rank received a signal (None: this step is not stoppable)."""
        stop = self.stop
        return None if stop is None else (lambda: stop.check() is not None)

    def abandon(self, where: str) -> StepAbandoned:
        """Put the state back (the update's host copy too, if one was taken); the exception to
        raise."""
        if self.snapshot is not None:
            self.snapshot.restore()
        self.counters.data_position = self.position
        set_rng_state(self.rng)
        return StepAbandoned(where)

    def check(self, where: str) -> None:
        """StepAbandoned (state put back) when a signal has come."""
        asked = self.stop_requested
        if asked is not None and asked():
            raise self.abandon(where)

    def guard_update(
        self, policy: list[Any], optimizer: Any, scheduler: Any, optimizer_steps: int, enabled: bool
    ) -> Callable[[], bool] | None:
        """Before the update: with `enabled` (checkpoint.stop_in_update) and more than one
        optimizer step, a host copy to put back if a signal comes between two of them; the
        signal check to ask between optimizer steps (None: the update runs to its end)."""
        if self.stop is None or not enabled or optimizer_steps <= 1:
            return None
        self.snapshot = UpdateSnapshot.take(policy, optimizer, scheduler)
        return self.stop_requested
