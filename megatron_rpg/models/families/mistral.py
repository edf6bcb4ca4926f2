"""Mistral: the Llama layout. A sliding window (v0.1) is not applied by Megatron's local spec:
sequences longer than it would differ from HF (refused by the builder)."""

from megatron_rpg.models.families.base import Family

FAMILY = Family("mistral", ("mistral",), "MistralForCausalLM", qkv_bias=False, qk_layernorm=False)
