"""Policy and reference models: Megatron-Core GPTModels built from Hugging Face configs."""

from megatron_rpg.models.arch import ModelArch
from megatron_rpg.models.builder import (
    build_model_chunks,
    check_layout,
    padded_vocab_size,
    resolve_dtype,
    transformer_config,
)
from megatron_rpg.models.reference import ReferenceModel
from megatron_rpg.models.sharding import load_full_state_dict, sharded_parameters, tp_join, tp_slice

__all__ = [
    "ModelArch",
    "ReferenceModel",
    "build_model_chunks",
    "check_layout",
    "load_full_state_dict",
    "padded_vocab_size",
    "resolve_dtype",
    "sharded_parameters",
    "tp_join",
    "tp_slice",
    "transformer_config",
]
