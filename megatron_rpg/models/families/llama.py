"""Llama 2 and 3.x: no biases, SwiGLU, RMSNorm, RoPE (Llama-3 frequency scaling)."""

from megatron_rpg.models.families.base import Family

FAMILY = Family("llama", ("llama",), "LlamaForCausalLM", qkv_bias=False, qk_layernorm=False)
