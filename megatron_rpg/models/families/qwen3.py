"""Qwen3 (dense): no q/k/v bias, RMSNorm on each head's q and k, explicit head_dim."""

from megatron_rpg.models.families.base import Family

FAMILY = Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", qkv_bias=False, qk_layernorm=True)
