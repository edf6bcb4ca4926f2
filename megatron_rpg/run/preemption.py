"""Stopping at a safe point: on a scheduler's signal, SIGUSR1 (slurm/common.sh forwards Slurm's
warning before a time limit or preemption) or SIGTERM, or before a time limit. The handlers only
record the signal, from the moment this object exists (create it first thing in a rank: a signal
while the model builds is kept, not fatal); the ranks agree where the run can stop, and the
trainer checkpoints there.

    stop = StopSignals()                       # installs the handlers (main thread only)
    ...
    reason = stop.check(limit_minutes, next_seconds)   # collective: None, or why to stop

When the run stops early, `mark_stopped_early` writes the file named by MRPG_STOPPED_EARLY_FILE
(if set): slurm/common.sh requeues the job when it exists.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STOPPED_EARLY_FILE = "MRPG_STOPPED_EARLY_FILE"


class StopSignals:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.received = False
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.received = True

    def check(self, limit_minutes: float = 0.0, next_seconds: float = 0.0) -> str | None:
        """Collective: "a signal" when any rank received one; "the time limit" when the next
        `next_seconds` of work would end later than `limit_minutes` (0: none) after this
        object was created, on any rank's clock; else None."""
        elapsed = time.monotonic() - self.started
        late = limit_minutes > 0 and elapsed + next_seconds > limit_minutes * 60
        flags = torch.tensor([float(self.received), float(late)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "a signal"
        return "the time limit" if flags[1] > 0 else None


def mark_stopped_early(step: int, reason: str) -> None:
    """Tell the launcher that the run stopped before its last step and can resume (rank 0)."""
    path = os.environ.get(STOPPED_EARLY_FILE)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"step {step}: {reason}\n")
