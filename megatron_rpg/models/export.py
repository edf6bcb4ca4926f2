"""The weight export stream: a model sharded over TP x PP -> full tensors under HF names, in
buckets of bounded size. It feeds both HF checkpoint export and the rollout engines.

    for hf_name, tensor in iter_hf_weights(model_chunks, arch, bucket_bytes=512 * 2**20): ...
    iter_hf_weights(...).metadata   # [(hf_name, shape, dtype)] before any data moves

Plan, then execute. The plan (`export_plan`) lists every full Megatron tensor with its owning
pipeline stage and TP split, from metadata all-gathered once. Execution walks the plan in
buckets of at most `bucket_bytes` (one tensor larger than that travels alone), each holding
tensors of one pipeline stage: that stage's ranks all-gather their TP shards into the full tensor
(TP group), then the bucket is broadcast from the owning stage over the pipeline group. Every rank
then yields the same stream; no rank holds more than one bucket beyond its own shards. A model
on one rank (TP1 x PP1) has nothing to gather: its stream is views of the parameters themselves,
no bytes copied (the consumer copies them where they go).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpg.models.arch import ModelArch
from megatron_rpg.models.builder import unwrap
from megatron_rpg.models.hf_mapping import layer_spec_of, megatron_names, to_hf
from megatron_rpg.models.sharding import full_name, sharded_parameters, tp_join
from megatron_rpg.parallel.groups import ProcessGroup, ProcessGroups


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # full Megatron name
    shape: tuple[int, ...]  # full shape
    dtype: torch.dtype
    stage: int  # owning pipeline stage
    split: int | None  # TP partition dim
    gated: bool

    @property
    def nbytes(self) -> int:
        return (
            int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()
        )


def export_plan(
    model_chunks: list[Any], arch: ModelArch, groups: ProcessGroups
) -> list[PlannedTensor]:
    """Every full tensor of the model in HF order; one all_gather_object over the world."""
    tp, stage = groups.tp_size, groups.pp_rank
    local = {}
    for chunk in model_chunks:
        for name, param, split, gated in sharded_parameters(chunk):
            if full_name(chunk, name) != name:  # the last stage's copy of tied embeddings
                continue
            shape = list(param.shape)
            if split is not None:
                shape[split] *= tp
            local[name] = PlannedTensor(name, tuple(shape), param.dtype, stage, split, gated)
    everyone: list[dict[str, PlannedTensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, local)
    merged = {k: v for plans in everyone for k, v in plans.items()}
    names = megatron_names(arch, layer_spec_of(merged))
    missing = [n for n in names if n not in merged]
    if missing:
        raise ValueError(f"the model has no tensors {missing[:3]}... that the mapping expects")
    return [merged[n] for n in names]


def _buckets(plan: list[PlannedTensor], bucket_bytes: int) -> Iterator[list[PlannedTensor]]:
    bucket: list[PlannedTensor] = []
    size = 0
    for t in plan:
        if bucket and (size + t.nbytes > bucket_bytes or t.stage != bucket[0].stage):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.nbytes
    if bucket:
        yield bucket


def _gather_into(out: Tensor, param: Tensor, planned: PlannedTensor, group: ProcessGroup) -> None:
    """Write the full tensor of a (possibly TP-sharded) parameter into `out`: all-gathered over
    the TP group in rank order, straight into `out` when the shards are its row blocks."""
    tp = dist.get_world_size(group)
    if planned.split is None or tp == 1:
        out.copy_(param)
    elif planned.split == 0 and not planned.gated:
        dist.all_gather(list(out.chunk(tp)), param.contiguous(), group=group)
    else:
        shards = [torch.empty_like(param) for _ in range(tp)]
        dist.all_gather(shards, param.contiguous(), group=group)
        out.copy_(tp_join(shards, planned.split, planned.gated))


class WeightStream:
    """The export stream of one sync: `metadata` (every HF tensor's name, shape and dtype, known
    before any data moves: vLLM's transfer engines announce it first) and the tensors when
    iterated. Constructing it is collective (the plan); so is iterating it."""

    def __init__(
        self, model_chunks: list[Any], arch: ModelArch, bucket_bytes: int, groups: ProcessGroups
    ):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.model_chunks = [unwrap(chunk) for chunk in model_chunks]  # DDP-wrapped or not
        self.arch, self.bucket_bytes, self.groups = arch, bucket_bytes, groups
        self.plan = export_plan(self.model_chunks, arch, groups)

    @property
    def bucket_metadata(self) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """Per bucket, what `buckets()` will yield: (hf_name, shape, dtype) of each tensor."""
        return [
            [
                (hf_name, tuple(t.shape), t.dtype)
                for planned in bucket
                for hf_name, t in to_hf(
                    planned.name,
                    torch.empty(planned.shape, dtype=planned.dtype, device="meta"),
                    self.arch,
                )
            ]
            for bucket in _buckets(self.plan, self.bucket_bytes)
        ]

    @property
    def metadata(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [entry for bucket in self.bucket_metadata for entry in bucket]

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in self.metadata)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        """Yield (hf_name, full tensor) on every rank (see buckets())."""
        for bucket in self.buckets():
            yield from bucket

    @torch.no_grad()
    def buckets(self) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield each bucket's (hf_name, full tensor) pairs on every rank (see the module
        docstring). Each bucket is a fresh buffer, its tensors views of it: a consumer may keep
        them past the next bucket (vLLM's packed NCCL transfer collects views across buckets
        before concatenating them). The stream itself holds no bucket once it has moved on."""
        plan, arch = self.plan, self.arch
        params = {name: p for c in self.model_chunks for name, p, _, _ in sharded_parameters(c)}
        my_stage, pp_group = self.groups.pp_rank, self.groups.pp
        if self.groups.tp_size == 1 and dist.get_world_size(pp_group) == 1:
            for bucket in _buckets(plan, self.bucket_bytes):
                yield [
                    pair for t in bucket for pair in to_hf(t.name, params[t.name].detach(), arch)
                ]
            return
        device = next(iter(params.values())).device
        dtype = plan[0].dtype
        if any(t.dtype != dtype for t in plan):
            raise ValueError("the model's parameters must share one dtype to be exported")
        for bucket in _buckets(plan, self.bucket_bytes):
            flat = torch.empty(
                sum(t.nbytes for t in bucket) // dtype.itemsize, dtype=dtype, device=device
            )
            views, offset = [], 0
            for t in bucket:
                numel = int(torch.Size(t.shape).numel())
                views.append(flat[offset : offset + numel].view(t.shape))
                offset += numel
            if bucket[0].stage == my_stage:
                for view, t in zip(views, bucket, strict=True):
                    _gather_into(view, params[t.name].detach(), t, self.groups.tp)
            if dist.get_world_size(pp_group) > 1:
                src = dist.get_global_rank(pp_group, bucket[0].stage)
                dist.broadcast(flat, src=src, group=pp_group)
            yield [
                pair
                for view, t in zip(views, bucket, strict=True)
                for pair in to_hf(t.name, view, arch)
            ]
            del flat, views


def iter_hf_weights(
    model_chunks: list[Any],
    arch: ModelArch,
    bucket_bytes: int = 512 * 2**20,
    groups: ProcessGroups | None = None,
) -> WeightStream:
    """The export stream: iterate it for (hf_name, full tensor) on every rank (groups: the
    layout's; omitted: Megatron's current ones)."""
    return WeightStream(model_chunks, arch, bucket_bytes, groups or ProcessGroups.current())
