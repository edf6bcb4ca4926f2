"""Policy models in every TP x PP layout against a single-process full-vocabulary reference.

Tolerances (fp32 models; TP, PP and DP change only the order of summation): log-probs and
entropies to 2e-5 absolute (values of order 1-6); each gradient to 1e-5 of its tensor's largest
entry (observed: <= 1e-6).
"""

import pytest
import torch

from megatron_rpg.config import ConfigError, ParallelConfig
from megatron_rpg.models import ModelArch, check_layout, padded_vocab_size, tp_join

from model_cases import (
    CONFIGS,
    full_weights,
    in_layout,
    micro_batches,
    reference,
    update_paths,
)


@pytest.fixture(scope="module")
def weights(pool4):
    return {name: pool4.run(full_weights, name)[0] for name in CONFIGS}


@pytest.fixture(scope="module")
def references(pool4, weights):
    out = {
        (name, t): pool4.run(reference, name, weights[name], t)[0]
        for name in CONFIGS
        for t in (1.0, 0.7)
    }
    out["qwen3", 0.7, "scored"] = pool4.run(reference, "qwen3", weights["qwen3"], 0.7, True)[0]
    out["qwen3", 0.7, "ragged"] = pool4.run(reference, "qwen3", weights["qwen3"], 0.7, True, True)[
        0
    ]
    return out


def assemble(results):
    """Per-micro-batch outputs in global order, and full gradients joined over TP ranks."""
    first_tp = [r for r in results if r["layout"].tp_rank == 0 and r["logprobs"]]
    dp = results[0]["layout"].data_parallel
    order = sorted(
        ((i * dp + r["layout"].dp_rank, r, i) for r in first_tp for i in range(len(r["logprobs"]))),
        key=lambda item: item[0],
    )
    logprobs = torch.stack([r["logprobs"][i] for _, r, i in order])
    entropy = torch.stack([r["entropy"][i] for _, r, i in order])
    grads = {}
    for r in results:
        if r["layout"].dp_rank != 0:
            continue
        for name, (grad, split, gated) in r["grads"].items():
            grads.setdefault(name, {})[r["layout"].tp_rank] = (grad, split, gated)
    full = {}
    for name, shards in grads.items():
        ordered = [shards[k] for k in sorted(shards)]
        split, gated = ordered[0][1], ordered[0][2]
        tensors = [g for g, _, _ in ordered]
        full[name] = tensors[0] if split is None else tp_join(tensors, split, gated)
    return logprobs, entropy, full


LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("tp", "pp"), LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_layouts_match_full_vocabulary_reference(pool4, weights, references, tp, pp, fused):
    check("qwen3", pool4, weights, references, tp, pp, fused, 0.7 if fused else 1.0)


TOKEN_LOSS_CASES = [(1, 1, True), (4, 1, True), (2, 2, True), (2, 1, False)]


@pytest.mark.parametrize(("tp", "pp", "fused"), TOKEN_LOSS_CASES)
def test_token_separable_loss_path_matches_reference(pool4, weights, references, tp, pp, fused):
    """token_loss_fn: gradients from the fused forward pass (unfused: loss_fn, as always)."""
    check("qwen3", pool4, weights, references, tp, pp, fused, 0.7, token_loss=True)


SCORED_CASES = [(1, 1, True, False), (2, 2, True, True), (4, 1, True, True), (2, 1, False, True)]


@pytest.mark.parametrize(("tp", "pp", "fused", "token_loss"), SCORED_CASES)
def test_response_masked_micro_batches_score_only_their_response(
    pool4, weights, references, tp, pp, fused, token_loss
):
    """With a response_mask the output layer runs on the masked positions alone: their log-probs,
    entropies and every gradient equal the full-vocabulary reference's at every position, and
    the positions off the mask read 0."""
    check("qwen3", pool4, weights, references, tp, pp, fused, 0.7, token_loss, scored=True)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_families_at_tp2_pp2(pool4, weights, references, name):
    """qwen2: q/k/v bias and embeddings tied across pipeline stages; llama: Llama-3 RoPE."""
    check(name, pool4, weights, references, 2, 2, True, 1.0)


# The production branches (GPU recipes): Transformer Engine's spec (its CPU stand-ins) and
# sequence parallelism; ragged micro-batches (widths 12, 11, 9, 12: odd ones padded to a multiple
# of TP under SP; with PP one schedule exchanges each activation's shape).
SPEC_CASES = [
    ("te", 1, 1, False, True),
    ("te", 2, 1, True, True),
    ("te", 2, 2, True, True),
    ("local", 2, 1, True, False),
    ("local", 2, 2, True, True),
    ("te", 4, 1, True, True),
]


@pytest.mark.parametrize(("layer_spec", "tp", "pp", "sequence_parallel", "token_loss"), SPEC_CASES)
def test_te_spec_and_sequence_parallel_on_ragged_micro_batches_match_reference(
    pool4, weights, references, layer_spec, tp, pp, sequence_parallel, token_loss
):
    check(
        "qwen3",
        pool4,
        weights,
        references,
        tp,
        pp,
        True,
        0.7,
        token_loss,
        scored=True,
        layer_spec=layer_spec,
        sequence_parallel=sequence_parallel,
        ragged=True,
    )


def check(
    name,
    pool,
    weights,
    references,
    tp,
    pp,
    fused,
    temperature,
    token_loss=False,
    scored=False,
    layer_spec="local",
    sequence_parallel=False,
    ragged=False,
):
    kind = "ragged" if ragged else "scored"
    want = references[(name, temperature, kind) if scored else (name, temperature)]
    logprobs, entropy, grads = assemble(
        pool.run(
            in_layout,
            name,
            weights[name],
            tp,
            pp,
            fused,
            temperature,
            token_loss,
            scored,
            layer_spec,
            sequence_parallel,
            ragged,
        )
    )
    torch.testing.assert_close(logprobs, want["logprobs"], atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy, want["entropy"], atol=2e-5, rtol=0)
    tied = CONFIGS[name]["tie_word_embeddings"]
    reference_key = {"output_layer.weight": "embedding.word_embeddings.weight"} if tied else {}
    # Every parameter's gradient is there (a tied last stage holds a copy of the embedding's).
    assert {reference_key.get(k, k) for k in grads} == set(want["grads"])
    for key, grad in grads.items():
        expected = want["grads"][reference_key.get(key, key)]
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * scale, msg=key)
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3


def test_dtype_resolution():
    from megatron_rpg.models import resolve_dtype

    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype("float32") == torch.float32


def test_vocabulary_padding_is_layout_independent():
    assert padded_vocab_size(200, 1) == padded_vocab_size(200, 4) == 256
    assert padded_vocab_size(151936, 8) == 151936 and padded_vocab_size(128256, 2) == 128256
    assert padded_vocab_size(100, 3) == 384  # lcm(128, 3)


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, r"parallel.tensor_parallel.*got 3.*num_attention_heads \(8\)"),
        (1, 3, r"parallel.pipeline_parallel.*got 3.*num_hidden_layers \(4\)"),
    ],
)
def test_layouts_that_do_not_divide_the_model_are_refused(tp, pp, message):
    arch = ModelArch.from_hf(CONFIGS["qwen3"])
    with pytest.raises(ConfigError, match=message):
        check_layout(arch, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))


def test_kv_heads_must_divide_too():
    arch = ModelArch.from_hf(dict(CONFIGS["qwen3"], num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(2\)"):
        check_layout(arch, ParallelConfig(tensor_parallel=4))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; supported: \['llama'"),
        ({"hidden_size": None}, r"missing field 'hidden_size'"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, r"rope_scaling type 'yarn'"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8, "high_freq_factor": 2.0}},
            r"rope_scaling.high_freq_factor=2.0 is not supported",
        ),
        ({"model_type": "llama", "attention_bias": True}, r"llama: attention_bias=true"),
    ],
)
def test_bad_hf_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArch.from_hf(dict(CONFIGS["qwen3"], **change))


def test_config_json_on_disk(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    arch = ModelArch.from_hf(tmp_path)
    assert arch.family.name == "llama" and arch.llama3_rope_factor == 8.0
    assert arch.head_dim == 8 and arch.num_query_groups == 4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        ModelArch.from_hf(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no Hugging Face config"):
        ModelArch.from_hf(tmp_path / "missing")


def test_transformers_5_rope_parameters_are_read():
    """transformers >= 5 writes rope_parameters (theta inside) instead of rope_scaling."""
    hf = {k: v for k, v in CONFIGS["llama"].items() if k not in ("rope_scaling", "rope_theta")}
    hf["rope_parameters"] = dict(CONFIGS["llama"]["rope_scaling"], rope_theta=500000.0)
    arch = ModelArch.from_hf(hf)
    assert arch.llama3_rope_factor == 8.0 and arch.rope_theta == 500000.0
    plain = ModelArch.from_hf(dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.llama3_rope_factor is None and plain.rope_theta == 1e6


def test_micro_batches_are_deterministic():
    a, b = micro_batches(), micro_batches()
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))


def test_reference_is_frozen_until_updated(pool2, weights):
    from model_cases import reference_update

    for rank in pool2.run(reference_update, "qwen3", weights["qwen3"]):
        assert rank["policy_moved"] and rank["policy_gained"] > 0.01  # the policy trained
        assert rank["frozen"] and rank["no_grad"] and rank["ref_lp_unchanged"]
        assert rank["equal_after_update"] and rank["ref_lp_is_policy_lp"]


def test_bad_checkpoints_and_batches_are_named(pool2, weights):
    from model_cases import loading_errors

    errors = pool2.run(loading_errors, "qwen3", weights["qwen3"])[0]
    assert errors["missing"][0] == "KeyError"
    assert "decoder.layers.1.mlp.linear_fc2.weight" in errors["missing"][1]
    assert errors["shape"] == (
        "ValueError",
        "tensor 'decoder.final_layernorm.weight': shard shape (65,) does not fit parameter (64,)",
    )
    assert errors["micro_batches"] == (
        "ValueError",
        "forward_backward needs at least one micro-batch",
    )


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_length_bucketed_update_gives_the_padded_gradients(pool2, weights, tp, pp):
    """Micro-batches trimmed to their longest sequence (one schedule run per width, gradients
    finalized once) against the same loss on padded micro-batches: every gradient to 1e-5 of
    its tensor's largest entry, on every rank (TP shards, both pipeline stages, DP replicas)."""
    from model_cases import padded_and_bucketed

    for rank in pool2.run(padded_and_bucketed, "llama", weights["llama"], tp, pp):
        assert rank["relative"] <= 1e-5 and rank["largest"] > 0
        assert len(rank["widths"]) > 1  # several schedule runs
        assert rank["columns"][1] < 0.8 * rank["columns"][0]  # the padding is gone


UPDATE_CASES = [
    ("rpg_reinforce_urkl", {"clip": "dual", "rollout_is": "token"}, 2, 1, False),
    (
        "rpg_reinforce_urkl",
        {"clip": "dual", "rollout_is": "sequence", "kl_anchor": "ref"},
        2,
        2,
        True,
    ),
    ("grpo", {"agg": "seq-mean-token-mean", "kl_anchor": "ref", "beta": 0.04}, 1, 2, True),
    ("rpg_fkl", {"clip": "none", "agg": "seq-mean-token-sum", "beta": 0.1}, 4, 1, True),
]


@pytest.mark.parametrize(("loss", "overrides", "tp", "pp", "with_old"), UPDATE_CASES)
def test_update_in_forward_equals_the_recompute_path(
    pool4, weights, loss, overrides, tp, pp, with_old
):
    """The trainer's loss (update.policy_losses) with its gradients taken in the forward pass
    gives the recompute path's gradients (1e-5 of each tensor's largest entry) and metrics."""
    results = pool4.run(update_paths, "qwen3", weights["qwen3"], tp, pp, loss, overrides, with_old)
    for r in results:
        assert r["used_token_path"]
        assert r["largest"] > 0
        assert r["error"] < 1e-5, r["error"]
        fused, recompute = r["metrics"]
        for a, b in zip(fused, recompute, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
