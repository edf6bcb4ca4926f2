"""The trainer's rollout engine on this rank, as the placement says (rollout/placement.py).

engine = build_engine(config, placement, hf_config, run_dir, rank)   # None: no engine here
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpg.config import ConfigError, RunConfig
from megatron_rpg.models import ModelArch
from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.rollout.placement import RolloutPlacement


def engine_model_dir(hf_config: dict[str, Any], run_dir: Path) -> Path:
    """A directory holding only the policy's config.json, for vLLM to build the model from
    (its weights come from the trainer). Written by rank 0; every rank returns it."""
    directory = run_dir / "engine_model"
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = dict(hf_config)
        config.setdefault("architectures", [ModelArch.from_hf(hf_config).family.hf_architecture])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return directory


def build_engine(
    config: RunConfig,
    placement: RolloutPlacement,
    hf_config: dict[str, Any],
    run_dir: Path,
    rank: int,
) -> Any:
    r = config.rollout
    if placement.engine == "embedded":
        return EmbeddedEngine(hf_config, dtype=torch.float32) if rank == 0 else None
    from megatron_rpg.rollout.vllm_engine import API_KEY, VLLMEngine, VLLMServerEngine

    if not placement.colocated:
        urls = r.server_url or os.environ.get("MRPG_ENGINE_URL", "")
        if not urls:
            raise ConfigError(
                "rollout.server_url",
                urls,
                "the URLs of running vllm serves, comma-separated (jobs "
                "with rollout.engine_nodes get them from slurm/common.sh)",
            )
        return VLLMServerEngine(
            urls,
            hf_config,
            trainer_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            backend=placement.transfer,
            timeout_s=r.request_timeout_s,
            retries=r.request_retries,
            api_key=os.environ.get(API_KEY),
        )
    return VLLMEngine(
        engine_model_dir(hf_config, run_dir),
        placement.tensor_parallel,
        dtype=engine_dtype(config),
        gpu_memory_utilization=r.gpu_memory_utilization,
        kv_cache_gb=r.kv_cache_gb,
        max_model_len=engine_max_model_len(config, hf_config),
        seed=config.seed,
    )


def engine_dtype(config: RunConfig) -> str:
    """rollout.dtype, else the model's (auto: bf16 with CUDA, fp32 on CPUs)."""
    dtype = config.rollout.dtype if config.rollout.dtype != "auto" else config.model.params_dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return dtype


def engine_max_model_len(config: RunConfig, hf_config: dict[str, Any]) -> int:
    """The longest sequence the engine serves: a prompt and its response, within the model's."""
    longest = config.data.max_prompt_tokens + config.rollout.max_tokens
    return min(int(hf_config["max_position_embeddings"]), longest)
