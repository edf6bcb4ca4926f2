"""The conversion tool end to end on spawned gloo ranks, against a tiny transformers model:
HF -> Megatron TP2xPP2 -> reshard TP1 -> HF must be bit-identical to the source, through both
layer specs (Transformer Engine's names, Megatron's local ones)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rpg.checkpoint import HFCheckpoint, write_hf_checkpoint

from hf_cases import hf_model

pytestmark = pytest.mark.slow  # minutes: left out of the quick run, pytest -m "not slow"

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"


def convert(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_model("llama")  # Llama-3 RoPE scaling must survive config.json both ways
    out = tmp_path_factory.mktemp("hf") / "llama"
    write_hf_checkpoint(out, model.state_dict().items(), model.config.to_dict())
    (out / "tokenizer_config.json").write_text("{}")
    return out


def test_hf_to_tp2pp2_to_tp1_to_hf_is_bit_identical(tmp_path, hf_dir):
    """te spec in, local to reshard, te out: the checkpoint is the same under both."""
    done = convert(
        "hf-to-mcore",
        *("--hf", hf_dir, "--out", tmp_path / "mc", "--tp", 2, "--pp", 2, "--verify"),
        *("--layer-spec", "te"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verify: max |logits difference| vs transformers = " in done.stdout
    assert "parameters loaded (rank 0) " in done.stderr  # the progress line
    done = convert(
        "reshard",
        "--ckpt",
        tmp_path / "mc",
        "--out",
        tmp_path / "tp1",
        "--tp",
        1,
        "--layer-spec",
        "local",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    done = convert(
        "mcore-to-hf",
        "--ckpt",
        tmp_path / "tp1",
        "--out",
        tmp_path / "back",
        "--verify",
        "--layer-spec",
        "te",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verify: max |logits difference| vs transformers = " in done.stdout
    source, back = HFCheckpoint(hf_dir), HFCheckpoint(tmp_path / "back")
    assert set(back.names()) == set(source.names())
    for name in source.names():
        assert torch.equal(back.get(name), source.get(name)), name
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_and_missing_tensor_are_refused(tmp_path, hf_dir):
    (tmp_path / "taken").mkdir()
    done = convert("hf-to-mcore", "--hf", hf_dir, "--out", tmp_path / "taken", "--tp", 2)
    assert done.returncode == 1 and "taken exists; pass --force" in done.stderr
    assert list((tmp_path / "taken").iterdir()) == []

    broken = tmp_path / "broken"
    source = HFCheckpoint(hf_dir)
    kept = [(n, source.get(n)) for n in source.names() if n != "model.layers.2.mlp.up_proj.weight"]
    write_hf_checkpoint(broken, kept, source.config)
    done = convert("hf-to-mcore", "--hf", broken, "--out", tmp_path / "out", "--tp", 2)
    assert done.returncode == 1
    assert "no tensor 'model.layers.2.mlp.up_proj.weight'" in done.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _tree_digest(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    "damage, message",
    [
        ("shape", "does not fit parameter (64, 96) (read from model.layers.1.mlp.down_proj.weight"),
        ("dtype", "has dtype torch.int8; supported"),
        ("architecture", "model_type 'gpt2'"),
    ],
)
def test_bad_inputs_are_named_and_leave_nothing(tmp_path, hf_dir, damage, message):
    source = HFCheckpoint(hf_dir)
    tensors = {n: source.get(n) for n in source.names()}
    config = dict(source.config)
    name = "model.layers.1.mlp.down_proj.weight"
    if damage == "shape":
        tensors[name] = tensors[name][:, :64].contiguous()
    elif damage == "dtype":
        tensors[name] = tensors[name].to(torch.int8)
    else:
        config["model_type"] = "gpt2"
    bad = tmp_path / "bad"
    write_hf_checkpoint(bad, tensors.items(), config)
    before = _tree_digest(bad)
    done = convert("hf-to-mcore", "--hf", bad, "--out", tmp_path / "out", "--tp", 1)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _tree_digest(bad) == before


def test_verify_catches_different_weights(pool2, tmp_path):
    from hf_cases import verify_against

    other = hf_model("llama", seed=1)
    write_hf_checkpoint(tmp_path / "other", other.state_dict().items(), other.config.to_dict())
    results = pool2.run(verify_against, "llama", tmp_path / "other")
    messages = [message for message, _ in results if message]
    # the last rank alone loads the transformers model, after every rank released its own
    assert len(messages) == 1 and "logits differ from the transformers model" in messages[0]
    assert [held for _, held in results] == [0, 0]


def test_verify_is_refused_for_reshard(tmp_path):
    done = convert("reshard", "--ckpt", tmp_path, "--out", tmp_path / "x", "--verify")
    assert done.returncode == 2 and "hf-to-mcore or mcore-to-hf only" in done.stderr
