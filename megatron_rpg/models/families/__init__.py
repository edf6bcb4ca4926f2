"""Model families: what distinguishes Llama, Qwen2, Qwen3 and Mistral for the builder (and, with
the checkpoint tools, their HF <-> Megatron parameter mapping). One module per family."""

from __future__ import annotations

from megatron_rpg.models.families.base import Family
from megatron_rpg.models.families.llama import FAMILY as LLAMA
from megatron_rpg.models.families.mistral import FAMILY as MISTRAL
from megatron_rpg.models.families.qwen2 import FAMILY as QWEN2
from megatron_rpg.models.families.qwen3 import FAMILY as QWEN3

FAMILIES = {t: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL) for t in f.model_types}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; supported: "
            f"{sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]
