"""Typed configuration: YAML + key=value overrides; every bad key or value is named."""

from pathlib import Path

import pytest

from megatron_rpg.config import ConfigError, LossConfig, RunConfig, load_config, save_config
from megatron_rpg.data import PROMPT_TEMPLATES

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
            "data.chat_template=off",
        ],
    )
    assert cfg.rollout.n == 16 and cfg.optimizer.mini_batch_size == 512
    assert cfg.data.chat_template == "off"  # YAML 1.1 reads a bare off as False
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
            ["rollout.server_url=http://n2:8000,n3:8000"],
            "rollout.server_url",
            "http(s)://host:port of each vllm serve",
        ),
        (
            ["parallel.tensor_parallel=1", "parallel.sequence_parallel=true"],
            "parallel.sequence_parallel",
            "tensor_parallel > 1",
        ),
        (["checkpoint.resume=yes please"], "checkpoint.resume", "true or false"),
        (["rollout.n=1"], "rollout.n", ">= 2 with algorithm.advantage 'group_mean'"),
        (
            ["rollout.n=1", "algorithm.advantage=group_mean_std"],
            "rollout.n",
            ">= 2 with algorithm.advantage 'group_mean_std'",
        ),
        (["loss.kl_estimate_clamp=0"], "loss.kl_estimate_clamp", "null (off) or > 0"),
        (["loss.rollout_is_on_kl=false"], "loss.rollout_is_on_kl", "its KL is inside the clip"),
        (["algorithm.loss=ppo"], "algorithm.loss", "rpg_reinforce_urkl"),
        (["optimizer.mini_batch_size=6"], "optimizer.mini_batch_size", "a multiple of"),
        (["train_steps=0"], "train_steps", ">= 1"),
        (["loss=3"], "loss", "a mapping of LossConfig fields"),
        (["loss.beta"], "loss.beta", "key=value"),
        (["optimizer.lr=.inf"], "optimizer.lr", "a finite number"),
        (["algorithm.kl_in_reward=0.05"], "algorithm.kl_in_reward", "0.0 with loss.kl_anchor"),
        (["algorithm.ref_update_interval=4"], "algorithm.ref_update_interval", "0 with loss.kl_"),
        (
            ["loss.kl_anchor=ref", "algorithm.ref_update_interval=24"],
            "algorithm.ref_update_interval",
            "a multiple of the optimizer steps per RL step (16 =",
        ),
        (["algorithm.incorrect_reward=1"], "algorithm.incorrect_reward", "< 1"),
        (["sft.steps=5"], "sft.steps", "0 with data.task 'math'"),
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


def test_cli_prints_resolved_config_and_names_bad_keys(cli):
    ok = cli("config", "--config", PAPER, "loss.beta=0.01")
    assert ok.returncode == 0 and "beta: 0.01" in ok.stdout
    bad = cli("config", "loss.nope=1")
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


@pytest.mark.parametrize("recipe", ["rpg_paper_qwen3_4b", "rpg_7b", "rpg_70b"])
def test_paper_recipes_run_the_papers_setup(recipe):
    """arXiv 2505.17508 App. H and the authors' verl scripts (sources in the recipes' comments):
    512 prompts x 16, mini-batches of 32 prompts x 16, DAPO dynamic sampling on accuracy and the
    soft overlong penalty, +1/-1 rewards, the DAPO prompt in the chat template, Mean@32."""
    cfg = load_config(ROOT / "examples" / f"{recipe}.yaml")
    a, d = cfg.algorithm, cfg.data
    assert (d.prompts_per_step, cfg.rollout.n, cfg.optimizer.mini_batch_size) == (512, 16, 512)
    assert a.loss == "rpg_reinforce_urkl" and a.advantage == "group_mean"
    assert cfg.loss.kl_estimate_clamp == 10.0  # the authors' kl_penalty
    assert a.dynamic_sampling and a.dynamic_sampling_max_rounds == 20
    assert a.overlong_buffer == cfg.rollout.max_tokens // 4 and a.incorrect_reward == -1.0
    assert (cfg.loss.beta, cfg.loss.clip, cfg.loss.kl_anchor) == (1e-4, "dual", "old")
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip_c) == (0.2, 0.28, 10.0)
    assert d.prompt_template == "dapo" and d.chat_template == "on"
    assert (cfg.eval_benchmarks, cfg.eval_k) == ("aime24,aime25,amc23", 32)
    o = cfg.optimizer
    assert (o.weight_decay, o.warmup_steps, o.clip_grad, cfg.train_steps) == (0.1, 10, 1.0, 400)
    assert "Remember to put your answer on its own line" in PROMPT_TEMPLATES["dapo"]
