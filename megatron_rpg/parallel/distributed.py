"""torch.distributed and Megatron-Core parallel state for a given TP x PP x DP layout.

    init_process_group()                     # from RANK/WORLD_SIZE/MASTER_* (torchrun, srun, pool)
    layout = initialize_model_parallel(ParallelConfig(tensor_parallel=2), seed=1234)
    ...
    destroy_model_parallel()

NCCL (CUDA tensors) + gloo (CPU tensors) with CUDA, gloo without (backend='auto'). DP is what
remains: world = TP * PP * DP.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rpg.config import ConfigError, ParallelConfig
from megatron_rpg.parallel.cpu_shim import apply as apply_cpu_shim
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.parallel.seeding import seed_everything

# Process groups created by initialize_model_parallel. Megatron's destroy_model_parallel only drops
# its references: without destroying them, each layout leaks its groups and their threads.
_owned_groups: list = []


def _registered_groups() -> set:
    from torch.distributed import distributed_c10d

    return set(distributed_c10d._world.pg_map)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the layout."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    groups: ProcessGroups = field(compare=False, repr=False)  # passed to what communicates

    def __getstate__(self) -> dict:
        """Process groups live in this process: a pickled layout (a rank's result) has None."""
        return {**self.__dict__, "groups": None}


def resolve_backend(backend: str) -> str:
    """With CUDA, NCCL carries CUDA tensors and gloo CPU ones (a step's flags and counts are
    CPU tensors: NCCL alone fails with "No backend type associated with device type cpu")."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend", backend, "'gloo' or 'auto' on a machine without CUDA")
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def init_process_group(backend: str = "auto", timeout_minutes: int = 30) -> None:
    """Join the default process group from the launcher's environment (idempotent)."""
    if dist.is_initialized():
        return
    backend = resolve_backend(backend)
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def initialize_model_parallel(parallel: ParallelConfig, seed: int) -> ParallelLayout:
    """Create Megatron's TP/PP/DP groups on the initialized default group and seed every RNG."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("call init_process_group() before initialize_model_parallel()")
    apply_cpu_shim()
    world = dist.get_world_size()
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_parallel:
        raise ConfigError(
            "parallel",
            f"tensor_parallel={parallel.tensor_parallel} x pipeline_parallel="
            f"{parallel.pipeline_parallel}",
            f"a product that divides the world size {world}",
        )
    vpp = parallel.virtual_pipeline_parallel
    if vpp > 1 and parallel.pipeline_parallel == 1:
        raise ConfigError(
            "parallel.virtual_pipeline_parallel", vpp, "1 unless pipeline_parallel > 1"
        )
    before = _registered_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    from torch.distributed import distributed_c10d

    created = _registered_groups() - before  # destroyed in creation order on every rank
    _owned_groups.extend(sorted(created, key=lambda g: int(distributed_c10d._world.pg_names[g])))
    seed_everything(seed)
    return ParallelLayout(
        world_size=world,
        tensor_parallel=parallel.tensor_parallel,
        pipeline_parallel=parallel.pipeline_parallel,
        data_parallel=world // model_parallel,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        groups=ProcessGroups.current(),
    )


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups (keeps the default group), so another layout can follow."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        # Megatron 0.16.1's destroy_model_parallel leaves these two set, keeping their groups.
        parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
        parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None
    rotary = sys.modules.get("megatron.core.models.common.embeddings.rotary_pos_embedding")
    if rotary is not None:  # forward's lru_cache keeps the last module, and so its cp group
        rotary.RotaryEmbedding.forward.cache_clear()
    while _owned_groups:
        group = _owned_groups.pop(0)
        if group in _registered_groups():  # destroying one group can take its aliases along
            dist.destroy_process_group(group)
    # A destroyed gloo group stops its threads (3 per group, each waking every few ms) only when
    # freed; models and DDP buffers that still reference it sit in reference cycles.
    gc.collect()
