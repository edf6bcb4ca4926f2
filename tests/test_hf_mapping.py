"""HF <-> Megatron mapping against real (tiny, random) transformers models of each family.

Tolerance for logits: fp32, atol 1e-4 (the issue's figure; observed differences are summation
order, ~1e-5). Weight round trips are bit-identical.
"""

import pytest
import torch

from megatron_rpg.models import ModelArch
from megatron_rpg.models.hf_mapping import hf_names, megatron_names, to_hf, to_megatron

from hf_cases import (
    FAMILIES,
    TOKENS,
    export_from_layout,
    export_shards_from_layout,
    hf_model,
    megatron_logits,
)


@pytest.fixture(scope="module")
def models():
    return {name: hf_model(name) for name in FAMILIES}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mapping_covers_every_hf_tensor_and_round_trips_bitwise(models, name):
    state = models[name].state_dict()
    arch = ModelArch.from_hf(FAMILIES[name])
    expected = {k for k in state if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    assert set(hf_names(arch)) == expected
    back = {}
    for mname in megatron_names(arch):
        back.update(to_hf(mname, to_megatron(mname, state.__getitem__, arch), arch))
    assert back.keys() == expected
    for key in expected:
        assert torch.equal(back[key], state[key]), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_weights_in_megatron_tp2_pp2_give_the_transformers_logits(pool4, models, name):
    model = models[name]
    with torch.no_grad():
        want = model(TOKENS).logits
    results = pool4.run(megatron_logits, name, model.state_dict(), 2, 2)
    got = [r for r in results if r is not None]
    assert len(got) == 2  # the two TP ranks of the last stage
    for logits in got:
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    assert want.std() > 1.0  # far from uniform


@pytest.mark.parametrize("layer_spec", ["local", "te"])
def test_export_stream_from_tp2_pp2_is_bit_identical_and_respects_buckets(
    pool4, models, layer_spec
):
    import transformers

    name = "qwen3"
    state = models[name].state_dict()
    bucket_bytes = 100_000  # smaller than a layer: many buckets; one 102,400-byte tensor alone
    results = pool4.run(export_from_layout, name, state, 2, 2, bucket_bytes, layer_spec)
    for exported, sizes, buffer in results:  # every rank receives the whole stream
        assert exported.keys() == state.keys()
        assert all(torch.equal(exported[k], state[k]) for k in state)
        largest_tensor = max(t.numel() * t.element_size() for t in state.values())
        assert len(sizes) > 10
        assert max(sizes) <= max(bucket_bytes, largest_tensor)
        assert buffer == max(sizes)  # each bucket is a buffer of its own size
    reloaded = transformers.AutoModelForCausalLM.from_config(models[name].config).eval()
    reloaded.load_state_dict(results[0][0])
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, models[name](TOKENS).logits)


def tp_split(key):
    """The dim along which vLLM's parallel linear layers split an HF tensor (independently of
    the Megatron mapping: column-parallel projections by rows, o_proj and down_proj by columns)."""
    if key.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return 0 if key.endswith(("proj.weight", "proj.bias")) else None


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)], ids=["tp2", "tp2xpp2"])
def test_sharded_export_yields_each_ranks_own_hf_shards(pool4, models, tp, pp):
    """tp_shards: every rank yields its TP shard of every projection (the row or column block
    vLLM's layer at that rank holds; the q, k, v heads of its query groups), the norms whole,
    the vocabulary tensors whole-shaped with the rank's own rows (Megatron's and vLLM's padded
    vocabularies agree: 200 -> 256), bit-identical; at PP1 the shards are the parameters
    themselves. own_shards: a rank yields only its own stage's shards (the padded
    vocabulary's rows too), a norm from TP rank 0 only; joined over the TP ranks they are the
    HF model."""
    name = "qwen2"  # QKV bias
    state = models[name].state_dict()
    if ModelArch.from_hf(FAMILIES[name]).tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    ranks = tp * pp
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    qkv = {k for k in state if any(f"{p}_proj." in k for p in "qkv")}
    results = pool4.run(export_shards_from_layout, name, state, tp, pp, "tp_shards", 50_000)
    for tp_rank, _, exported, nbytes, copied in results[:ranks]:
        assert exported.keys() == state.keys()
        for key, tensor in exported.items():
            split = tp_split(key)
            if key in vocab:  # whole-shaped, holding the rank's rows (256 / 2 each) for vLLM
                rows = slice(128 * tp_rank, min(128 * (tp_rank + 1), len(state[key])))
                assert tensor.shape == state[key].shape, key
                assert torch.equal(tensor[rows], state[key][rows]), key
                continue
            want = state[key] if split is None else state[key].chunk(tp, split)[tp_rank]
            assert torch.equal(tensor, want), key
        assert nbytes == sum(t.numel() * t.element_size() for t in exported.values())
        assert nbytes < sum(t.numel() * t.element_size() for t in state.values())
        # PP1: the vocabulary is gathered in the TP group, q, k and v are cut out of Megatron's
        # per-group interleaving; the rest are the parameters themselves
        assert copied == (state.keys() if pp > 1 else (set(vocab) | qkv) & state.keys())
    results = pool4.run(export_shards_from_layout, name, state, tp, pp, "own_shards", 50_000)
    joined: dict[str, list] = {}
    for _, _, exported, nbytes, copied in sorted(results[:ranks], key=lambda r: r[0]):
        assert copied == qkv & exported.keys()  # the rest: views of its own parameters
        assert nbytes == sum(t.numel() * t.element_size() for t in exported.values())
        for key, tensor in exported.items():
            joined.setdefault(key, []).append(tensor)
    assert all(r[2] == {} and r[3] == 0 for r in results[ranks:])  # DP replica 1 sends nothing
    assert joined.keys() == state.keys()
    for key, shards in joined.items():
        split = 0 if key in vocab else tp_split(key)
        if split is None:
            assert len(shards) == 1, key  # from TP rank 0 only
            whole = shards[0]
        else:
            assert len(shards) == tp, key
            whole = torch.cat(shards, split).narrow(split, 0, state[key].shape[split])
        assert torch.equal(whole, state[key]), key


def test_wrong_vocabulary_rows_are_named(models):
    state = dict(models["llama"].state_dict())
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:150]
    arch = ModelArch.from_hf(FAMILIES["llama"])
    message = r"embedding has 150 rows; config\.json says vocab_size=200"
    with pytest.raises(ValueError, match=message):
        to_megatron("embedding.word_embeddings.weight", state.__getitem__, arch)
