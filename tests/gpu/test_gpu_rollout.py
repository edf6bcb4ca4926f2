"""vLLM on a GPU: generate from a tiny model, sync the trainer's weights into it, print the
log-prob gap. Skipped without CUDA or without vLLM (the `gpu` extra)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the engine contract runs on CPU"
)


def test_vllm_generate_and_sync_from_megatron(tmp_path, nccl_world, check):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[gpu])")
    import json

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import LogprobOptions, forward_backward
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.rollout import SamplingParams, sync_weights
    from megatron_rpg.rollout.vllm_engine import VLLMEngine

    config = dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    initialize_model_parallel(ParallelConfig(), seed=0)
    arch = ModelArch.from_hf(config)
    chunks = [c.cuda() for c in build_model_chunks(arch, ParallelConfig(), torch.float32)]
    (tmp_path / "hf").mkdir()  # config only: the engine starts with dummy weights
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    engine = VLLMEngine(tmp_path / "hf", dtype="float32", gpu_memory_utilization=0.3)
    stats = sync_weights(chunks, arch, engine)
    params = SamplingParams(n=2, max_tokens=16, seed=0)
    groups = engine.generate([[1, 2, 3, 4]], params)
    tokens = torch.tensor([[1, 2, 3, 4, *r.token_ids] for r in groups[0]], device="cuda")
    ours = forward_backward(chunks, [{"tokens": tokens}], LogprobOptions(arch.vocab_size))
    theirs = torch.tensor([r.logprobs for r in groups[0]], device="cuda")
    gap = (ours[0]["logprobs"][:, 3:] - theirs).abs()
    print(
        f"sync {stats.bytes / 1e6:.1f} MB in {stats.seconds:.3f} s; log-prob gap mean "
        f"{gap.mean():.2e} max {gap.max():.2e}"
    )
    check(gap.max().item(), "< 1e-2 (fp32 weights after the sync)")
    assert gap.max() < 1e-2
    engine.close()
