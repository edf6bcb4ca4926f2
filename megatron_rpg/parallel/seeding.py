"""Seeding that makes runs reproducible across layouts and restarts.

Model randomness follows Megatron-LM: seed + 100 * pipeline rank (so pipeline stages initialize
differently), then `model_parallel_cuda_manual_seed`, which gives each tensor-parallel rank its
own model-parallel RNG stream and all ranks the same data-parallel stream. Data sampling and
rollouts must use their own `torch.Generator`: on the CPU the model's "CUDA" RNG is the default
CPU generator, which dropout advances.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> int:
    """Seed python, numpy, torch and (if initialized) Megatron's RNG tracker; returns the seed
    used for this rank."""
    from megatron.core import parallel_state, tensor_parallel

    rank_seed = seed
    if parallel_state.model_parallel_is_initialized():
        rank_seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(rank_seed)
    return rank_seed
