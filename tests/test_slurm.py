"""The Slurm launchers on a real (local) Slurm: `sbatch --wait slurm/rpg_tiny_local.sh` (2 tasks,
gloo, TP=2) trains and logs; a failing job's status reaches sbatch; `slurm/rpg_70b.sh` itself,
with the tiny model's overrides (slurm/rpg_70b_tiny_cpu.args), runs on three nodes with a vLLM
server on each of the last two, and preempted mid-run it checkpoints, requeues itself and resumes
to the uninterrupted run's metrics. Start Slurm with `SLURM_CI_NODES=3 SLURM_CI_GPUS=1 bash
scripts/slurm_local.sh start` (.ci/run does); without it these tests skip, unless
MEGATRON_RPG_REQUIRE_SLURM=1 (CI), where they fail."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "sft.steps=3",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "optimizer.mini_batch_size=8",
    "optimizer.micro_batch_size=4",
]


def _slurm_running() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    if subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode != 0:
        return "no Slurm controller answers (bash scripts/slurm_local.sh start)"
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %G"], capture_output=True, text=True, timeout=30
    ).stdout.split("\n")
    if len([n for n in nodes if "gpu:" in n]) < 3:
        return (
            "the local Slurm needs 3 nodes with a (fake) GPU each: SLURM_CI_NODES=3 SLURM_CI_GPUS=1"
        )
    return None


_why = _slurm_running()
if _why and os.environ.get("MEGATRON_RPG_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MEGATRON_RPG_REQUIRE_SLURM=1 but {_why}")
pytestmark = [pytest.mark.skipif(_why is not None, reason=_why or ""), pytest.mark.slow]


def sbatch(tmp_path, *overrides):
    """Start `sbatch --wait`; return (process, job id)."""
    process = subprocess.Popen(
        [
            "sbatch",
            "--wait",
            f"--output={tmp_path}/slurm-%j.out",
            "slurm/rpg_tiny_local.sh",
            *SMALL,
            f"logging.run_dir={tmp_path}/run",
            *overrides,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = process.stdout.readline()  # "Submitted batch job N", printed at submission
    assert first.startswith("Submitted batch job"), first + process.stderr.read()
    return process, int(first.split()[-1])


def output(tmp_path, job):
    return (tmp_path / f"slurm-{job}.out").read_text()


def steps(tmp_path):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_tiny_job_trains_on_two_tasks(tmp_path):
    process, job = sbatch(tmp_path, "train_steps=4")
    assert process.wait(timeout=600) == 0, output(tmp_path, job)
    assert "2 tasks, rendezvous" in output(tmp_path, job)
    assert steps(tmp_path) == [1, 2, 3, 4]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["reward/mean"] <= 1.0 and "kl/k3" in record
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["job"]["slurm_job_id"] == str(job)  # which job wrote the run
    assert manifest["versions"]["cuda"] == "none" and "vllm" in manifest["versions"]
    # the job's time left became the trainer's deadline (stop_after_minutes: 30 - 3 minutes)
    stop_after = manifest["config"]["checkpoint"]["stop_after_minutes"]
    assert 20 <= stop_after <= 27, stop_after


def test_failing_job_status_reaches_sbatch(tmp_path):
    process, job = sbatch(tmp_path, "loss.beta=-1")
    assert process.wait(timeout=600) != 0
    assert "loss.beta" in output(tmp_path, job)


# the 70B recipe's job shape scaled to the local cluster: a trainer node and an engine node
SMALL_JOB = [
    "--nodes=3",
    "--ntasks-per-node=1",
    "--gpus-per-node=1",
    "--cpus-per-task=1",
    "--time=00:20:00",
    "--signal=B:USR1@60",
]
SIGNAL_MARGIN_S = 60


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A warmed-up tiny model (the embedded run's supervised warm-up and one RPG step): CKPT and
    its tokenizer."""
    run_dir = tmp_path_factory.mktemp("tiny_ckpt")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_rpg.cli",
            "train",
            "--config",
            "examples/tiny_cpu.yaml",
            "train_steps=1",
            "eval_interval=0",
            f"logging.run_dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000001", run_dir / "tokenizer.model"


def rpg_70b(tmp_path, tiny_checkpoint, experiment):
    """Start `sbatch --wait slurm/rpg_70b.sh` with the tiny CPU overrides; (process, job id)."""
    checkpoint, tokenizer = tiny_checkpoint
    overrides = (ROOT / "slurm" / "rpg_70b_tiny_cpu.args").read_text().splitlines()
    env = dict(
        os.environ,
        CKPT=str(checkpoint),
        MRPG_ENGINE_MODEL=str(ROOT / "examples" / "tiny_model"),
        MRPG_OUTPUT_ROOT=str(tmp_path),
        MRPG_EXPERIMENT=experiment,
    )
    process = subprocess.Popen(
        [
            "sbatch",
            "--wait",
            *SMALL_JOB,
            f"--output={tmp_path}/slurm-%j.out",
            "slurm/rpg_70b.sh",
            *[line for line in overrides if line and not line.startswith("#")],
            f"model.tokenizer={tokenizer}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = process.stdout.readline()
    assert first.startswith("Submitted batch job"), first + process.stderr.read()
    return process, int(first.split()[-1])


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timing(rows):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
    ]


def restarts(job):
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, timeout=30
    ).stdout
    found = re.search(r"Restarts=(\d+)", shown)
    return int(found.group(1)) if found else 0


def test_rpg_70b_script_with_two_engine_nodes_is_preempted_and_resumes_to_the_same_run(
    tmp_path, tiny_checkpoint
):
    """The recipe's own script on 3 nodes: the launch plan, a vLLM CPU server on each of nodes 2
    and 3 (weights from the trainer on the first, to both in one group; the prompts shared),
    RPG steps; a USR1 mid-run (what preemption or --signal sends) -> checkpoint within the
    signal margin -> requeue -> new servers -> resume -> the metrics of the uninterrupted job,
    step for step."""
    process, job = rpg_70b(tmp_path, tiny_checkpoint, "whole")
    assert process.wait(timeout=900) == 0, output(tmp_path, job)
    whole = records(tmp_path / "whole")
    text = output(tmp_path, job)
    assert re.search(r"vllm serve on n2 is healthy at http://127\.0\.0\.1:8000", text), text
    assert re.search(r"vllm serve on n3 is healthy at http://127\.0\.0\.1:8001", text), text
    assert "3 node(s) [n1 n2 n3]" in text and "plan: fits" in text
    assert [r["step"] for r in whole] == list(range(1, 13))
    rollout = json.loads((tmp_path / "whole" / "manifest.json").read_text())["config"]["rollout"]
    assert rollout["engine"] == "vllm" and rollout["engine_nodes"] == 2

    process, job = rpg_70b(tmp_path, tiny_checkpoint, "preempted")
    log = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    assert log.exists() and process.poll() is None, output(tmp_path, job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    signalled = time.monotonic()
    while restarts(job) == 0 and time.monotonic() - signalled < SIGNAL_MARGIN_S:
        time.sleep(0.5)
    requeued_after = time.monotonic() - signalled
    assert process.wait(timeout=900) == 0, output(tmp_path, job)
    text = output(tmp_path, job)
    assert requeued_after < SIGNAL_MARGIN_S, text  # checkpointed and requeued inside the margin
    assert re.search(r"stopping on a signal( \(step \d+ abandoned (in|before) its \w+.*\))?:", text)
    assert "requeueing" in text and "restart 1" in text and "resume: continuing from" in text
    assert len(re.findall(r"vllm serve on n[23] is healthy", text)) == 4  # new servers per run
    assert without_timing(records(tmp_path / "preempted")) == without_timing(whole)
