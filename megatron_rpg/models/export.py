"""The weight export stream: a model sharded over TP x PP -> tensors under HF names, in buckets
of bounded size: full tensors for HF checkpoint export, each rank's own shards for the rollout
engines that take them (WeightStream's layouts).

    for hf_name, tensor in iter_hf_weights(model_chunks, arch, bucket_bytes=512 * 2**20): ...
    iter_hf_weights(..., layout="tp_shards")   # this rank's TP shards of every tensor
    iter_hf_weights(...).metadata   # [(hf_name, shape, dtype)] before any data moves

Plan, then execute. The plan (`export_plan`) lists every full Megatron tensor with its owning
pipeline stage and TP split, from metadata all-gathered once. Execution walks the plan in
buckets of at most `bucket_bytes` of what a rank yields (one tensor larger than that travels
alone), each holding tensors of one pipeline stage: in the full layout that stage's ranks
all-gather their TP shards into the full tensor (TP group), in the shard layouts they keep
them; then the bucket is broadcast from the owning stage over the pipeline group. No rank holds
more than one bucket beyond its own shards. Where nothing moves (TP1 x PP1, or the shard
layouts on one stage) the stream is views of the parameters themselves, no bytes copied (the
consumer copies them where they go).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpg.models.arch import ModelArch
from megatron_rpg.models.builder import unwrap
from megatron_rpg.models.hf_mapping import (
    VOCAB_TENSORS,
    hf_sources,
    layer_spec_of,
    megatron_names,
    to_hf,
    to_hf_shard,
)
from megatron_rpg.models.sharding import full_name, sharded_parameters, tp_join
from megatron_rpg.parallel.groups import ProcessGroup, ProcessGroups

FULL, TP_SHARDS, OWN_SHARDS = "full", "tp_shards", "own_shards"
VLLM_VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE (tp_shards: where its shards start)
LAYOUTS = (FULL, TP_SHARDS, OWN_SHARDS)


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


@dataclass(frozen=True)
class ExportedTensor:
    """One HF tensor as a rank yields it: `shape` (a shard's in the shard layouts), the whole
    HF tensor's `full_shape`, and `split`, the dim along which the TP ranks' shards join into it
    (cut back to full_shape: Megatron pads the vocabulary), None when yielded whole."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    full_shape: tuple[int, ...]
    split: int | None

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


@dataclass(frozen=True)
class ExportBucket:
    stage: int  # the pipeline stage that owns its tensors
    planned: list[PlannedTensor]
    tensors: list[ExportedTensor]  # as TP rank 0 of a source yields them


class WeightStream:
    """The export stream of one sync: `bucket_metadata` (every HF tensor's name, shape and dtype,
    known before any data moves: vLLM's transfer engines announce it first) and the tensors when
    iterated, in one of three layouts:

        full        every rank yields every full HF tensor (the HF checkpoint, an engine with
                    another TP layout): TP all-gathers, PP broadcasts
        tp_shards   every rank yields its own TP shard of every tensor (a colocated vLLM engine
                    with the trainer's TP layout, whose loaders take them as they are): no
                    all-gather, shards broadcast over the pipeline group. The vocabulary
                    tensors go whole, as vLLM's loaders cut them: holding only this rank's
                    rows where Megatron's and vLLM's padded vocabularies agree (their shards
                    are the same rows), else gathered in the TP group
        own_shards  each rank yields only its own shards of its own stage's tensors, views of
                    its parameters (a remote engine assembles them: every rank a source); a
                    replicated tensor from TP rank 0 only, nothing from DP replicas other than 0

    Constructing it is collective (the plan); so is iterating it, but for own_shards."""

    def __init__(
        self,
        model_chunks: list[Any],
        arch: ModelArch,
        bucket_bytes: int,
        groups: ProcessGroups,
        layout: str = FULL,
    ):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        if layout not in LAYOUTS:
            raise ValueError(f"weight stream layout must be one of {LAYOUTS}, got {layout!r}")
        self.model_chunks = [unwrap(chunk) for chunk in model_chunks]  # DDP-wrapped or not
        self.arch, self.bucket_bytes, self.groups, self.layout = arch, bucket_bytes, groups, layout
        self.plan = export_plan(self.model_chunks, arch, groups)
        self.export_buckets = self._bucket_plan()

    @property
    def tp(self) -> int:
        return self.groups.tp_size

    @property
    def is_source(self) -> bool:
        """Whether this rank yields anything in the own_shards layout (DP replica 0)."""
        return dist.get_rank(self.groups.dp) == 0

    def _held(self, planned: PlannedTensor) -> bool:
        """Whether this rank yields `planned` from its own TP shard (else gathered whole)."""
        if planned.split is None or self.tp == 1 or self.layout == FULL:
            return False
        if self.layout == TP_SHARDS and planned.name in VOCAB_TENSORS:
            return planned.shape[0] == _vllm_padded(self.arch.vocab_size)
        return True

    def _whole_here(self, planned: PlannedTensor) -> bool:
        """Whether this rank yields `planned` without communication (a parameter as it is)."""
        return self.tp == 1 or planned.split is None or self._held(planned)

    def _pieces(self, planned: PlannedTensor, held: Tensor) -> list[tuple[str, Tensor]]:
        """The HF tensors (or their shards) of the Megatron tensor (or its shard) `held`."""
        if not self._held(planned):
            return to_hf(planned.name, held, self.arch)
        if planned.name in VOCAB_TENSORS:
            name = hf_sources(planned.name)[0]
            if self.layout == OWN_SHARDS:  # rows of the padded vocabulary
                return [(name, held)]
            return [(name, _placed(held, self.groups.tp_rank, self.arch.vocab_size))]
        return to_hf_shard(planned.name, held, self.arch, self.tp)

    def _held_shape(self, planned: PlannedTensor) -> tuple[int, ...]:
        shape = list(planned.shape)
        if self._held(planned):
            assert planned.split is not None
            shape[planned.split] //= self.tp
        return tuple(shape)

    def _exported(self, planned: PlannedTensor) -> list[ExportedTensor]:
        def meta(shape: tuple[int, ...]) -> Tensor:
            return torch.empty(shape, dtype=planned.dtype, device="meta")

        full = to_hf(planned.name, meta(planned.shape), self.arch)
        pieces = self._pieces(planned, meta(self._held_shape(planned)))
        return [
            ExportedTensor(
                name,
                tuple(piece.shape),
                piece.dtype,
                tuple(whole.shape),
                None if piece.shape == whole.shape else planned.split,
            )
            for (name, piece), (_, whole) in zip(pieces, full, strict=True)
        ]

    def _bucket_plan(self) -> list[ExportBucket]:
        buckets: list[ExportBucket] = []
        for planned in self.plan:
            tensors = self._exported(planned)
            size = sum(t.nbytes for t in tensors)
            last = buckets[-1] if buckets else None
            if (
                last is None
                or last.stage != planned.stage
                or sum(t.nbytes for t in last.tensors) + size > self.bucket_bytes
            ):
                buckets.append(ExportBucket(planned.stage, [], []))
            buckets[-1].planned.append(planned)
            buckets[-1].tensors.extend(tensors)
        return buckets

    @property
    def bucket_metadata(self) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """Per bucket, what `buckets()` yields: (hf_name, shape, dtype) of each tensor (the
        full layout's, or a TP rank 0's in the shard layouts: every rank's shards have the same
        shapes)."""
        return [[(t.name, t.shape, t.dtype) for t in b.tensors] for b in self.export_buckets]

    @property
    def metadata(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [entry for bucket in self.bucket_metadata for entry in bucket]

    @property
    def nbytes(self) -> int:
        """The bytes this rank yields."""
        if self.layout != OWN_SHARDS:
            return sum(t.nbytes for b in self.export_buckets for t in b.tensors)
        if not self.is_source:
            return 0
        first = self.groups.tp_rank == 0
        return sum(
            t.nbytes
            for b in self.export_buckets
            if b.stage == self.groups.pp_rank
            for t in b.tensors
            if first or t.split is not None
        )

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        """Yield (hf_name, tensor) on every rank (see buckets())."""
        for bucket in self.buckets():
            yield from bucket

    @torch.no_grad()
    def buckets(self) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield each bucket's (hf_name, tensor) pairs (see the class docstring). Each bucket
        is a fresh buffer, or views of the parameters themselves where nothing moves: a
        consumer may keep them past the next bucket (vLLM's packed NCCL transfer collects
        views across buckets before concatenating them). The stream itself holds no bucket
        once it has moved on."""
        params = {name: p for c in self.model_chunks for name, p, _, _ in sharded_parameters(c)}
        my_stage, pp_group = self.groups.pp_rank, self.groups.pp
        single_stage = dist.get_world_size(pp_group) == 1
        for bucket in self.export_buckets:
            if self.layout == OWN_SHARDS:
                if bucket.stage == my_stage and self.is_source:
                    yield self._own_shards(bucket, params)
            elif single_stage and all(self._whole_here(t) for t in bucket.planned):
                # nothing to gather: views of the parameters, no bytes copied
                yield [
                    pair
                    for t in bucket.planned
                    for pair in self._pieces(t, params[t.name].detach())
                ]
            else:
                yield self._moved(bucket, params, my_stage, pp_group)

    def _own_shards(
        self, bucket: ExportBucket, params: Mapping[str, Tensor]
    ) -> list[tuple[str, Tensor]]:
        first = self.groups.tp_rank == 0
        return [
            pair
            for t in bucket.planned
            if first or t.split is not None
            for pair in self._pieces(t, params[t.name].detach())
        ]

    def _moved(
        self, bucket: ExportBucket, params: Mapping[str, Tensor], my_stage: int, pp_group: Any
    ) -> list[tuple[str, Tensor]]:
        """The bucket's tensors gathered in the owning stage's TP groups (those yielded whole)
        and broadcast from it over the pipeline group, in one fresh flat buffer."""
        dtype = bucket.planned[0].dtype
        if any(t.dtype != dtype for t in bucket.planned):
            raise ValueError("the model's parameters must share one dtype to be exported")
        shapes = [self._held_shape(t) for t in bucket.planned]
        numels = [int(torch.Size(shape).numel()) for shape in shapes]
        device = next(iter(params.values())).device
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        views = [v.view(shape) for v, shape in zip(flat.split(numels), shapes, strict=True)]
        if bucket.stage == my_stage:
            for view, t in zip(views, bucket.planned, strict=True):
                if self._held(t):
                    view.copy_(params[t.name].detach())
                else:
                    _gather_into(view, params[t.name].detach(), t, self.groups.tp)
        if dist.get_world_size(pp_group) > 1:
            src = dist.get_global_rank(pp_group, bucket.stage)
            dist.broadcast(flat, src=src, group=pp_group)
        return [
            pair
            for view, t in zip(views, bucket.planned, strict=True)
            for pair in self._pieces(t, view)
        ]


def _vllm_padded(vocab_size: int) -> int:
    """vLLM's padded vocabulary (a multiple of its DEFAULT_VOCAB_PADDING_SIZE, 64), which it
    splits evenly over its TP ranks: where it equals Megatron's, their vocabulary shards agree."""
    return -(-vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING


def _placed(shard: Tensor, tp_rank: int, vocab_size: int) -> Tensor:
    """A vocabulary-shaped tensor holding only this TP rank's rows of a vocabulary shard (the
    rows vLLM's layer at that rank cuts out, and all it reads; the others stay unwritten, and
    on the CPU never take memory)."""
    rows = shard.shape[0]
    start = tp_rank * rows
    end = min(start + rows, vocab_size)
    full = shard.new_empty((vocab_size, *shard.shape[1:]))
    full[start:end] = shard[: max(end - start, 0)]
    return full


def iter_hf_weights(
    model_chunks: list[Any],
    arch: ModelArch,
    bucket_bytes: int = 512 * 2**20,
    groups: ProcessGroups | None = None,
    layout: str = FULL,
) -> WeightStream:
    """The export stream: iterate it for (hf_name, tensor) pairs, full tensors on every rank
    by default (see WeightStream's layouts; groups: the trainer layout's; omitted: Megatron's
    current ones)."""
    groups = groups or ProcessGroups.current()
    return WeightStream(model_chunks, arch, bucket_bytes, groups, layout)
