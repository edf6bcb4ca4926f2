"""The process groups of a TP x PP x DP layout, passed explicitly to whatever communicates
(as Megatron's ProcessGroupCollection): the trainer passes its layout's; a caller without one
(a test, a conversion tool) may omit them and get the groups Megatron's parallel state holds.

    groups = layout.groups                   # from initialize_model_parallel
    forward_backward(chunks, micro_batches, options, groups=groups)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup


@dataclass(frozen=True)
class ProcessGroups:
    tp: ProcessGroup  # this rank's tensor-parallel group
    pp: ProcessGroup  # its pipeline stages
    dp: ProcessGroup  # its data-parallel replicas

    @classmethod
    def current(cls) -> ProcessGroups:
        """Megatron's groups (initialize_model_parallel must have run)."""
        from megatron.core import parallel_state

        return cls(
            tp=parallel_state.get_tensor_model_parallel_group(),
            pp=parallel_state.get_pipeline_model_parallel_group(),
            dp=parallel_state.get_data_parallel_group(),
        )

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp)


def current_tp_group() -> ProcessGroup | None:
    """Megatron's tensor-parallel group when model parallelism is initialized, else None."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None
