"""HF checkpoint directories: atomic sharded writing, lazy reading, and every bad input."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megatron_rpg.checkpoint import HFCheckpoint, write_hf_checkpoint

from hf_cases import TOKENS, hf_model


@pytest.fixture(scope="module")
def model():
    return hf_model("qwen2")  # tied embeddings: lm_head is not written


def weights(model):
    return [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_written_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, model):
    bound = 100_000
    out = write_hf_checkpoint(
        tmp_path / "out", weights(model), model.config.to_dict(), shard_bytes=bound
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    state = dict(weights(model))
    for shard in shards:  # each shard respects the bound, unless one tensor is bigger alone
        names = [n for n, f in index["weight_map"].items() if f == shard]
        size = sum(state[n].numel() * state[n].element_size() for n in names)
        assert size <= bound or len(names) == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)
    source = HFCheckpoint(out)
    assert set(source.names()) == {k for k, _ in weights(model)}
    for name, tensor in weights(model):
        assert torch.equal(source.get(name), tensor)
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_unless_forced(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; pass force=True"):
        write_hf_checkpoint(out, weights(model), model.config.to_dict())
    assert (out / "keep.txt").read_text() == "mine"
    write_hf_checkpoint(out, weights(model), model.config.to_dict(), force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_a_failure_midway_leaves_nothing_and_keeps_the_old_output(tmp_path, model):
    def broken():
        yield from weights(model)[:3]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write_hf_checkpoint(tmp_path / "new", broken(), model.config.to_dict(), shard_bytes=1)
    assert not (tmp_path / "new").exists()
    old = write_hf_checkpoint(tmp_path / "old", weights(model), model.config.to_dict())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(RuntimeError, match="source went away"):
        write_hf_checkpoint(old, broken(), model.config.to_dict(), force=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_duplicate_and_empty_streams_are_refused(tmp_path, model):
    first = weights(model)[0]
    with pytest.raises(ValueError, match=f"tensor '{first[0]}' was given twice"):
        write_hf_checkpoint(tmp_path / "dup", [first, first], {})
    with pytest.raises(ValueError, match="no tensors to write"):
        write_hf_checkpoint(tmp_path / "empty", [], {})
    assert list(tmp_path.iterdir()) == []


def test_reader_names_what_is_wrong(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        HFCheckpoint(tmp_path)
    save_file({"ids": torch.arange(4), "w": torch.ones(2)}, tmp_path / "model.safetensors")
    source = HFCheckpoint(tmp_path)
    with pytest.raises(KeyError, match=r"checkpoint has no tensor 'lm_head\.weight'"):
        source.get("lm_head.weight")
    with pytest.raises(ValueError, match=r"tensor 'ids' has dtype torch\.int64"):
        source.get("ids")
    (tmp_path / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"index\.json: not a safetensors index"):
        HFCheckpoint(tmp_path)
