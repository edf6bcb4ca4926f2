"""The layout and per-GPU memory plan of a run, checked before anything is submitted.

    plan = memory_plan(config, nodes=8, gpus_per_node=8)
    print(plan.render()); plan.check()            # ConfigError when it cannot run

Per GPU, with P = parameters of the largest pipeline stage / TP (every tensor counted as split
over TP; the replicated norms are negligible), D = data-parallel size:

    weights      2 P                      bf16 (4 P in fp32)
    gradients    4 P                      fp32 gradient buffer (grad_reduce_in_fp32)
    optimizer    12 P / D                 fp32 main params + Adam moments, distributed optimizer
                                          (12 P without it)
    reference    2 P                      when loss.kl_anchor = ref
    activations  m (L/PP) a + w           1F1B keeps m = min(PP, micro-batches) in flight on the
                                          first stage; per layer and micro-batch (Korthikanti et
                                          al. 2022, flash attention, sequence parallel)
                                          a = 34 s b h / TP bytes, or 2 s b h / TP with full
                                          recompute (layer inputs only) plus one layer's
                                          working set w = 34 s b h / TP; s = prompt + response
    engine       u x GPU memory           vLLM (rollout.gpu_memory_utilization): its weights
                                          2 N / engine TP, the rest KV cache; vLLM profiles its
                                          activations and CUDA graphs inside this share
    runtime      1.5 GB                   CUDA context, cuBLAS workspaces, allocator slack
                                          (~1 GB on an H100) and NCCL's buffers for the
                                          TP/PP/DP/weight-transfer communicators (~0.5 GB)
    export       by the stream's layout   the weight sync, while the engine is awake, with
                                          buckets of B = rollout.sync_bucket_mb (a larger tensor
                                          travels alone); the export stream's layout
                                          (models/export.py) is the engine's:
                                          full (engine TP != trainer TP, or vLLM's nccl to a
                                          server): max(B, the largest tensor: the embedding at
                                          70B) + the gathered TP shards of linear_fc1 F = 2 f h
                                          bytes (gathered through a copy) + to a served engine
                                          vLLM's packing (a 1 GiB pack of views that keeps its
                                          buckets alive, and their 1 GiB concatenation);
                                          tp_shards (a colocated engine of the trainer's TP):
                                          max(B, the embedding: vocabulary-shaped, holding the
                                          rank's rows, or gathered whole in the TP group where
                                          Megatron's and vLLM's paddings differ);
                                          own_shards (mrpg_gloo to a server): B, one bucket's
                                          shards concatenated (its deltas' record of what it
                                          sent is in host memory)

Colocated (rollout.engine_nodes = 0): training holds weights + gradients + optimizer +
reference + activations + runtime; rollout and the weight sync hold the same states (they stay
on the GPU) + runtime + the engine's share + the export buffers, while the trainer's
activations are freed and the engine sleeps during training. Both must fit in the GPU's memory.
Separate (engine_nodes = E): one `vllm serve` on each of the job's last E nodes, data parallel
over its GPUs in engines of rollout.tensor_parallel; the trainer gets the other nodes and never
holds an engine; the engines' GPUs hold only their share (+ runtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_rpg.config import ConfigError, RunConfig
from megatron_rpg.models import ModelArch
from megatron_rpg.models.builder import check_layout, padded_vocab_size
from megatron_rpg.models.export import FULL, OWN_SHARDS, TP_SHARDS
from megatron_rpg.rollout.placement import rollout_placement

GB = 1e9
KV_BYTES = 2  # bf16 KV cache
RUNTIME_GB = 1.5  # CUDA context + cuBLAS workspaces + allocator slack (~1) + NCCL buffers (~0.5)
VLLM_PACKED_BYTES = 2**30  # vLLM's packed NCCL transfer buffer (DEFAULT_PACKED_BUFFER_SIZE_BYTES)


def export_bytes(arch: ModelArch, element_bytes: int, bucket_bytes: int, layout: str) -> float:
    """What the weight sync holds beyond the trainer's states (the module docstring's export),
    in the stream's layout: full (+ "packed": vLLM's nccl to a server), tp_shards, own_shards."""
    h = arch.hidden_size
    embedding = padded_vocab_size(arch.vocab_size, 1) * h * element_bytes
    if layout == OWN_SHARDS:
        return bucket_bytes
    if layout == TP_SHARDS:
        return max(bucket_bytes, embedding)
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    largest = max(embedding, max(2 * arch.ffn_hidden_size, qkv_rows) * h * element_bytes)
    gathered = 2 * arch.ffn_hidden_size * h * element_bytes
    packed = 2 * VLLM_PACKED_BYTES if layout == "full+packed" else 0
    return max(bucket_bytes, largest) + gathered + packed


def sync_layout(engine: str, colocated: bool, transfer: str, engine_tp: int, tp: int) -> str:
    """The export stream's layout the placement's engine takes (the engines' weight_layout)."""
    if engine != "vllm":
        return FULL
    if colocated:
        return TP_SHARDS if engine_tp == tp > 1 else FULL
    return OWN_SHARDS if transfer == "mrpg_gloo" else "full+packed"


def layer_parameters(arch: ModelArch) -> int:
    h, d = arch.hidden_size, arch.head_dim
    qkv = h * (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    bias = (arch.num_attention_heads + 2 * arch.num_query_groups) * d if arch.family.qkv_bias else 0
    attention = qkv + bias + arch.num_attention_heads * d * h
    norms = 2 * h + (2 * d if arch.family.qk_layernorm else 0)
    return attention + 3 * h * arch.ffn_hidden_size + norms


def stage_parameters(arch: ModelArch, tp: int, pp: int) -> list[int]:
    """Parameters of each pipeline stage (full, before TP)."""
    embedding = padded_vocab_size(arch.vocab_size, tp) * arch.hidden_size
    layers = arch.num_layers // pp * layer_parameters(arch)
    stages = [layers for _ in range(pp)]
    stages[0] += embedding
    if pp > 1 or not arch.tie_word_embeddings:
        stages[-1] += embedding  # the output layer (a tied copy on the last stage when PP > 1)
    stages[-1] += arch.hidden_size  # final norm
    return stages


@dataclass
class MemoryPlan:
    arch: ModelArch
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    tp: int
    pp: int
    dp: int
    engine_tp: int
    engine_nodes: int
    total_parameters: int
    sequence: int
    micro_batch: int
    in_flight: int
    gb: dict[str, float]
    sync_layout: str = FULL  # the export stream's layout at a weight sync
    sync_bucket_mb: int = 512  # rollout.sync_bucket_mb

    @property
    def training_gb(self) -> float:
        g = self.gb
        states = g["weights"] + g["gradients"] + g["optimizer"] + g["reference"]
        return states + g["activations"] + g["runtime"]

    @property
    def rollout_gb(self) -> float:
        """Peak of a GPU during rollout and the weight sync: the trainer's states and runtime
        plus the engine and the export buffers when colocated, else the larger of a trainer GPU
        (states, runtime, export) and an engine GPU (its share, runtime)."""
        g = self.gb
        states = g["weights"] + g["gradients"] + g["optimizer"] + g["reference"]
        trainer = states + g["runtime"] + g["export"]
        if self.engine_nodes:
            return max(trainer, g["engine"] + g["runtime"])
        return trainer + g["engine"]

    def render(self) -> str:
        g = self.gb
        gpus = self.nodes * self.gpus_per_node
        engine_gpus = (self.engine_nodes or self.nodes) * self.gpus_per_node
        where = (
            f"on {self.engine_nodes} node(s) of their own (a vllm serve on each)"
            if self.engine_nodes
            else "colocated with the trainer"
        )
        lines = [
            f"model: {self.arch.family.name}, {self.total_parameters / 1e9:.2f}B parameters, "
            f"{self.arch.num_layers} layers, hidden {self.arch.hidden_size}",
            f"layout: {self.nodes} node(s) x {self.gpus_per_node} GPUs = {gpus}; trainer TP "
            f"{self.tp} x PP {self.pp} x DP {self.dp} on {self.nodes - self.engine_nodes} "
            f"node(s); {engine_gpus // self.engine_tp} vLLM engines of TP {self.engine_tp} "
            f"{where}",
            f"sequence {self.sequence} tokens, micro-batch {self.micro_batch}, "
            f"{self.in_flight} micro-batch(es) in flight on the first stage",
            "per-GPU memory (GB):",
        ]
        keys = ("weights", "gradients", "optimizer", "reference", "activations", "runtime")
        for key in (*keys, "engine", "export"):
            lines.append(f"  {key:<12} {g[key]:8.2f}")
        peaks = f"training peak {self.training_gb:7.2f}   rollout peak {self.rollout_gb:7.2f}"
        lines.append(f"  {peaks}   GPU {self.gpu_memory_gb:.0f}")
        lines.append(
            f"  engine: weights {g['engine_weights']:.2f}, KV cache {g['kv_cache']:.2f} "
            f"= {g['kv_tokens']:,.0f} tokens per engine"
        )
        lines.append(
            f"  weight sync: {self.sync_layout.replace('+packed', '')} layout, buckets of "
            f"{self.sync_bucket_mb} MiB (rollout.sync_bucket_mb): export {g['export']:.2f}"
        )
        return "\n".join(lines)

    def check(self) -> None:
        peak = max(self.training_gb, self.rollout_gb)
        if peak > self.gpu_memory_gb:
            phase = "training" if self.training_gb >= self.rollout_gb else "rollout"
            raise ConfigError(
                "layout",
                f"TP{self.tp} x PP{self.pp} x DP{self.dp}",
                f"a layout whose {phase} peak ({peak:.1f} GB per GPU) fits the "
                f"GPU's {self.gpu_memory_gb:.0f} GB (more TP/PP or nodes, "
                "recompute, a smaller micro-batch)",
            )
        if self.gb["kv_cache"] <= 0:
            share = self.gb["engine"] / self.gpu_memory_gb
            weights = self.gb["engine_weights"]
            raise ConfigError(
                "rollout.gpu_memory_utilization",
                share,
                f"enough for the engine's weights ({weights:.1f} GB per GPU) and a KV cache",
            )


def memory_plan(
    config: RunConfig, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0
) -> MemoryPlan:
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("nodes/gpus_per_node", f"{nodes}/{gpus_per_node}", ">= 1")
    c, parallel = config, config.parallel
    arch = ModelArch.from_hf(_config_path(c.model.hf_config))
    check_layout(arch, parallel)
    engine_nodes = c.rollout.engine_nodes
    if engine_nodes >= nodes:
        raise ConfigError(
            "rollout.engine_nodes",
            engine_nodes,
            f"fewer than the job's {nodes} node(s): the trainer needs one",
        )
    gpus = (nodes - engine_nodes) * gpus_per_node
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if gpus % (tp * pp):
        raise ConfigError("parallel", f"TP{tp} x PP{pp}", f"a divisor of the {gpus} GPUs")
    engine_tp = c.rollout.tensor_parallel
    layout = FULL
    if c.rollout.engine == "vllm":  # the trainer's own check (rollout/placement.py)
        placement = rollout_placement(
            c.rollout, arch, gpus, c.model.params_dtype, gpus_per_node=gpus_per_node, cuda=True
        )
        layout = sync_layout("vllm", placement.colocated, placement.transfer, engine_tp, tp)
    if gpus_per_node % engine_tp:
        raise ConfigError(
            "rollout.tensor_parallel",
            engine_tp,
            f"a divisor of the GPUs per node ({gpus_per_node})",
        )
    dp = gpus // (tp * pp)
    stages = stage_parameters(arch, tp, pp)
    p = max(stages) / tp
    total = sum(stages) - (
        padded_vocab_size(arch.vocab_size, tp) * arch.hidden_size
        if arch.tie_word_embeddings and pp > 1
        else 0
    )
    bf16 = c.model.params_dtype in ("auto", "bfloat16")
    bucket = c.rollout.sync_bucket_mb * 2**20
    distributed = True  # the trainer uses Megatron's distributed optimizer on GPUs
    s = c.data.max_prompt_tokens + c.rollout.max_tokens
    b, h = c.optimizer.micro_batch_size, arch.hidden_size
    micro_batches = c.optimizer.mini_batch_size // (b * dp) if c.optimizer.mini_batch_size else 1
    in_flight = max(1, min(pp, micro_batches))
    layers = arch.num_layers // pp
    working = 34 * s * b * h / tp
    per_layer = 2 * s * b * h / tp if parallel.recompute_activations else working
    activations = in_flight * layers * per_layer + (
        working if parallel.recompute_activations else 0
    )
    engine = c.rollout.gpu_memory_utilization * gpu_memory_gb * GB
    engine_weights = 2 * total / engine_tp
    kv_per_token = (
        2 * arch.num_layers * arch.num_query_groups * arch.head_dim * KV_BYTES / engine_tp
    )
    kv_cache = engine - engine_weights
    gb = {
        "weights": (2 if bf16 else 4) * p / GB,
        "gradients": 4 * p / GB,
        "optimizer": 12 * p / (dp if distributed else 1) / GB,
        "reference": ((2 if bf16 else 4) * p if c.loss.kl_anchor == "ref" else 0) / GB,
        "activations": (activations + 64 * 2**20) / GB,  # + one 64 MiB block of log-prob logits
        "engine": engine / GB,
        "runtime": RUNTIME_GB,
        "export": export_bytes(arch, 2 if bf16 else 4, bucket, layout) / GB,
        "engine_weights": engine_weights / GB,
        "kv_cache": kv_cache / GB,
        "kv_tokens": max(kv_cache, 0) / kv_per_token,
    }
    return MemoryPlan(
        arch,
        nodes,
        gpus_per_node,
        gpu_memory_gb,
        tp,
        pp,
        dp,
        engine_tp,
        engine_nodes,
        total,
        s,
        b,
        in_flight,
        gb,
        layout,
        c.rollout.sync_bucket_mb,
    )


def _config_path(path: str) -> Path:
    if not path or not Path(path).exists():
        raise ConfigError("model.hf_config", path, "a config.json file or a directory holding one")
    return Path(path)
