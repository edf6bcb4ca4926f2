"""Run functions on N spawned gloo ranks on one machine: tests, benchmarks, CPU examples.

    with RankPool(world_size=2) as pool:       # ranks start once (a spawn costs seconds here)
        results = pool.run(fn, arg)            # fn(arg) on every rank -> [result_rank0, ...]
        more = pool.run(other_fn)              # many cases on the same ranks

`fn` must be importable by name (a module-level function). `run` waits as long as the ranks
live (`timeout_s` bounds each collective, in the ranks' process group, not the function: a
training run takes hours). If a rank raises, `run` raises `RankError` carrying that rank's
traceback; ranks left waiting in a collective with it are killed after `error_grace_s`, a rank
that dies without a result (out of memory, a signal) is named, and the pool restarts on the
next `run`. After each function, Megatron's parallel state is destroyed so
the next case may use another layout.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp


def threads_per_rank(world_size: int) -> int:
    """Ranks on one machine share its cores: each gets an equal share (at least one thread), so
    that together they do not oversubscribe it and a single rank uses them all."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Torch threads on every core this process may run on, for work that one rank does while
    the others wait in a collective (which blocks without computing): spawned ranks run with
    their share of the cores (threads_per_rank)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank(1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RankError(RuntimeError):
    def __init__(self, rank: int, remote_traceback: str):
        self.rank, self.remote_traceback = rank, remote_traceback
        super().__init__(f"rank {rank} raised:\n{remote_traceback}")


def free_port() -> int:
    """A TCP port free on every interface of this machine (a rendezvous, a transfer group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


PR_SET_PDEATHSIG = 1  # linux/prctl.h
LIVENESS_POLL_S = 1.0  # how often run() checks that the ranks it waits for are alive


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this rank when the process that spawned it dies (killed, crashed): the
    parent holds the run directory's lock, and a rank outliving it would go on writing into a
    directory that the next run may already be using. A half-written checkpoint is never used
    (no COMPLETE marker) and a torn metrics line is dropped on resume. To stop ranks gracefully
    (a checkpoint first), signal the parent: `RankPool.signal` forwards it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _next_task(tasks: Any, parent: int) -> Any:
    """The next task; None (stop) once the parent is gone, so no rank waits for it forever."""
    while os.getppid() == parent:
        with contextlib.suppress(queue.Empty):
            return tasks.get(timeout=1.0)
    return None


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    tasks: Any,
    results: Any,
    parent: int,
) -> None:
    import torch.distributed as dist

    from megatron_rpg.parallel.distributed import destroy_model_parallel

    _die_with_parent(parent)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads_per_rank(world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    while (task := _next_task(tasks, parent)) is not None:
        fn, args, kwargs = task
        try:
            # Pickle here: an unpicklable result would otherwise fail silently in the queue's
            # feeder thread and leave the parent waiting.
            results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            destroy_model_parallel()
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, timeout_s: float = 300.0, error_grace_s: float = 10.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size, self.timeout_s, self.error_grace_s = world_size, timeout_s, error_grace_s
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.world_size,
                    port,
                    self.timeout_s,
                    self._tasks[r],
                    self._results,
                    os.getpid(),
                ),
                daemon=False,  # ranks may fork (dist_checkpointing's writers); atexit kills them
            )
            for r in range(self.world_size)
        ]
        started = []
        try:
            for p in self._procs:
                p.start()
                started.append(p)
        except BaseException:  # e.g. a script without `if __name__ == "__main__":`
            self._procs = started
            self.close(force=True)
            raise
        atexit.register(self.close, force=True)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call fn(*args, **kwargs) on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        error: RankError | None = None
        grace_ends = None  # set when a rank fails: the others get error_grace_s to answer
        while len(results) < self.world_size:
            try:
                rank, ok, payload = self._results.get(timeout=LIVENESS_POLL_S)
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results
                ]
                waited_out = grace_ends is not None and time.monotonic() > grace_ends
                if not dead and not waited_out:
                    continue  # as long as it takes: a stuck collective times out in the rank
                self.close(force=True)
                if error is not None:
                    raise error from None
                raise RankError(
                    dead[0],
                    f"ranks {dead} died without a result (killed: out of memory, a signal?)",
                ) from None
            results[rank] = pickle.loads(payload) if ok else payload
            if not ok and error is None:
                error = RankError(rank, payload)
                grace_ends = time.monotonic() + self.error_grace_s  # others may be stuck
                # in a collective with this rank
        if error is not None:
            raise error
        return [results[r] for r in range(self.world_size)]

    def signal(self, signum: int) -> None:
        """Send `signum` to every live rank (SIGTERM: the trainer checkpoints and returns)."""
        for p in self._procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    def close(self, force: bool = False) -> None:
        """Stop the ranks: politely (finish, leave the group) or, with force, at once."""
        if self._procs and not force:
            for q in self._tasks:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.kill()
                p.join()
        atexit.unregister(self.close)
        self._procs = []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """One-off: spawn `world_size` gloo ranks, run fn on each, return the results."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, **kwargs)
