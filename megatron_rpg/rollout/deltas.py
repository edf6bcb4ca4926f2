"""Weight deltas for remote engines: a source sends only the elements of a bucket that changed
since its last sync, and both sides check, per sync, that they hold the same bytes.

    sent = send_delta(group, flat, base)      # source (group rank 0); base: what it last sent
    receive_delta(group, base)                # each worker; base: what it last received

On the wire, per bucket: a count c (int64); c = -1: the whole bucket follows (dense, when a
sparse patch would not be smaller: c x (4 + itemsize) >= the bucket's bytes); c >= 0: c flat
indices (int32) and their c values, as vLLM's `sparse_nccl` patches (flat indices and values,
but into the source's own bucket rather than an HF tensor). "Changed" is bitwise: a value
that rounds to the same bits is not sent.

The checksum of a source's buckets is sum_i w_i (the bytes read as int32, or int16 for 2-byte
types, summed in int64): any single changed element moves it. After a sync every worker
gathers its checksum of each source with the source's own (`agree`); one that differs means
the engine does not hold what the trainer thinks it sent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

INDEX = torch.int32


def _words(flat: Tensor) -> Tensor:
    """The bytes of a flat tensor as integers of its width (for bitwise comparison and sums)."""
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return flat.view(width)


def checksum(flats: list[Tensor]) -> int:
    return sum(int(_words(f).sum(dtype=torch.int64)) for f in flats)


def broadcast(group: Any, tensor: Tensor) -> None:
    """Broadcast from rank 0 of `group` (a gloo group; CPU tensors)."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send_delta(group: Any, flat: Tensor, base: Tensor) -> int:
    """Send what changed from `base` to `flat` (both CPU, one dtype), then make base = flat.
    Returns the bytes sent."""
    changed = (_words(flat) != _words(base)).nonzero().flatten()
    count = changed.numel()
    sparse_bytes = count * (INDEX.itemsize + flat.element_size())
    if sparse_bytes >= flat.numel() * flat.element_size():
        broadcast(group, torch.tensor([-1]))
        broadcast(group, flat)
        base.copy_(flat)
        return 8 + flat.numel() * flat.element_size()
    broadcast(group, torch.tensor([count]))
    if count:
        values = flat[changed]
        broadcast(group, changed.to(INDEX))
        broadcast(group, values)
        base[changed] = values
    return 8 + sparse_bytes


def receive_delta(group: Any, base: Tensor) -> None:
    """Apply the delta a source sends (send_delta) to `base`, in place."""
    header = torch.empty(1, dtype=torch.int64)
    broadcast(group, header)
    count = int(header)
    if count == -1:
        broadcast(group, base)
    elif count > 0:
        indices = torch.empty(count, dtype=INDEX)
        values = torch.empty(count, dtype=base.dtype)
        broadcast(group, indices)
        broadcast(group, values)
        base[indices.long()] = values


def agree(group: Any, value: int) -> list[int]:
    """The checksums to compare: the source (group rank 0) broadcasts its own, then gathers
    every member's, so it returns all of them; a worker returns [the source's, its own].
    Every message goes between the source and one worker, none between workers."""
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64)
    source = mine.clone()
    broadcast(group, source)
    options = dist.GatherOptions()
    options.rootRank = 0
    if group.rank() != 0:
        group.gather([], [mine], options).wait()
        return [int(source), value]
    gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size())]
    group.gather([gathered], [mine], options).wait()
    return [int(t) for t in gathered]
