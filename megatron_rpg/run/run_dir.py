"""Who may write a run directory: one run at a time, and a new run never over an old one's data.

    with claimed_run_dir("runs/x", resume=False, overwrite=False):   # locked while training
        ...

A directory that holds a run (metrics.jsonl or checkpoints/) is refused to a fresh run: --resume
continues that run, --overwrite deletes its metrics and checkpoints first; anything else
(converted models, data, evaluations) stays. While a run trains, its process holds an exclusive
flock on run.lock (released by the kernel when the process dies, however it dies), and a
second run on the same directory is refused with the owner's pid and host. flock is local to
one machine: on a cluster, one launcher per run directory claims it (the node of rank 0).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from megatron_rpg.config import ConfigError

RUN_FILES = ("metrics.jsonl", "checkpoints")  # what makes a directory hold a run
LOCK = "run.lock"


def claim_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> TextIO:
    """Lock `run_dir` for this process and apply resume/overwrite; the open lock file (keep it
    open for the run's lifetime)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--overwrite", True, "not with --resume: continue the run or replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = (run_dir / LOCK).open("a+")
    except OSError as err:
        raise ConfigError(
            "logging.run_dir", str(run_dir), f"a writable directory ({err})"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        allowed = f"a directory no other run is writing ({owner} is)"
        raise ConfigError("logging.run_dir", str(run_dir), allowed) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not resume:
        if not overwrite:
            lock.close()
            raise ConfigError(
                "logging.run_dir",
                str(run_dir),
                f"a directory without a run (it holds {', '.join(held)}): "
                "--resume continues that run, --overwrite replaces it",
            )
        for name in held:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return lock


@contextlib.contextmanager
def claimed_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """claim_run_dir for the body; a directory it created that holds nothing but the lock
    afterwards (the run failed before writing anything) is removed again."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    lock = claim_run_dir(run_dir, resume, overwrite)
    try:
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            run_dir.rmdir()
        lock.close()


MARKER = "COMPLETE"  # written last into a checkpoint directory: the checkpoint is whole


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints under `directory` that carry the COMPLETE marker, oldest first
    (step_NNNNNNNN names sort by step)."""
    return sorted(p for p in Path(directory).glob("step_*") if (p / MARKER).is_file())
