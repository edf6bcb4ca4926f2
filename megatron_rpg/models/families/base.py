"""What a model family is: the options that distinguish it for the builder and the mapping."""

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
