"""Several `vllm serve`s (one per engine node) driven as one engine by VLLMServerEngine.

    urls = parse_server_urls("http://10.0.0.7:8000,http://10.0.0.8:8000")   # rollout.server_url
    client = FleetSyncClient([HTTPVLLMWeightSyncClient(u) for u in urls], workers=[8, 8])

A weight-transfer group joins a trainer rank (group rank 0: rank 0 over vLLM's nccl, each
source over mrpg_gloo, a group each) and every worker of every server: server k's workers take
the ranks after those of servers 0..k-1, so with W_j workers on server j, server k's rank
offset is 1 + W_0 + ... + W_{k-1} and a group has 1 + sum_j W_j ranks.
Each control call of a sync goes to all servers at once (their workers block in the same
collective) and returns when all have answered; the first failure is raised at once, naming
its server, instead of waiting on the others, which would block in the broadcast.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from typing import Any


def parse_server_urls(value: str) -> list[str]:
    """rollout.server_url: one URL or several, comma-separated (no trailing slashes kept)."""
    return [url.strip().rstrip("/") for url in value.split(",") if url.strip()]


def fan_out(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every call at once; their results in order, or the first exception as soon as one
    fails (the threads of the others are left to their own timeouts)."""
    pool = ThreadPoolExecutor(max_workers=max(len(calls), 1))
    try:
        futures = [pool.submit(call) for call in calls]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]  # checked just above
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False)


class FleetSyncClient:
    """vLLM's weight-sync client protocol (init, start, update, finish) over one HTTP client
    per server; `init_weight_transfer_engine` shifts each server's rank offset (module doc)."""

    def __init__(self, clients: Sequence[Any], workers: Sequence[int]):
        if len(clients) != len(workers):
            raise ValueError(f"{len(clients)} servers but {len(workers)} worker counts")
        self.clients = list(clients)
        self.offsets = list(itertools.accumulate([0, *workers[:-1]]))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        first = init_info["rank_offset"]
        fan_out(
            [
                partial(c.init_weight_transfer_engine, {**init_info, "rank_offset": first + o})
                for c, o in zip(self.clients, self.offsets, strict=True)
            ]
        )

    def start_weight_update(self) -> None:
        fan_out([c.start_weight_update for c in self.clients])

    def update_weights(self, update_info: Any) -> None:
        fan_out([partial(c.update_weights, update_info) for c in self.clients])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        fan_out([partial(c.finish_weight_update, weight_version) for c in self.clients])
