"""Grading untrusted model outputs in a pool of worker processes.

    with GraderPool(workers=2, timeout_s=10, memory_mb=1024) as pool:
        scores, stats = pool.grade("math", [(response, reference), ...])

Each item runs in a spawned worker under an address-space limit (`memory_mb` beyond what the
worker holds at start). An item that exceeds `timeout_s` gets its worker killed (SIGKILL) and
replaced; one that crashes its worker likewise; an exception in the grader is caught in the
worker. All three score 0 and are counted in `stats`. Graders are named, not passed: the worker
imports them (GRADERS), and text is only ever compared or parsed, never evaluated. close() (also
at exit) kills every worker: nothing is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

GRADERS = {
    "exact": "megatron_rpg.rewards.exact:exact_match",
    "math": "megatron_rpg.rewards.math:grade_math",
    "math_last_number": "megatron_rpg.rewards.math:grade_math_last_number",
}


def _resolve(name: str) -> Any:
    module, _, attribute = GRADERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _worker(connection: Connection, memory_mb: int) -> None:
    for name in GRADERS:  # import before limiting memory (sympy alone maps ~100 MB)
        _resolve(name)
    limit = _address_space_bytes() + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        message = connection.recv()
        if message is None:
            return
        name, response, reference = message
        try:
            score, error = float(_resolve(name)(response, reference)), None
        except Exception as err:  # the grader failed on this text: 0, reported
            score, error = 0.0, f"{type(err).__name__}: {err}"[:200]
        connection.send((score, error))


class _Worker:
    def __init__(self, context: Any, memory_mb: int):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, memory_mb), daemon=True)
        self.process.start()
        child.close()
        self.item: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.connection.close()


class GraderPool:
    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024):
        if workers < 1 or timeout_s <= 0 or memory_mb < 16:
            raise ValueError(
                f"GraderPool(workers={workers}, timeout_s={timeout_s}, "
                f"memory_mb={memory_mb}): need >= 1, > 0, >= 16"
            )
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.context = mp.get_context("spawn")
        self.workers = [_Worker(self.context, memory_mb) for _ in range(workers)]
        atexit.register(self.close)

    def _replace(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = _Worker(self.context, self.memory_mb)

    def grade(
        self, grader: str, items: Sequence[tuple[str, str]]
    ) -> tuple[list[float], dict[str, Any]]:
        """Scores in item order; stats: timeouts, crashes, errors (counts) and first_error."""
        if grader not in GRADERS:
            raise ValueError(f"grader {grader!r} is not one of {sorted(GRADERS)}")
        scores = [0.0] * len(items)
        stats: dict[str, Any] = {"timeouts": 0, "crashes": 0, "errors": 0, "first_error": None}
        pending = list(range(len(items)))[::-1]
        while pending or any(w.item is not None for w in self.workers):
            for index, worker in enumerate(self.workers):
                if worker.item is None and pending:
                    item = pending.pop()
                    response, reference = items[item]
                    try:
                        worker.connection.send((grader, str(response), str(reference)))
                    except OSError:  # the worker had died (BrokenPipeError): item scores 0
                        stats["crashes"] += 1
                        self._replace(index)
                        continue
                    worker.item, worker.deadline = item, time.monotonic() + self.timeout_s
            busy: dict[Any, int] = {
                w.connection: i for i, w in enumerate(self.workers) if w.item is not None
            }
            if not busy:  # every send found a dead worker: hand out the next items
                continue
            timeout = max(
                0.0, min(self.workers[i].deadline for i in busy.values()) - time.monotonic()
            )
            for connection in wait(list(busy), timeout=timeout):
                index = busy[connection]
                worker = self.workers[index]
                try:
                    score, error = worker.connection.recv()
                except (EOFError, OSError):  # the worker died (memory limit, a crash)
                    stats["crashes"] += 1
                    self._replace(index)
                    continue
                graded, worker.item = worker.item, None
                assert graded is not None  # busy workers hold an item
                scores[graded] = score
                if error is not None:
                    stats["errors"] += 1
                    stats["first_error"] = stats["first_error"] or error
            now = time.monotonic()
            for index, worker in enumerate(self.workers):
                if worker.item is not None and now >= worker.deadline:
                    stats["timeouts"] += 1
                    self._replace(index)
        return scores, stats

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive() and worker.item is None:
                with contextlib.suppress(OSError):
                    worker.connection.send(None)
            worker.process.join(timeout=2)
            worker.kill()
        self.workers = []
        atexit.unregister(self.close)

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
