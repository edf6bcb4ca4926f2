"""Rank functions for tests/test_hf_mapping.py: tiny transformers models in Megatron layouts."""

import torch

TINY = dict(
    vocab_size=200,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    hidden_act="silu",
)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FAMILIES = {
    "llama": dict(
        TINY,
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "qwen2": dict(TINY, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(TINY, model_type="qwen3", head_dim=24, tie_word_embeddings=False),
    "mistral": dict(TINY, model_type="mistral", sliding_window=None, tie_word_embeddings=False),
}
# vLLM's CPU attention needs heads of at least 32 dimensions
VLLM_FAMILIES = {
    name: dict(
        FAMILIES[name],
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=[ARCHITECTURES[name]],
    )
    for name in ("llama", "qwen2")
}
TOKENS = torch.randint(200, (2, 16), generator=torch.Generator().manual_seed(5))


def hf_model(name, seed=0, families=FAMILIES):
    """A random transformers model of the family (fp32, eager attention), weights scaled up so
    that logits are far from uniform."""
    import transformers

    config = transformers.AutoConfig.for_model(**families[name])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def load_in_layout(name, hf_state, tp, pp, families=FAMILIES, layer_spec="local"):
    """HF weights -> full Megatron tensors -> this rank's shards at TP x PP."""
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks, load_full_state_dict
    from megatron_rpg.models.hf_mapping import megatron_names, to_megatron
    from megatron_rpg.parallel import initialize_model_parallel

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize_model_parallel(parallel, seed=0)
    arch = ModelArch.from_hf(families[name])
    chunks = build_model_chunks(arch, parallel, torch.float32, layer_spec=layer_spec)
    names = megatron_names(arch, layer_spec)
    full = {n: to_megatron(n, hf_state.__getitem__, arch) for n in names}
    for chunk in chunks:
        load_full_state_dict(chunk, full)
    return arch, chunks


def megatron_logits(name, hf_state, tp, pp):
    """HF weights in this layout; full logits on the last stage's ranks (None elsewhere)."""
    from megatron_rpg.forward_backward import full_logits

    arch, chunks = load_in_layout(name, hf_state, tp, pp)
    return full_logits(chunks, TOKENS, arch.vocab_size)


def export_from_layout(name, hf_state, tp, pp, bucket_bytes, layer_spec="local"):
    """Load at TP x PP, stream the weights back out under HF names; rank 0 keeps them, with the
    bytes of each bucket and of the largest buffer its tensors are views of."""
    from megatron_rpg.models.export import iter_hf_weights

    arch, chunks = load_in_layout(name, hf_state, tp, pp, layer_spec=layer_spec)
    exported, bucket_sizes, buffers = {}, [], set()
    for bucket in iter_hf_weights(chunks, arch, bucket_bytes).buckets():
        bucket_sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        for hf_name, tensor in bucket:
            exported[hf_name] = tensor.clone()
            buffers.add(tensor.untyped_storage().nbytes())
    return exported, bucket_sizes, max(buffers)


def export_shards_from_layout(name, hf_state, tp, pp, layout, bucket_bytes):
    """Load at TP x PP, stream the weights out in a shard layout: (TP rank, PP rank, what this
    rank yields (copies), the stream's bytes for this rank, the names of the tensors it yielded
    that are not views of its parameters)."""
    from megatron.core import parallel_state as ps

    from megatron_rpg.models.export import iter_hf_weights

    arch, chunks = load_in_layout(name, hf_state, tp, pp)
    stream = iter_hf_weights(chunks, arch, bucket_bytes, layout=layout)
    storages = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    exported, copied = {}, set()
    for hf_name, tensor in stream:
        exported[hf_name] = tensor.clone()
        if tensor.untyped_storage().data_ptr() not in storages:
            copied.add(hf_name)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    return tp_rank, pp_rank, exported, stream.nbytes, copied


def verify_against(name, hf_dir):
    """Seed-0 weights at TP2 checked against another model's directory: (the message or None,
    how many model chunks the caller still holds after the check, which releases them)."""
    from megatron_rpg.checkpoint.convert import verify_logits

    arch, chunks = load_in_layout(name, hf_model(name).state_dict(), 2, 1)
    try:
        verify_logits(chunks, arch, hf_dir)
    except ValueError as err:
        return str(err), len(chunks)
    return None, len(chunks)


def checkpoint_logits(checkpoint, tp, pp, tokens):
    """A Megatron checkpoint loaded at TP x PP: full logits on the last stage's ranks."""
    from megatron_rpg.checkpoint.mcore import checkpoint_hf_config, load_mcore
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import full_logits
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    arch = ModelArch.from_hf(checkpoint_hf_config(checkpoint))
    initialize_model_parallel(parallel, seed=0)
    chunks = build_model_chunks(arch, parallel, torch.float32, initialize=False)
    load_mcore(chunks, checkpoint)
    return full_logits(chunks, tokens, arch.vocab_size)
