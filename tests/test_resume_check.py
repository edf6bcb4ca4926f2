"""Resume compares the new config with the newest checkpoint's: refused changes are named with
both values and the reason, ignored and applied ones are listed."""

from pathlib import Path

import pytest

from megatron_rpg.config import ConfigError, config_to_dict, load_config, save_config
from megatron_rpg.run.resume_check import IGNORED, REFUSED, _flatten, check_resume

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.hf_config=examples/tiny_model", "train_steps=10", "seed=3"]


def run_with_checkpoint(tmp_path, step=6, overrides=BASE):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    save_config(
        load_config(ROOT / "examples" / "tiny_cpu.yaml", overrides), checkpoint / "config.yaml"
    )
    (checkpoint / "COMPLETE").write_text(str(step))
    return run


def resumed(run, *overrides):
    return check_resume(run, load_config(ROOT / "examples" / "tiny_cpu.yaml", [*BASE, *overrides]))


def test_unchanged_config_resumes_silently(tmp_path):
    assert resumed(run_with_checkpoint(tmp_path)) == []
    assert check_resume(tmp_path / "never_ran", load_config()) == []


def test_hyperparameter_changes_are_applied_and_fresh_run_keys_ignored(tmp_path):
    run = run_with_checkpoint(tmp_path)
    lines = resumed(
        run,
        "loss.beta=0.25",
        "train_steps=12",
        "optimizer.lr=3e-6",
        "sft.steps=5",
        "model.checkpoint=examples/tiny_model",
        "model.layer_spec=te",
    )
    assert "loss.beta: 0.001 -> 0.25 (applied)" in lines
    assert "model.layer_spec: 'auto' -> 'te' (applied)" in lines
    assert "train_steps: 10 -> 12 (applied)" in lines
    assert "optimizer.lr: 0.0003 -> 3e-06 (applied)" in lines
    assert any(line.startswith("sft.steps: ") and "(ignored: the warm-up" in line for line in lines)
    assert any(line.startswith("model.checkpoint: ''") and "ignored" in line for line in lines)
    assert len(lines) == 6


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    [
        ("seed=4", "seed", "random streams"),
        ("parallel.tensor_parallel=2", "parallel.tensor_parallel", "RNG states are per rank"),
        ("parallel.pipeline_parallel=2", "parallel.pipeline_parallel", "per rank"),
        ("model.hf_config=examples/other", "model.hf_config", "this model's weights"),
        ("model.params_dtype=bfloat16", "model.params_dtype", "this model's weights"),
        ("model.tokenizer=other.model", "model.tokenizer", "this model's weights"),
        ("data.max_operand=5", "data.max_operand", "data position"),
        ("loss.kl_anchor=ref", "loss.kl_anchor", "reference model"),
        ("optimizer.adam_beta2=0.99", "optimizer.adam_beta2", "optimizer state"),
        ("train_steps=5", "train_steps", ">= 6, the step of"),
    ],
)
def test_changes_that_break_the_run_are_refused_by_key(tmp_path, override, key, reason):
    run = run_with_checkpoint(tmp_path)
    with pytest.raises(ConfigError) as info:
        resumed(run, override)
    assert info.value.key == key and reason in str(info.value)
    if key != "train_steps":
        assert "as saved in" in str(info.value) and "start a new run" in str(info.value)


def test_every_refused_change_is_named(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"'seed': got 4; allowed: 3 as saved in .*"
        r"also refused: data.max_operand",
    ):
        resumed(run_with_checkpoint(tmp_path), "seed=4", "data.max_operand=5")


def test_the_newest_complete_checkpoint_is_the_one_compared(tmp_path):
    run = run_with_checkpoint(tmp_path, step=4)
    newer = run_with_checkpoint(tmp_path, step=6, overrides=[*BASE, "loss.beta=0.5"])
    assert newer == run
    (run / "checkpoints" / "step_00000006" / "COMPLETE").unlink()  # torn: resume skips it
    assert resumed(run) == []
    (run / "checkpoints" / "step_00000004" / "config.yaml").write_text("{[")
    with pytest.raises(ConfigError, match=r"'--resume'.*step_00000004.*a readable checkpoint"):
        resumed(run)


def test_rules_name_real_config_keys():
    keys = _flatten(config_to_dict(load_config()))
    for prefix in [*REFUSED, *IGNORED]:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix
