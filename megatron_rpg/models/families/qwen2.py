"""Qwen2 / Qwen2.5: Llama layout plus a bias on q, k and v."""

from megatron_rpg.models.families.base import Family

FAMILY = Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", qkv_bias=True, qk_layernorm=False)
