"""Hugging Face <-> Megatron parameter mapping for the Llama-style families (Llama, Qwen2, Qwen3,
Mistral): one mapping, used by checkpoint conversion and by the weight export stream.

Full (unsharded) tensors, Megatron local-spec names:

    model.embed_tokens.weight                    embedding.word_embeddings.weight   (vocab padded)
    model.layers.i.input_layernorm.weight        decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.*      decoder.layers.i.self_attention.linear_qkv.*
    model.layers.i.self_attn.o_proj.weight       decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.self_attn.{q,k}_norm.weight   decoder.layers.i.self_attention.{q,k}_layernorm.w
    model.layers.i.post_attention_layernorm.w    decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight     decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight          decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                            decoder.final_layernorm.weight
    lm_head.weight                               output_layer.weight  (absent when tied; padded)

Transformer Engine's spec (layer_spec "te") fuses each norm into the linear after it, so two names
differ (Megatron's distributed checkpoints use these names for both specs):

    model.layers.i.input_layernorm.weight        decoder.layers.i.self_attention.linear_qkv
                                                                             .layer_norm_weight
    model.layers.i.post_attention_layernorm.w    decoder.layers.i.mlp.linear_fc1.layer_norm_weight

Megatron's fused QKV interleaves by query group g: rows [q heads of g; k_g; v_g] for each g, each
head `head_dim` rows (the per-group layout that keeps a TP shard a contiguous block of groups).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import Tensor

from megatron_rpg.models.arch import ModelArch
from megatron_rpg.models.builder import padded_vocab_size

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")  # padded rows

# Megatron suffix -> HF suffix for one-to-one tensors inside a layer.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # te spec
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # te spec
}
# The local spec's separate norm -> the TE spec's norm fused into the next linear.
_TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def layer_spec_of(names: Iterable[str]) -> str:
    """'te' or 'local': which spec a model's parameter names come from."""
    te = any(name.endswith(_TE_NORM_NAMES["input_layernorm.weight"]) for name in names)
    return "te" if te else "local"


def spec_name(local_name: str, layer_spec: str) -> str:
    """A local-spec parameter name (or its suffix within a layer) under layer_spec."""
    if layer_spec != "te":
        return local_name
    for local, te in _TE_NORM_NAMES.items():
        if local_name.endswith(local):
            return local_name.removesuffix(local) + te
    return local_name


def megatron_names(arch: ModelArch, layer_spec: str = "local") -> list[str]:
    """Every full Megatron parameter name of the model under layer_spec ('local' or 'te'), in
    HF order."""
    layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    if arch.family.qkv_bias:
        layer.append("self_attention.linear_qkv.bias")
    if arch.family.qk_layernorm:
        layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    layer += [
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    layer = [spec_name(suffix, layer_spec) for suffix in layer]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{s}" for i in range(arch.num_layers) for s in layer]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_sources(name: str) -> list[str]:
    """The HF tensors a full Megatron tensor is made of."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face mapping for Megatron tensor {name!r}")
    prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if suffix in _LAYER_DIRECT:
        return [prefix + _LAYER_DIRECT[suffix]]
    if suffix.startswith("self_attention.linear_qkv."):
        kind = suffix.rsplit(".", 1)[1]  # weight | bias
        return [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
    if suffix == "mlp.linear_fc1.weight":
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    raise KeyError(f"no Hugging Face mapping for Megatron tensor {name!r}")


def _groups(arch: ModelArch) -> tuple[int, int, int]:
    """(query groups, query heads per group, head_dim)."""
    return (
        arch.num_query_groups,
        arch.num_attention_heads // arch.num_query_groups,
        arch.head_dim,
    )


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: ModelArch) -> Tensor:
    groups, per_group, head_dim = _groups(arch)
    rest = q.shape[1:]
    return torch.cat(
        [
            q.reshape(groups, per_group * head_dim, *rest),
            k.reshape(groups, head_dim, *rest),
            v.reshape(groups, head_dim, *rest),
        ],
        dim=1,
    ).reshape(-1, *rest)


def split_qkv(qkv: Tensor, arch: ModelArch) -> tuple[Tensor, Tensor, Tensor]:
    groups, per_group, head_dim = _groups(arch)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * head_dim, *rest).split(
        [per_group * head_dim, head_dim, head_dim], dim=1
    )
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab(weight: Tensor, arch: ModelArch) -> Tensor:
    """Append zero rows up to the padded vocabulary (padding is masked in every log-prob)."""
    padded = padded_vocab_size(arch.vocab_size, 1)
    if weight.shape[0] != arch.vocab_size:
        raise ValueError(
            f"embedding has {weight.shape[0]} rows; config.json says vocab_size={arch.vocab_size}"
        )
    return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])])


def to_megatron(name: str, get: Callable[[str], Tensor], arch: ModelArch) -> Tensor:
    """The full Megatron tensor `name`, built from HF tensors fetched by `get(hf_name)`."""
    sources = [get(s) for s in hf_sources(name)]
    if name in VOCAB_TENSORS:
        return pad_vocab(sources[0], arch)
    if len(sources) == 3:  # linear_qkv's weight or bias
        q, k, v = sources
        return fuse_qkv(q, k, v, arch)
    if len(sources) == 2:  # linear_fc1's [gate; up]
        return torch.cat(sources, dim=0)
    return sources[0]


def to_hf(name: str, tensor: Tensor, arch: ModelArch) -> list[tuple[str, Tensor]]:
    """The HF tensors of the full Megatron tensor `name`."""
    sources = hf_sources(name)
    if name in VOCAB_TENSORS:
        return [(sources[0], tensor[: arch.vocab_size])]
    if len(sources) == 3:  # linear_qkv's weight or bias
        return list(zip(sources, split_qkv(tensor, arch), strict=True))
    if len(sources) == 2:  # linear_fc1's [gate; up]
        return list(zip(sources, tensor.chunk(2, dim=0), strict=True))
    return [(sources[0], tensor)]


def to_hf_shard(name: str, shard: Tensor, arch: ModelArch, tp: int) -> list[tuple[str, Tensor]]:
    """The HF tensors' TP shards within Megatron's TP shard of `name` (one of tp): the q, k and v
    heads of the shard's query groups, its gate and up rows, its row or column block of the
    others. They are the shards vLLM's parallel linear layers hold at the same TP rank. Not for
    the vocabulary tensors, whose padding differs between Megatron and vLLM."""
    if name in VOCAB_TENSORS:
        raise ValueError(f"{name!r} is padded differently by Megatron and vLLM: export it whole")
    local = replace(
        arch,
        num_attention_heads=arch.num_attention_heads // tp,
        num_query_groups=arch.num_query_groups // tp,
    )
    return to_hf(name, shard, local)


def hf_names(arch: ModelArch) -> list[str]:
    """Every HF tensor name of the model (the export stream yields exactly these)."""
    return [s for name in megatron_names(arch) for s in hf_sources(name)]
