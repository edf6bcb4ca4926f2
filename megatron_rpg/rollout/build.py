"""The trainer's rollout engine on this rank, as the placement says (rollout/placement.py).

engine = build_engine(rollout, placement, hf_config, run_dir, rank, seed, max_model_len)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpg.config import ConfigError, RolloutConfig
from megatron_rpg.models import ModelArch
from megatron_rpg.models.arch import read_hf_config
from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.rollout.placement import RolloutPlacement, engine_tensor_parallel
from megatron_rpg.rollout.sync import sync_weights


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
    rollout: RolloutConfig,
    placement: RolloutPlacement,
    hf_config: dict[str, Any],
    run_dir: Path,
    rank: int,
    seed: int,
    max_model_len: int,
) -> Any:
    """This rank's engine (None where the placement puts none), built with the placement's
    resolved values."""
    if placement.engine == "embedded":
        return EmbeddedEngine(hf_config, dtype=torch.float32) if rank == 0 else None
    from megatron_rpg.rollout.vllm_engine import API_KEY, VLLMEngine, VLLMServerEngine

    if not placement.colocated:
        urls = rollout.server_url or os.environ.get("MRPG_ENGINE_URL", "")
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
            backend=placement.transfer,
            trainer_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            timeout_s=rollout.request_timeout_s,
            retries=rollout.request_retries,
            api_key=os.environ.get(API_KEY),
            full_sync_every=rollout.full_sync_every,
        )
    return VLLMEngine(
        engine_model_dir(hf_config, run_dir),
        placement.tensor_parallel,
        dtype=placement.dtype,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        kv_cache_gb=rollout.kv_cache_gb,
        max_model_len=max_model_len,
        seed=seed,
    )


def engine_max_model_len(max_prompt_tokens: int, max_tokens: int, hf_config: dict[str, Any]) -> int:
    """The longest sequence the engine serves: a prompt (data.max_prompt_tokens) and its response
    (rollout.max_tokens), within the model's."""
    return min(int(hf_config["max_position_embeddings"]), max_prompt_tokens + max_tokens)


def checkpoint_engine(
    source: Path, is_hf: bool, kind: str, tensor_parallel: int | str, dtype: str, seed: int
) -> Any:
    """An engine holding a model checkpoint, for `megatron-rpg eval`: vLLM (`kind` "vllm") on a
    Hugging Face directory, with `tensor_parallel` GPUs ("auto": the most that fit the model on
    this machine); else the embedded engine, from a Hugging Face directory (`is_hf`) or a
    Megatron checkpoint (loaded on this rank and streamed in as the trainer's policy is)."""
    if kind == "vllm":
        from megatron_rpg.rollout.vllm_engine import VLLMEngine

        arch = ModelArch.from_hf(read_hf_config(source))
        return VLLMEngine(
            source,
            engine_tensor_parallel(tensor_parallel, arch, torch.cuda.device_count()),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=0.9,
            load_format="auto",
        )
    if is_hf:
        from megatron_rpg.checkpoint import HFCheckpoint

        checkpoint = HFCheckpoint(source)
        engine = EmbeddedEngine(checkpoint.config)
        engine.update_weights((n, checkpoint.get(n).float()) for n in checkpoint.names())
        return engine
    from megatron_rpg.checkpoint.mcore import checkpoint_hf_config, load_mcore
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    hf_config = checkpoint_hf_config(source)
    arch = ModelArch.from_hf(hf_config)
    initialize_model_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(arch, ParallelConfig(), torch.float32, initialize=False)
    load_mcore(chunks, source)
    engine = EmbeddedEngine(hf_config)
    sync_weights(chunks, arch, engine)
    return engine
