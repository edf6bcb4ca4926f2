"""The GPU recipes' branches taken on the CPU (issue: the CPU twin): Transformer Engine's layer
spec (its stand-ins), checkpoints across specs, the export stream under vLLM's packed NCCL
transfer, and ranks that wait out a rollout longer than the process group's timeout. Sequence
parallelism and ragged micro-batches against the full-vocabulary reference: test_models.py;
the trainer with both: test_trainer.py."""

from pathlib import Path

import pytest
import torch
from spec_cases import (
    engine_outlasting_the_timeout,
    logits_in_spec,
    save_in_spec,
    state_dict_keys,
    vllm_packed_broadcast,
)

from megatron_rpg.parallel import RankError, RankPool

from hf_cases import TOKENS, hf_model

TE_KEYS = Path(__file__).parent / "data" / "te_spec_qwen3_state_dict_keys.txt"


def _te_spec_buildable() -> bool:
    """On the CPU always (the stand-ins); on a GPU only with Transformer Engine."""
    from megatron_rpg.models.builder import _have_transformer_engine

    return not torch.cuda.is_available() or _have_transformer_engine()


needs_te_spec = pytest.mark.skipif(
    not _te_spec_buildable(), reason="a GPU without Transformer Engine has no te spec"
)


@needs_te_spec
def test_te_spec_has_transformer_engines_state_dict_names(pool2):
    """The checked-in list is TE's names (TELayerNormColumnParallelLinear's `layer_norm_weight`,
    every TE module's `_extra_state`, TEDotProductAttention's included). On a GPU with TE the te
    spec is built from TE's own modules, on the CPU from the stand-ins: both must give it."""
    te = pool2.run(state_dict_keys, "qwen3", "te")[0]
    assert te == TE_KEYS.read_text().split()
    local = pool2.run(state_dict_keys, "qwen3", "local")[0]
    assert "decoder.layers.0.input_layernorm.weight" in local
    assert "decoder.layers.0.self_attention.core_attention._extra_state" not in local


@needs_te_spec
@pytest.mark.parametrize(("saved", "loaded"), [("local", "te"), ("te", "local")])
def test_a_checkpoint_loads_under_the_other_spec_with_equal_logits(pool2, tmp_path, saved, loaded):
    """Saved at TP2 under one spec, loaded at PP2 under the other: the transformers logits."""
    out = tmp_path / "ckpt"
    pool2.run(save_in_spec, "qwen3", 2, 1, saved, str(out))
    results = pool2.run(logits_in_spec, str(out), 1, 2, loaded)
    with torch.no_grad():
        want = hf_model("qwen3")(TOKENS).logits
    (got,) = [r for r in results if r is not None]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer_spec", ["local", "te"])
def test_vllm_packed_nccl_transfer_of_the_export_stream_is_bit_identical(pool2, layer_spec):
    """vLLM's NCCL trainer engine packs views of the stream's tensors across buckets (about
    1 GB, here 100 kB over 10 kB buckets) before concatenating them: every tensor must arrive
    with its own numbers. Reusing one buffer for every bucket fails this (checked)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[gpu])")
    if layer_spec == "te" and not _te_spec_buildable():
        pytest.skip("a GPU without Transformer Engine has no te spec")
    state = hf_model("llama").state_dict()
    out = pool2.run(vllm_packed_broadcast, "llama", state, 2, 10_000, 100_000, layer_spec)[0]
    assert out["buckets"] > 2 * out["packs"] > 2  # packs span several buckets
    assert out["received"].keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(out["received"][key], tensor), key


@pytest.mark.slow
def test_ranks_waiting_for_rank0s_rollout_outlive_the_process_group_timeout():
    """Rank 0 generates, then grades, for 6 s each under a 2 s collective timeout: the others
    wait on the store, not in a collective, and all get rank 0's answers."""
    with RankPool(world_size=2, timeout_s=2.0) as pool:
        try:
            results = pool.run(engine_outlasting_the_timeout, 6.0)
        except RankError as err:
            pytest.fail(f"a rank gave up waiting: {err}")
    assert results == [([7, 8], [1.0])] * 2


def test_the_te_spec_is_refused_on_a_gpu_without_transformer_engine(monkeypatch):
    from megatron_rpg.config import ConfigError
    from megatron_rpg.models import builder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builder, "_have_transformer_engine", lambda: False)
    assert builder.resolve_layer_spec("auto") == "local"
    with pytest.raises(ConfigError, match=r"model\.layer_spec"):
        builder.resolve_layer_spec("te")
    monkeypatch.setattr(builder, "_have_transformer_engine", lambda: True)
    assert builder.resolve_layer_spec("auto") == "te"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it runs the checks")
def test_gpu_check_says_it_needs_a_gpu_and_fails_here():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr
