"""Weight-transfer backends for vLLM that need no CUDA: the same four-phase protocol as vLLM's
own nccl / ipc engines (init once; start -> update_weights -> finish per sync), on both sides.

    mrpg_local   the engine lives in the trainer's process (vLLM's `external_launcher`: one
                 engine per group of trainer ranks). Every rank hands the tensors of the export
                 stream to its own engine by reference, not copied: full HF tensors, whose TP
                 shard the engine's loaders cut, or, where the engine has the trainer's TP
                 layout, the rank's own shards (`tp_shards`), which they take as they are. No
                 bytes cross a process boundary.
    mrpg_gloo    the engine is another process (`vllm serve`, other nodes). Every trainer rank
                 of DP replica 0 is a source: it and every engine worker form a gloo group of
                 their own (all meet in a TCPStore on trainer rank 0), and it broadcasts its own
                 shards of its stage's buckets (models/export.py: own_shards), one flat buffer
                 each; the workers join the shards into HF tensors. Nothing is gathered on the
                 trainer and no rank funnels another's bytes: each sends about the model's
                 bytes / (TP x PP).

Both load through vLLM's layerwise reload (start/finish), as the nccl engine does, so what
runs here is the GPU path but for the transport. vLLM finds them through the
`vllm.general_plugins` entry point (`register`), in every process it starts.

Receive buffers are never reused within an update: the layerwise reload keeps the tensors of a
layer until all of that layer has arrived, which can be in the next bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer import (
    ParamMeta,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from megatron_rpg.rollout.deltas import agree, broadcast, checksum, receive_delta, send_delta
from megatron_rpg.rollout.protocol import EngineError

LOCAL, GLOO = "mrpg_local", "mrpg_gloo"
Bucket = list[tuple[str, torch.Tensor]]


class _ExpectedNotices(logging.Filter):
    """The layerwise reload warns "<layer>: Failed to load weights" at every sync for layers
    that have nothing to load: the rotary cos/sin cache, and a tied lm_head (its weight is the
    embedding's, which arrives; see reprocess_shared_weights). Drop those two, keep the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            args
            and args[0] in ("RotaryEmbedding", "ParallelLMHead")
            and "Failed to load weights" in str(record.msg)
        )


def register() -> None:
    """The `vllm.general_plugins` entry point: make both backends known in this process."""
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _ExpectedNotices) for f in layerwise.filters):
        layerwise.addFilter(_ExpectedNotices())
    for name, worker, trainer in [
        (LOCAL, "LocalWeightTransferEngine", "LocalTrainerEngine"),
        (GLOO, "GlooWeightTransferEngine", "GlooTrainerEngine"),
    ]:
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, __name__, worker)
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, __name__, trainer)


class BucketSource(WeightSource):
    """The trainer's export stream as a vLLM WeightSource that also yields whole buckets.

    `bucket_metadata` (per bucket: name, dtype, shape) is known before any data moves;
    `buckets()` yields each bucket's (name, tensor) pairs. Both are collective over the
    trainer's ranks (the stream's TP all-gathers and PP broadcasts)."""

    def __init__(self, stream: Any):
        self.stream = stream

    @property
    def bucket_metadata(self) -> list[list[ParamMeta]]:
        return [
            [ParamMeta(n, d, s) for n, s, d in bucket] for bucket in self.stream.bucket_metadata
        ]

    def metadata(self) -> list[ParamMeta]:
        return [m for bucket in self.bucket_metadata for m in bucket]

    def buckets(self) -> Iterator[Bucket]:
        return self.stream.buckets()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            yield from bucket


# ------------------------------------------------------------------------------ worker side


class _LayerwiseEngine(WeightTransferEngine):
    """Start/finish as vLLM's nccl engine: buffer a layer's tensors until it is complete, then
    process and copy into the original storage (CUDA graphs stay valid). With `tp_shards` the
    tensor-parallel linear layers receive this rank's shards (see take_tp_shards)."""

    tp_shards = False

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._undo = take_tp_shards(self.model) if self.tp_shards else []

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        for param, attribute, value in self._undo:
            setattr(param, attribute, value)
        self._undo = []
        reprocess_shared_weights(self.model)

    def load(self, weights: Bucket) -> None:
        """The model's own loader: HF names, full tensors in the engine's dtype (an fp32 trainer
        feeds a bf16 engine); it takes this rank's TP shard."""
        dtype = self.model_config.dtype
        cast(Any, self.model).load_weights(
            [(n, t.to(dtype) if t.is_floating_point() else t) for n, t in weights]
        )

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # vLLM's base uses torch.accelerator, absent on CPUs


def take_tp_shards(model: torch.nn.Module) -> list[tuple[Any, str, Any]]:
    """Make the loaders of every tensor-parallel linear layer take what they receive as this
    rank's shard instead of cutting it from a full tensor: vLLM's `is_sharded_weight` for the
    plain parameters (v1 loaders), rank 0's offset for its v2 parameters (which cut at
    `param.tp_rank` x the shard size). Call after initialize_layerwise_reload: the parameters it
    puts in place are the ones the reload loads. Returns (parameter, attribute, old value) to
    restore on those that outlive the reload (a bias stays in place)."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.parameter import BasevLLMParameter

    undo: list[tuple[Any, str, Any]] = []
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear) or module.tp_size < 2:
            continue
        for param in module._parameters.values():
            if isinstance(param, BasevLLMParameter):
                undo.append((param, "tp_rank", param.tp_rank))
                param.tp_rank = 0
            elif param is not None:
                undo.append(
                    (param, "is_sharded_weight", getattr(param, "is_sharded_weight", False))
                )
                setattr(param, "is_sharded_weight", True)  # noqa: B010 (read by vLLM)
    return undo


def reprocess_shared_weights(model: torch.nn.Module) -> None:
    """Re-run weight processing on layers that share their weight with another layer (a tied
    lm_head). Such a layer receives no tensor of its own in a reload, so the layerwise reload
    leaves it unprocessed, and vLLM's CPU linear layers compute from a packed copy of the
    weight made when it was processed: the lm_head would keep sampling with the old values."""
    sharing: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and getattr(module, "quant_method", None) is not None:
            sharing.setdefault(id(weight), []).append(module)
    for modules in sharing.values():
        if len(modules) > 1:
            for module in modules:
                cast(Any, module).quant_method.process_weights_after_loading(module)


@dataclass
class LocalInitInfo(WeightTransferInitInfo):
    tp_shards: bool = False  # the tensor-parallel layers receive this rank's own shards
    tp_rank: int = 0  # the trainer's TP rank, which must be the engine's (tp_shards)
    tp_size: int = 1


@dataclass
class LocalUpdateInfo(WeightTransferUpdateInfo):
    weights: list[tuple[str, torch.Tensor]]


class LocalWeightTransferEngine(_LayerwiseEngine):
    """Worker side of mrpg_local: tensors arrive by reference (in-process executor only)."""

    init_info_cls = LocalInitInfo
    update_info_cls = LocalUpdateInfo

    def init_transfer_engine(self, init_info: LocalInitInfo) -> None:
        """Nothing to open: the trainer is this process. With tp_shards, check that the engine
        holds the trainer's TP layout."""
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        if init_info.tp_shards:
            mine = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
            if mine != (init_info.tp_rank, init_info.tp_size):
                raise ValueError(
                    f"weight transfer {LOCAL!r}: the trainer sends TP shard {init_info.tp_rank} "
                    f"of {init_info.tp_size}, the engine holds shard {mine[0]} of {mine[1]}"
                )
        self.tp_shards = init_info.tp_shards

    def receive_weights(self, update_info: LocalUpdateInfo) -> None:
        weights = []
        for name, tensor in update_info.weights:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"weight transfer {LOCAL!r} received {name!r} as {type(tensor).__name__}: "
                    "it needs the engine in the trainer's process (external_launcher)"
                )
            # by reference: the export stream's tensors stay valid through the sync (a fresh
            # buffer per bucket, or the parameters themselves); load() casts and copies
            weights.append((name, tensor.to(self.device)))
        self.load(weights)

    def shutdown(self) -> None:
        """Nothing to close."""


@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str  # trainer rank 0's: it hosts the store every group meets in
    master_port: int
    rank_offset: int  # this engine's first worker in each group (rank 0 is the source)
    world_size: int  # of each group: 1 + every worker of every engine
    sources: int = 1  # the trainer ranks that send, one group each
    deltas: bool = False  # keep what each source sent: syncs may be deltas, checksums agreed
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One sync's stream as the sources send it (models/export.py, own_shards): per tensor its
    shape as sent (a TP shard's, or whole), its full HF shape and the dim its shards join along
    (-1: whole, sent by TP rank 0 only); per bucket its size and owning stage. The source of
    stage s, TP rank r is s x tensor_parallel + r."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    full_shapes: list[list[int]]
    splits: list[int]
    bucket_sizes: list[int]  # tensors per bucket, in order
    bucket_stages: list[int]
    tensor_parallel: int = 1
    delta: bool = False  # each source sends what changed since the last sync (deltas.py)

    def __post_init__(self) -> None:
        n = len(self.names)
        lengths = [len(x) for x in (self.dtype_names, self.shapes, self.full_shapes, self.splits)]
        if lengths != [n] * 4 or sum(self.bucket_sizes) != n:
            raise ValueError(
                f"update_info: {n} names, {lengths} dtypes, shapes, full shapes and splits, "
                f"buckets of {sum(self.bucket_sizes)} tensors in all"
            )
        if len(self.bucket_stages) != len(self.bucket_sizes):
            raise ValueError(
                f"update_info: {len(self.bucket_sizes)} buckets, {len(self.bucket_stages)} stages"
            )

    def sent_by(self, bucket: range, tp_rank: int) -> list[int]:
        """The tensors of `bucket` that TP rank `tp_rank` of its stage sends, in order."""
        return [i for i in bucket if self.splits[i] >= 0 or tp_rank == 0]


def weight_store(address: str, port: int, host: bool, timeout_s: float) -> Any:
    """The store the transfer groups meet in (hosted by trainer rank 0)."""
    return dist.TCPStore(
        address,
        port,
        is_master=host,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def source_group(store: Any, source: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """The gloo group of trainer source `source` (its rank 0) and every engine worker, outside
    torch.distributed's world, so that an engine and a trainer with worlds of their own can
    join it."""
    prefixed = dist.PrefixStore(f"mrpg_weights/{source}", store)
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timedelta(seconds=timeout_s))


class GlooWeightTransferEngine(_LayerwiseEngine):
    """Worker side of mrpg_gloo: every trainer source sends its own shards of each of its
    stage's buckets in one broadcast, in its own group; the worker joins each tensor's shards
    (cut to its HF shape: Megatron pads the vocabulary) and loads the bucket. It holds the
    bucket's shards and the joined tensors, about two buckets, beyond vLLM's own buffers.

    With deltas it keeps every source's buckets as last received (host memory: the model,
    once), applies each delta to them, loads every bucket (the layerwise reload needs whole
    layers: deltas cut the bytes on the wire, not the load), then agrees a checksum with each
    source; a disagreement leaves `verified` False, and the trainer re-sends everything."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.groups: list[Any] = []
        self.store: Any = None
        self.deltas, self.verified = False, True
        self.received: dict[tuple[int, int], torch.Tensor] = {}  # (bucket, TP rank) -> flat

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        info = init_info
        store = weight_store(info.master_address, info.master_port, False, info.timeout_s)
        self.store = store
        self.groups = [
            source_group(store, k, rank, info.world_size, info.timeout_s)
            for k in range(info.sources)
        ]
        self.deltas, self.received = info.deltas, {}

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if not self.groups:
            raise RuntimeError(f"weight transfer {GLOO!r}: init_weight_transfer_engine first")
        info, start, tp = update_info, 0, update_info.tensor_parallel
        if info.delta and not self.deltas:
            raise ValueError(f"weight transfer {GLOO!r}: a delta to an engine that keeps none")
        for b, (size, stage) in enumerate(zip(info.bucket_sizes, info.bucket_stages, strict=True)):
            bucket = range(start, start + size)
            start += size
            dtypes = {info.dtype_names[i] for i in bucket}
            if len(dtypes) != 1:
                raise ValueError(f"a bucket mixes dtypes {sorted(dtypes)}")
            dtype = getattr(torch, dtypes.pop())
            parts: dict[int, list[torch.Tensor]] = {i: [] for i in bucket}
            for tp_rank in range(tp):
                sent = info.sent_by(bucket, tp_rank)
                if not sent:
                    continue
                numels = [int(torch.Size(info.shapes[i]).numel()) for i in sent]
                group = self.groups[stage * tp + tp_rank]
                if info.delta:
                    flat = self.received[b, tp_rank]
                    receive_delta(group, flat)
                else:
                    flat = torch.empty(sum(numels), dtype=dtype)
                    broadcast(group, flat)
                    if self.deltas:
                        self.received[b, tp_rank] = flat
                for i, view in zip(sent, flat.split(numels), strict=True):
                    parts[i].append(view.view(info.shapes[i]))
            self.load([(info.names[i], self._joined(info, i, parts[i])) for i in bucket])
        if self.deltas:
            self.verified = self._agree(info)

    def _agree(self, info: GlooUpdateInfo) -> bool:
        """Gather each source's checksum with ours, source by source; True if all agree."""
        tp, agreed = info.tensor_parallel, True
        for source, group in enumerate(self.groups):
            flats = [
                flat
                for (b, tp_rank), flat in sorted(self.received.items())
                if info.bucket_stages[b] * tp + tp_rank == source
            ]
            values = agree(group, checksum(flats))
            agreed &= len(set(values)) == 1
        return agreed

    def _joined(self, info: GlooUpdateInfo, i: int, parts: list[torch.Tensor]) -> torch.Tensor:
        split = info.splits[i]
        if split < 0:
            return parts[0].to(self.device)
        whole = torch.cat(parts, split).narrow(split, 0, info.full_shapes[i][split])
        if list(whole.shape) != info.full_shapes[i]:
            raise ValueError(
                f"{info.names[i]}: joined shards of shape {list(whole.shape)}, expected "
                f"{info.full_shapes[i]}"
            )
        return whole.to(self.device)

    def shutdown(self) -> None:
        self.groups, self.store, self.received = [], None, {}


# ------------------------------------------------------------------------------ trainer side


@dataclass
class LocalTrainerInitInfo(TrainerInitInfo):
    """Every rank feeds the engine in its own process, so every rank is a sender."""

    backend: ClassVar[str] = LOCAL
    tp_shards: bool = False  # the stream's layout is tp_shards (see LocalInitInfo)
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def is_sender(self) -> bool:
        return True


class LocalTrainerEngine(TrainerWeightTransferEngine):
    init_info_cls = LocalTrainerInitInfo

    @classmethod
    def trainer_init(
        cls, init_info: LocalTrainerInitInfo, *, client: Any, source: Any = None
    ) -> LocalTrainerEngine:
        if not isinstance(source, BucketSource):
            raise TypeError(f"weight transfer {LOCAL!r} takes a BucketSource")
        worker = LocalInitInfo(init_info.tp_shards, init_info.tp_rank, init_info.tp_size)
        client.init_weight_transfer_engine(asdict(worker))
        return cls(client=client, source=source, is_sender=True)

    def send_weights(self) -> None:
        self.client.start_weight_update()
        for bucket in cast(BucketSource, self.source).buckets():
            self.client.update_weights({"weights": bucket})
        self.client.finish_weight_update()


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Every rank builds it (with the same address, port and sizes: rank 0's); `source` is this
    rank's index among the sources (None: a DP replica other than 0, which sends nothing)."""

    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int  # of each group: 1 + the engines' workers
    sources: int
    source: int | None
    full_sync_every: int = 1  # > 1: the syncs in between send deltas (deltas.py)
    timeout_s: float = 300.0


class GlooTrainerEngine(TrainerWeightTransferEngine):
    """Every source rank broadcasts its own shards of its stage's buckets in its group; rank 0
    also drives the engines (start, update_weights in a thread: an HTTP request to each
    `vllm serve`, which returns once every source's bytes have arrived, finish). No byte
    passes through rank 0 that is not its own.

    With full_sync_every = N > 1, a sync is full, then N - 1 deltas follow; each source keeps
    what it last sent (host memory: its own shards), and after every sync each source and
    every worker agree a checksum. If any disagrees, everything is sent again at once; if
    that disagrees too, EngineError. `history` lists each sync's (kind, bytes this rank sent):
    kind full, delta, or resync (a delta that failed its checksum, then a full sync)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(
        self, *, group: Any = None, store: Any = None, full_sync_every: int = 1, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.group, self.store = group, store  # rank 0's store serves every group: keep it
        self.full_sync_every = full_sync_every
        self.sent: dict[int, torch.Tensor] = {}  # own bucket -> its flat as last sent
        self.since_full: int | None = None  # syncs since the last full one (None: none yet)
        self.history: list[tuple[str, int]] = []

    @property
    def deltas(self) -> bool:
        return self.full_sync_every > 1

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: Any, source: Any = None
    ) -> GlooTrainerEngine:
        if not isinstance(source, BucketSource):
            raise TypeError(f"weight transfer {GLOO!r} takes a BucketSource")
        info = init_info
        every = info.full_sync_every
        if info.source is None:
            return cls(client=client, source=source, is_sender=False, full_sync_every=every)
        store = weight_store(info.master_address, info.master_port, info.rank == 0, info.timeout_s)
        worker_info = GlooInitInfo(
            master_address=info.master_address,
            master_port=info.master_port,
            rank_offset=1,
            world_size=info.world_size,
            sources=info.sources,
            deltas=every > 1,
            timeout_s=info.timeout_s,
        )
        if not info.is_sender:
            group = source_group(store, info.source, 0, info.world_size, info.timeout_s)
        else:
            with ThreadPoolExecutor(max_workers=1) as pool:  # both sides rendezvous together
                reply = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
                group = source_group(store, info.source, 0, info.world_size, info.timeout_s)
                reply.result()
        return cls(
            client=client,
            source=source,
            is_sender=info.is_sender,
            group=group,
            store=store,
            full_sync_every=every,
        )

    def send_weights(self) -> None:
        """Collective over the trainer's ranks (they agree on the checksums)."""
        n = self.full_sync_every
        delta = self.deltas and self.since_full is not None and self.since_full < n - 1
        nbytes, agreed = self._send(delta)
        kind = "delta" if delta else "full"
        if self.deltas and not _everyone(agreed):
            resent, agreed = self._send(False)
            kind, nbytes = "resync", nbytes + resent
            if not _everyone(agreed):
                raise EngineError(
                    f"weight transfer {GLOO!r}: the engines' checksums disagree with the "
                    "trainer's after a full sync; refusing to generate from those weights"
                )
        self.since_full = 0 if kind != "delta" else (self.since_full or 0) + 1
        self.history.append((kind, nbytes))

    def _send(self, delta: bool) -> tuple[int, bool]:
        """One pass over this rank's buckets: (bytes it sent, whether its checksum agreed with
        every worker's)."""
        source = cast(BucketSource, self.source)
        if not self.is_sender:
            return self._send_own(source, delta)
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            info = update_info(source.stream, delta)
            reply = pool.submit(self.client.update_weights, asdict(info))
            result = self._send_own(source, delta, reply)
            reply.result()
        finally:
            pool.shutdown(wait=False)  # a worker stuck in a broadcast must not hang us here
        self.client.finish_weight_update()
        return result

    def _send_own(self, source: BucketSource, delta: bool, reply: Any = None) -> tuple[int, bool]:
        """Send this rank's buckets (own_shards: its stage's, its shards), one flat each, or
        their deltas; then agree the checksum (with deltas on)."""
        stream = source.stream
        if self.group is None:  # a DP replica other than 0
            return 0, True
        mine = [b for b in stream.export_buckets if b.stage == stream.groups.pp_rank]
        first, nbytes = stream.groups.tp_rank == 0, 0
        for index, (want, bucket) in enumerate(zip(mine, source.buckets(), strict=True)):
            if reply is not None and reply.done():
                reply.result()  # the engine refused or died: say so instead of blocking
            _check_bucket([t for t in want.tensors if first or t.split is not None], bucket)
            if not bucket:
                continue
            tensors = [t for _, t in bucket]
            flat = torch.cat([t.reshape(-1).cpu() for t in tensors])
            if delta:
                nbytes += send_delta(self.group, flat, self.sent[index])
                continue
            broadcast(self.group, flat)
            nbytes += flat.numel() * flat.element_size()
            if self.deltas:
                self.sent[index] = flat
        if not self.deltas:
            return nbytes, True
        values = agree(self.group, checksum(list(self.sent.values())))
        return nbytes, len(set(values)) == 1

    def shutdown(self) -> None:
        self.group = self.store = None


def _everyone(agreed: bool) -> bool:
    """Whether every trainer rank's checksums agreed (collective over the trainer's world)."""
    flag = torch.tensor([0 if agreed else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not int(flag)


def update_info(stream: Any, delta: bool = False) -> GlooUpdateInfo:
    """The update info of an own_shards stream (models/export.py), for every worker."""
    tensors = [t for b in stream.export_buckets for t in b.tensors]
    return GlooUpdateInfo(
        names=[t.name for t in tensors],
        dtype_names=[str(t.dtype).removeprefix("torch.") for t in tensors],
        shapes=[list(t.shape) for t in tensors],
        full_shapes=[list(t.full_shape) for t in tensors],
        splits=[-1 if t.split is None else t.split for t in tensors],
        bucket_sizes=[len(b.tensors) for b in stream.export_buckets],
        bucket_stages=[b.stage for b in stream.export_buckets],
        tensor_parallel=stream.tp,
        delta=delta,
    )


def _check_bucket(want: list[Any], bucket: Bucket) -> None:
    got = [(n, t.dtype, tuple(t.shape)) for n, t in bucket]
    if got != [(m.name, m.dtype, tuple(m.shape)) for m in want]:
        raise ValueError(f"the export stream disagrees with its metadata: {got[:2]} vs {want[:2]}")
