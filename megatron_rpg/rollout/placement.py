"""Where the rollout engines run: the one decision that the trainer and `megatron-rpg launch
--dry-run` both take, so a layout the plan accepts is a layout the trainer starts.

    placement = rollout_placement(config.rollout, arch, trainer_ranks=64, gpus_per_node=8)

embedded     rank 0 holds a transformers model (CPU runs, tests)
vLLM, colocated (engine_nodes = 0, no server_url)
             an engine of `tensor_parallel` ranks in every block of that many consecutive
             trainer ranks: trainer_ranks / tensor_parallel engines, each sampling its share
             of the prompts; weights by reference in-process (mrpg_local)
vLLM, server (engine_nodes > 0 or server_url)
             a `vllm serve` elsewhere; weights over NCCL (CUDA) or gloo (mrpg_gloo)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rpg.config import ConfigError, RolloutConfig
from megatron_rpg.models import ModelArch


@dataclass(frozen=True)
class RolloutPlacement:
    engine: str  # "embedded" or "vllm"
    colocated: bool  # vLLM inside the trainer's ranks
    tensor_parallel: int  # ranks (GPUs) per engine
    engines: int  # colocated engines (0: a server's own count)
    transfer: str  # weight-transfer backend; "" for the embedded engine
    dtype: str  # the engine's weights: "float32" for the embedded engine


def engine_dtype(rollout_dtype: str, params_dtype: str, cuda: bool) -> str:
    """rollout.dtype, else the model's (model.params_dtype); 'auto' there: bf16 with CUDA, fp32
    on CPUs."""
    dtype = params_dtype if rollout_dtype == "auto" else rollout_dtype
    if dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return dtype


def server_transfer(name: str, cuda: bool) -> str:
    """rollout.weight_transfer for a vllm serve: 'auto' is NCCL from a CUDA trainer, gloo
    (mrpg_gloo) otherwise."""
    if name == "auto":
        return "nccl" if cuda else "mrpg_gloo"
    return name


def engine_tp_fits(arch: ModelArch, tp: int) -> bool:
    """vLLM's rule: tp divides the attention heads, and divides or is a multiple of the KV heads."""
    groups = arch.num_query_groups
    return arch.num_attention_heads % tp == 0 and (groups % tp == 0 or tp % groups == 0)


def largest_engine_tp(arch: ModelArch, devices: int) -> int:
    """The largest engine tensor parallelism on at most `devices` GPUs that fits the model
    (Qwen2.5-7B's 28 heads on 8 GPUs: 4)."""
    return max(tp for tp in range(1, max(devices, 1) + 1) if engine_tp_fits(arch, tp))


def engine_tensor_parallel(value: int | str, arch: ModelArch, devices: int) -> int:
    """An engine's tensor parallelism: `value`, or for 'auto' the largest that fits the model on
    `devices` GPUs (largest_engine_tp)."""
    if value == "auto":
        return largest_engine_tp(arch, devices)
    return int(value)


def rollout_placement(
    rollout: RolloutConfig,
    arch: ModelArch,
    trainer_ranks: int,
    params_dtype: str = "auto",
    gpus_per_node: int | None = None,
    cuda: bool | None = None,
) -> RolloutPlacement:
    """The placement with every 'auto' resolved (engine, transfer, dtype), or ConfigError naming
    the key that cannot work. `params_dtype`: model.params_dtype, the engine's dtype unless
    rollout.dtype sets one; `cuda`: the trainer's device (default: this machine's); the launch
    plan passes True."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    tp = rollout.tensor_parallel
    server = rollout.engine_nodes > 0 or bool(rollout.server_url)
    if rollout.engine == "embedded":
        for key, value, ok in [
            ("tensor_parallel", tp, tp == 1),
            ("engine_nodes", rollout.engine_nodes, rollout.engine_nodes == 0),
            ("server_url", rollout.server_url, not rollout.server_url),
            ("weight_transfer", rollout.weight_transfer, rollout.weight_transfer == "auto"),
            ("full_sync_every", rollout.full_sync_every, rollout.full_sync_every == 1),
        ]:
            if not ok:
                raise ConfigError(
                    f"rollout.{key}",
                    value,
                    "its default with rollout.engine=embedded (one process; vLLM for the others)",
                )
        return RolloutPlacement("embedded", False, 1, 1, "", "float32")
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    if not engine_tp_fits(arch, tp):
        raise ConfigError(
            "rollout.tensor_parallel",
            tp,
            f"a divisor of the {heads} attention heads that divides or is a "
            f"multiple of the {groups} KV heads",
        )
    transfer: str = rollout.weight_transfer
    dtype = engine_dtype(rollout.dtype, params_dtype, cuda)
    if server:
        transfer = server_transfer(transfer, cuda)
        allowed = ("nccl", "mrpg_gloo") if cuda else ("mrpg_gloo",)
        if transfer not in allowed:
            raise ConfigError(
                "rollout.weight_transfer",
                rollout.weight_transfer,
                f"one of {['auto', *allowed]} for a vllm serve"
                f"{'' if cuda else ' from a trainer without CUDA'}",
            )
        if rollout.full_sync_every > 1 and transfer != "mrpg_gloo":
            raise ConfigError(
                "rollout.full_sync_every",
                rollout.full_sync_every,
                "1 with rollout.weight_transfer=nccl (deltas travel over mrpg_gloo)",
            )
        return RolloutPlacement("vllm", False, tp, 0, transfer, dtype)
    if rollout.full_sync_every > 1:
        raise ConfigError(
            "rollout.full_sync_every",
            rollout.full_sync_every,
            "1 for a colocated engine (nothing travels: deltas are for vllm serves)",
        )
    if transfer not in ("auto", "mrpg_local"):
        raise ConfigError(
            "rollout.weight_transfer",
            transfer,
            "'auto' or 'mrpg_local' for a colocated engine (it lives in the trainer's process)",
        )
    if trainer_ranks % tp:
        raise ConfigError(
            "rollout.tensor_parallel",
            tp,
            f"a divisor of the trainer's {trainer_ranks} ranks (colocated "
            "engines are blocks of consecutive ranks)",
        )
    if gpus_per_node is not None and gpus_per_node % tp:
        raise ConfigError(
            "rollout.tensor_parallel",
            tp,
            f"a divisor of the {gpus_per_node} GPUs per node (an engine's ranks share a node)",
        )
    return RolloutPlacement("vllm", True, tp, trainer_ranks // tp, "mrpg_local", dtype)
