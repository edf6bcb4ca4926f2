"""The architecture of a decoder-only model, read from a Hugging Face config.

    arch = ModelArch.from_hf("path/to/model")   # directory, config.json, dict or a HF config object

Every missing or unsupported field is refused with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rpg.models.families import Family, family_for

# Llama-3 RoPE frequency scaling: Megatron implements it with these fixed constants.
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class ModelArch:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    llama3_rope_factor: float | None = None  # Llama-3.x frequency scaling
    rope_interpolation_factor: float | None = None  # linear position interpolation
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any] | Any) -> ModelArch:
        hf = read_hf_config(source)
        family = family_for(str(_field(hf, "model_type")))
        family.check(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu)"
            )
        heads = int(_field(hf, "num_attention_heads"))
        hidden = int(_field(hf, "hidden_size"))
        head_dim = hf.get("head_dim") or hidden // heads
        # transformers >= 5 writes rope_parameters (theta inside); older configs rope_scaling
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        llama3, linear = _rope_scaling(scaling)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        return cls(
            family=family,
            vocab_size=int(_field(hf, "vocab_size")),
            hidden_size=hidden,
            num_layers=int(_field(hf, "num_hidden_layers")),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            ffn_hidden_size=int(_field(hf, "intermediate_size")),
            norm_eps=float(_field(hf, "rms_norm_eps")),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=int(_field(hf, "max_position_embeddings")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            llama3_rope_factor=llama3,
            rope_interpolation_factor=linear,
            sliding_window=int(window) if window else None,
        )


def read_hf_config(source: str | Path | dict[str, Any] | Any) -> dict[str, Any]:
    """A Hugging Face config as a dict: from a config.json (or a directory holding one), a
    transformers PretrainedConfig, or a dict."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return dict(source.to_dict())
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json: missing field {key!r}")
    return hf[key]


def _rope_scaling(scaling: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """-> (llama3 factor, linear interpolation factor); refuses other kinds by name."""
    if not scaling:
        return None, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return None, float(scaling["factor"])
    if kind == "llama3":
        for key, value in _LLAMA3_ROPE.items():
            if float(scaling.get(key, value)) != value:
                raise ValueError(
                    f"config.json: rope_scaling.{key}={scaling[key]} is not supported "
                    f"(Megatron's Llama-3 scaling fixes it to {value})"
                )
        return float(scaling["factor"]), None
    raise ValueError(
        f"config.json: rope_scaling type {kind!r} is not supported; supported: linear, llama3"
    )
