"""Build the policy's Megatron-Core GPTModel (and its TransformerConfig) from a ModelArch.

    chunks = build_model_chunks(arch, ParallelConfig(tensor_parallel=2), torch.float32)

One chunk per virtual pipeline stage. The layer spec (model.layer_spec): `te` is Transformer
Engine's (fused layernorm + linear modules, `linear_qkv.layer_norm_weight`), on the CPU built from
stand-ins with TE's module tree and names (parallel/cpu_shim.py); `local` is Megatron's local spec
(separate norm modules, `input_layernorm.weight`); `auto` is `te` with CUDA and Transformer Engine,
else `local`. Both specs hold the same weights under two names (models/hf_mapping.py) and save the
same distributed-checkpoint keys. Layouts that do not divide the model are refused before anything
is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron_rpg.config import ConfigError, ParallelConfig
from megatron_rpg.models.arch import ModelArch

VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's make-vocab-size-divisible-by default
LAYER_SPECS = ("auto", "te", "local")


def unwrap(module: Any) -> Any:
    """The GPTModel inside Megatron's DDP wrapper (or the module itself)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def resolve_dtype(params_dtype: str) -> torch.dtype:
    """'auto': bf16 with CUDA, fp32 on the CPU."""
    if params_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[params_dtype]


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Round up to a multiple of lcm(128, TP): the same padded size for every TP dividing 128,
    so checkpoints reshard across TP without changing the embedding's shape."""
    multiple = math.lcm(VOCAB_DIVISIBLE_BY, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def check_layout(arch: ModelArch, parallel: ParallelConfig) -> None:
    """Refuse a TP x PP (x VPP) layout that does not divide the model, naming what fails."""
    tp, pp, vpp = (
        parallel.tensor_parallel,
        parallel.pipeline_parallel,
        parallel.virtual_pipeline_parallel,
    )
    divides = [
        ("num_attention_heads", arch.num_attention_heads, tp, "parallel.tensor_parallel"),
        ("num_key_value_heads", arch.num_query_groups, tp, "parallel.tensor_parallel"),
        ("intermediate_size", arch.ffn_hidden_size, tp, "parallel.tensor_parallel"),
        ("num_hidden_layers", arch.num_layers, pp * vpp, "parallel.pipeline_parallel x virtual"),
    ]
    for field, count, parts, key in divides:
        if count % parts:
            raise ConfigError(key, parts, f"a divisor of the model's {field} ({count})")
    if arch.vocab_size < tp:
        raise ConfigError("parallel.tensor_parallel", tp, f"<= vocab_size ({arch.vocab_size})")


def _leave_uninitialized(weight: torch.Tensor) -> None:
    """init_method for models whose every weight is loaded next (conversions): keeps Megatron's
    partition tagging (perform_initialization stays on) but skips drawing random numbers."""


def transformer_config(
    arch: ModelArch, parallel: ParallelConfig, dtype: torch.dtype, initialize: bool = True
) -> Any:
    from megatron.core.transformer import TransformerConfig

    check_layout(arch, parallel)
    vpp = parallel.virtual_pipeline_parallel
    skip_init = (
        {}
        if initialize
        else {"init_method": _leave_uninitialized, "output_layer_init_method": _leave_uninitialized}
    )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=arch.family.qkv_bias,
        qk_layernorm=arch.family.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        batch_p2p_comm=False,  # interleaved PP=2 with batched p2p is silently wrong
        # micro-batches of any shape in one schedule (forward_backward.py): each p2p transfer is
        # preceded by its shape. The shape exchange always batches its ops, so interleaved PP
        # sends in one direction per call (overlap_p2p_comm), or at PP=2 the shapes would cross.
        variable_seq_lengths=parallel.pipeline_parallel > 1,
        overlap_p2p_comm=vpp > 1,
        moe_token_dispatcher_type="alltoall",  # the config check's demand with variable lengths
        **skip_init,
        **(
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
            if parallel.recompute_activations
            else {}
        ),
        # perform_initialization stays on: without it Megatron also skips tagging parameters with
        # tensor_model_parallel / partition_dim, which sharding.py reads (TP>1 loads break).
    )


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_layer_spec(layer_spec: str) -> str:
    """'auto' -> 'te' with CUDA and Transformer Engine, else 'local'; 'te' on a GPU without
    Transformer Engine is refused (on the CPU it is the stand-in spec)."""
    if layer_spec not in LAYER_SPECS:
        raise ConfigError("model.layer_spec", layer_spec, " | ".join(LAYER_SPECS))
    cuda = torch.cuda.is_available()
    if layer_spec == "auto":
        return "te" if cuda and _have_transformer_engine() else "local"
    if layer_spec == "te" and cuda and not _have_transformer_engine():
        raise ConfigError("model.layer_spec", "te", "local or auto (Transformer Engine is missing)")
    return layer_spec


def _layer_spec(arch: ModelArch, layer_spec: str) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs

    qk_layernorm = arch.family.qk_layernorm
    if resolve_layer_spec(layer_spec) == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=qk_layernorm, normalization="RMSNorm"
        )
    if torch.cuda.is_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron_rpg.parallel import cpu_shim

    return cpu_shim.te_layer_spec(qk_layernorm)


def build_model_chunks(
    arch: ModelArch,
    parallel: ParallelConfig,
    dtype: torch.dtype,
    initialize: bool = True,
    layer_spec: str = "auto",
) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage). Call after
    megatron_rpg.parallel.initialize_model_parallel with the same `parallel`. initialize=False
    leaves the weights' memory as allocated, for a model about to load every weight.
    layer_spec: auto | te | local (module docstring)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, parallel, dtype, initialize)
    if arch.sliding_window and arch.sliding_window < arch.max_position_embeddings:
        raise ValueError(
            f"config.json: sliding_window={arch.sliding_window} is not applied by Megatron's "
            "attention here; set it to null (sequences must fit the window)"
        )
    vpp = parallel.virtual_pipeline_parallel
    spec = _layer_spec(arch, layer_spec)
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=padded_vocab_size(arch.vocab_size, parallel.tensor_parallel),
                max_sequence_length=arch.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(False, vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(False, vp_stage),
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=arch.rope_theta,  # type: ignore[arg-type]  # typed int, used as float
                rope_scaling=arch.llama3_rope_factor is not None,
                rope_scaling_factor=arch.llama3_rope_factor or 8.0,
                seq_len_interpolation_factor=arch.rope_interpolation_factor,
                vp_stage=vp_stage,
            )
        )
    return chunks
