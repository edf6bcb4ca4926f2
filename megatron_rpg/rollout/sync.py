"""Weight sync: the policy's export stream into a rollout engine, in the layout the engine
takes (full tensors, or each rank's own shards: models/export.py).

    stats = sync_weights(chunks, arch, engine if rank == 0 else None)

Collective over the trainer's world: every rank walks the stream (its TP all-gathers and PP
broadcasts, where its layout has them), the ranks holding an engine feed it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from megatron_rpg.models import ModelArch
from megatron_rpg.models.export import FULL, iter_hf_weights
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.rollout.protocol import RolloutEngine


@dataclass(frozen=True)
class SyncStats:
    bytes: int  # what this rank handed to its engine (or sent to the remote one)
    seconds: float


def sync_weights(
    model_chunks: list[Any],
    arch: ModelArch,
    engine: RolloutEngine | None,
    bucket_bytes: int = 512 * 2**20,
    groups: ProcessGroups | None = None,
) -> SyncStats:
    start = time.perf_counter()
    groups = groups or ProcessGroups.current()
    layout = engine.weight_layout(groups) if engine is not None else FULL
    stream = iter_hf_weights(model_chunks, arch, bucket_bytes, groups, layout)
    if engine is None:
        nbytes = sum(t.numel() * t.element_size() for _, t in stream)
    else:
        nbytes = engine.update_weights(stream)
    return SyncStats(nbytes, time.perf_counter() - start)
