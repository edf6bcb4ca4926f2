"""Model families: what distinguishes Llama, Qwen2, Qwen3 and Mistral for the builder (and, with
the checkpoint tools, their HF <-> Megatron parameter mapping). One module per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF config `model_type` values
    hf_architecture: str  # HF `architectures[0]` written on export
    qkv_bias: bool  # bias on q, k, v (not on o, not in the MLP)
    qk_layernorm: bool  # RMSNorm on each head's q and k

    def check(self, hf: dict[str, Any]) -> None:
        """Refuse HF options this family's Megatron build does not reproduce."""
        if hf.get("attention_bias") and not self.qkv_bias:
            raise ValueError(
                f"{self.name}: attention_bias=true (bias on q, k, v and o) is not supported"
            )
        if hf.get("mlp_bias"):
            raise ValueError(f"{self.name}: mlp_bias=true is not supported")


def _registry() -> dict[str, Family]:
    from megatron_rpg.models.families import llama, mistral, qwen2, qwen3

    return {t: m.FAMILY for m in (llama, qwen2, qwen3, mistral) for t in m.FAMILY.model_types}


def family_for(model_type: str) -> Family:
    families = _registry()
    if model_type not in families:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; supported: "
            f"{sorted(families)}"
        )
    return families[model_type]
