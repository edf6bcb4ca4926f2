"""Typed configuration: YAML + key=value overrides; every bad key or value is named."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpg.config import ConfigError, LossConfig, RunConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "rpg_paper_qwen3_4b.yaml"


def test_defaults_are_the_papers_rpg_settings():
    cfg = load_config()
    assert cfg == RunConfig()
    assert (cfg.loss.beta, cfg.loss.eps_low, cfg.loss.eps_high) == (1e-4, 0.2, 0.28)
    assert cfg.loss.dual_clip_c == 10.0 and cfg.loss.clip == "dual"
    assert cfg.algorithm.advantage == "group_mean"


def test_example_loads_and_overrides_apply():
    cfg = load_config(
        PAPER,
        [
            "loss.beta=1e-3",
            "parallel.tensor_parallel=4",
            "loss.clip=none",
            "checkpoint.resume=true",
            "loss.dual_clip_c=.inf",
        ],
    )
    assert cfg.rollout.n == 16 and cfg.optimizer.mini_batch_size == 256
    assert cfg.loss.beta == 1e-3  # YAML 1.1 reads 1e-3 as a string; coerced to float
    assert cfg.parallel.tensor_parallel == 4 and cfg.loss.clip == "none"
    assert cfg.checkpoint.resume is True and cfg.loss.dual_clip_c == float("inf")


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = load_config(PAPER, ["seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["loss.betta=0.1"], "loss.betta", "a key of LossConfig"),
        (["lossy.beta=0.1"], "lossy", "a key of RunConfig"),
        (["loss.clip=soft"], "loss.clip", "one of ['none', 'dual', 'truncate']"),
        (["loss.eps_low=1.5"], "loss.eps_low", "in [0, 1)"),
        (["loss.beta=abc"], "loss.beta", "a number"),
        (["parallel.tensor_parallel=2.5"], "parallel.tensor_parallel", "an integer"),
        (["parallel.tensor_parallel=0"], "parallel.tensor_parallel", "an integer >= 1"),
        (
            ["parallel.tensor_parallel=1", "parallel.sequence_parallel=true"],
            "parallel.sequence_parallel",
            "tensor_parallel > 1",
        ),
        (["checkpoint.resume=yes please"], "checkpoint.resume", "true or false"),
        (["algorithm.loss=ppo"], "algorithm.loss", "rpg_reinforce_urkl"),
        (["optimizer.mini_batch_size=6"], "optimizer.mini_batch_size", "a multiple of"),
        (["train_steps=0"], "train_steps", ">= 1"),
        (["loss=3"], "loss", "a mapping of LossConfig fields"),
        (["loss.beta"], "loss.beta", "key=value"),
        (["optimizer.lr=.inf"], "optimizer.lr", "a finite number"),
        (["algorithm.kl_in_reward=0.05"], "algorithm.kl_in_reward", "0.0 with loss.kl_anchor"),
        (["algorithm.ref_update_interval=4"], "algorithm.ref_update_interval", "1 with loss.kl_"),
        (["algorithm.ref_update_kl_target=0.1"], "algorithm.ref_update_kl_target", "kl_anchor=ref"),
        (
            ["algorithm.ref_update_interval=-1", "loss.kl_anchor=ref"],
            "algorithm.ref_update_interval",
            ">= 0 (0: never)",
        ),
        (["rollout.temperature=.inf"], "rollout.temperature", "a finite number"),
        (["loss.beta=-.inf"], "loss.beta", "a finite number"),
        (["loss.beta=[1"], "loss.beta", "a YAML value (expected ',' or ']'"),
    ],
)
def test_bad_values_are_rejected_with_key_value_and_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(PAPER, overrides)
    assert info.value.key == key
    assert allowed in str(info.value)


def test_sections_built_in_code_are_validated_too():
    with pytest.raises(ConfigError, match="'agg': got 'mean'"):
        LossConfig(agg="mean")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'beta': got 'x'; allowed: a number"):
        LossConfig(beta="x")  # type: ignore[arg-type]


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a YAML mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("loss: {beta: [\n")
    with pytest.raises(ConfigError, match="valid YAML") as info:
        load_config(tmp_path / "broken.yaml")
    assert "\n" not in str(info.value)  # one line, with the place
    assert "line 2, column 1" in str(info.value)
    (tmp_path / "twice.yaml").write_text("loss:\n  beta: 0.1\n  clip: none\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'beta' at line 4, column 3"):
        load_config(tmp_path / "twice.yaml")  # PyYAML alone keeps the last one silently
    (tmp_path / "sections.yaml").write_text("loss:\n  beta: 0.1\nseed: 1\nloss:\n  clip: none\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'loss' at line 4"):
        load_config(tmp_path / "sections.yaml")
    with pytest.raises(ConfigError, match=r"'--config': got '.*missing.yaml'.*No such file"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_resolved_config_and_names_bad_keys():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_rpg.cli",
            "config",
            "--config",
            str(PAPER),
            "loss.beta=0.01",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "beta: 0.01" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_rpg.cli", "config", "loss.nope=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'loss.nope'" in bad.stderr


def test_every_key_is_documented():
    import dataclasses
    import typing

    from megatron_rpg.config import RunConfig

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in keys(RunConfig) if f"| `{k}` |" not in text]
    assert not missing, missing
