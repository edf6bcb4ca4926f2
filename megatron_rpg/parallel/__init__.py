"""Process groups, the CPU shim for Megatron-Core, seeding, and spawned gloo ranks."""

from megatron_rpg.parallel.distributed import (
    ParallelLayout,
    destroy_model_parallel,
    init_process_group,
    initialize_model_parallel,
)
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.parallel.seeding import seed_everything
from megatron_rpg.parallel.spawn import RankError, RankPool, every_core, free_port, run_on_ranks

__all__ = [
    "ParallelLayout",
    "ProcessGroups",
    "RankError",
    "RankPool",
    "destroy_model_parallel",
    "every_core",
    "free_port",
    "init_process_group",
    "initialize_model_parallel",
    "run_on_ranks",
    "seed_everything",
]
