"""The rollout engine seen from every rank of a run: each rank gets the same responses and the
same grades, so that every rank runs the step's loop (step/collect.py) in lockstep.

A colocated vLLM engine is collective itself (each rank's engine samples its share). The embedded
engine and a vLLM server are driven by rank 0, which broadcasts what they return, and broadcasts a
failure too, so that no rank waits in a collective for an answer that will not come. Grading runs
on rank 0 and is broadcast the same way.

While rank 0 generates or grades (minutes, at scale), the other ranks do not wait inside a
collective, where the process group's timeout (and NCCL's watchdog) would end the job: they poll
a key in the job's store, which rank 0 sets when its answer is ready, and only then join the
broadcast.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch.distributed as dist

from megatron_rpg.parallel import every_core
from megatron_rpg.rollout.protocol import EngineError, Response, SamplingParams

T = TypeVar("T")


def collective_generate(
    engine: Any, rank: int, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> list[list[Response]]:
    """`generate` on every rank (collective) over this rank's engine (None off rank 0 when the
    engine is not colocated): every rank returns the same response groups."""
    if engine is not None and engine.collective:
        response_groups: list[list[Response]] = engine.generate(prompts, params)
        return response_groups
    payload: list[Any] = [None]
    failure: Exception | None = None
    with rank0_answers():
        if rank == 0:
            try:
                with every_core():  # the other ranks poll the store meanwhile
                    payload = [(engine.generate(prompts, params), None)]
            except Exception as err:
                failure, payload = err, [(None, f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0)
    response_groups, error = payload[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise EngineError(f"rank 0's rollout engine failed: {error}")
    return cast(list[list[Response]], response_groups)


def on_rank0(compute: Callable[[], T]) -> T:
    """Collective: compute() on rank 0, its result on every rank."""
    with rank0_answers():
        payload: list[Any] = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return cast(T, payload[0])


POLL_MAX_S = 0.1  # the longest pause between two looks at the store
_answers = itertools.count()  # every rank counts its answers alike: the n-th has key n


@contextlib.contextmanager
def rank0_answers() -> Iterator[None]:
    """Around rank 0's long work: on exit rank 0 sets the next answer's key in the default
    store (on failure too); the other ranks poll it (store.check, no timeout: a rollout takes as
    long as it takes), so the collective after this finds rank 0 ready."""
    key = f"mrpg/rank0_answer/{next(_answers)}"
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        try:
            yield
        finally:
            store.set(key, "1")
        return
    yield
    pause = 0.001
    while not store.check([key]):
        time.sleep(pause)
        pause = min(2 * pause, POLL_MAX_S)
