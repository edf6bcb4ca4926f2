"""Weight-transfer backends for vLLM that need no CUDA: the same four-phase protocol as vLLM's
own nccl / ipc engines (init once; start -> update_weights -> finish per sync), on both sides.

    mrpg_local   the engine lives in the trainer's process (vLLM's `external_launcher`: one
                 engine per group of trainer ranks). Every rank hands the tensors of the export
                 stream to its own engine by reference, not copied: full HF tensors, whose TP
                 shard the engine's loaders cut, or, where the engine has the trainer's TP
                 layout, the rank's own shards (`tp_shards`), which they take as they are. No
                 bytes cross a process boundary.
    mrpg_gloo    the engine is another process (`vllm serve`, other nodes). Trainer rank 0 and
                 every engine worker form a gloo group (TCPStore on the trainer); each bucket
                 of the export stream is one broadcast of its flat buffer.

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
    master_address: str
    master_port: int
    rank_offset: int  # the trainer is rank 0 of the group; workers follow
    world_size: int  # 1 + every worker of every engine
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_sizes: list[int]  # tensors per broadcast, in order

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.dtype_names) != n or len(self.shapes) != n or sum(self.bucket_sizes) != n:
            raise ValueError(
                f"update_info: {n} names, {len(self.dtype_names)} dtypes, {len(self.shapes)} "
                f"shapes, buckets of {sum(self.bucket_sizes)} tensors in all"
            )


def gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo process group outside torch.distributed's world (its own TCPStore, hosted by
    rank 0), so an engine and a trainer that have worlds of their own can join it."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("mrpg_weights", store), rank, world_size, timeout)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Broadcast from rank 0 of `group` (gloo, CPU tensors)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class GlooWeightTransferEngine(_LayerwiseEngine):
    """Worker side of mrpg_gloo: one broadcast per bucket into a fresh flat buffer."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group: Any = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.group = gloo_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.timeout_s,
        )

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError(f"weight transfer {GLOO!r}: init_weight_transfer_engine first")
        start = 0
        for size in update_info.bucket_sizes:
            names = update_info.names[start : start + size]
            dtypes = [getattr(torch, d) for d in update_info.dtype_names[start : start + size]]
            shapes = update_info.shapes[start : start + size]
            start += size
            if len(set(dtypes)) != 1:
                raise ValueError(f"a bucket mixes dtypes {sorted(set(map(str, dtypes)))}")
            numels = [int(torch.Size(s).numel()) for s in shapes]
            flat = torch.empty(sum(numels), dtype=dtypes[0])
            broadcast(self.group, flat)
            views = flat.split(numels)
            self.load(
                [
                    (n, v.view(s).to(self.device))
                    for n, v, s in zip(names, views, shapes, strict=True)
                ]
            )

    def shutdown(self) -> None:
        self.group = None


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
    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int  # 1 + the engine's workers
    timeout_s: float = 300.0


class GlooTrainerEngine(TrainerWeightTransferEngine):
    """Rank 0 broadcasts every bucket while the engine's update_weights call (a thread: an
    HTTP request to `vllm serve`) receives them; the other ranks only walk the stream."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, group: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.group = group

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: Any, source: Any = None
    ) -> GlooTrainerEngine:
        if not isinstance(source, BucketSource):
            raise TypeError(f"weight transfer {GLOO!r} takes a BucketSource")
        if not init_info.is_sender:
            return cls(client=client, source=source, is_sender=False)
        worker_info = GlooInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            timeout_s=init_info.timeout_s,
        )
        with ThreadPoolExecutor(max_workers=1) as pool:  # both sides rendezvous together
            reply = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            group = gloo_group(
                init_info.master_address,
                init_info.master_port,
                0,
                init_info.world_size,
                init_info.timeout_s,
            )
            reply.result()
        return cls(client=client, source=source, is_sender=True, group=group)

    def send_weights(self) -> None:
        source = cast(BucketSource, self.source)
        buckets = source.bucket_metadata
        if not self.is_sender:
            for _ in source.buckets():
                pass
            return
        meta = [m for bucket in buckets for m in bucket]
        info = GlooUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
            shapes=[list(m.shape) for m in meta],
            bucket_sizes=[len(b) for b in buckets],
        )
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            reply = pool.submit(self.client.update_weights, asdict(info))
            for want, bucket in zip(buckets, source.buckets(), strict=True):
                if reply.done():
                    reply.result()  # the engine refused or died: say so instead of blocking
                _check_bucket(want, bucket)
                tensors = [t for _, t in bucket]
                flat = (
                    tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
                )
                broadcast(self.group, flat.contiguous().cpu())
            reply.result()
        finally:
            pool.shutdown(wait=False)  # a worker stuck in a broadcast must not hang us here
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def _check_bucket(want: list[ParamMeta], bucket: Bucket) -> None:
    got = [(n, t.dtype, tuple(t.shape)) for n, t in bucket]
    if got != [(m.name, m.dtype, tuple(m.shape)) for m in want]:
        raise ValueError(f"the export stream disagrees with its metadata: {got[:2]} vs {want[:2]}")
