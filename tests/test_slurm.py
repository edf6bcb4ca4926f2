"""The Slurm launcher on a real (local) Slurm: `sbatch --wait slurm/rpg_tiny_local.sh` (2 tasks,
gloo, TP=2) trains and logs; a failing job's status reaches sbatch; a signal (what preemption or
a time limit sends) makes the job checkpoint, requeue itself and resume. Start Slurm with
`bash scripts/slurm_local.sh start` (.ci/run does); without it these tests skip, unless
MEGATRON_RPG_REQUIRE_SLURM=1 (CI), where they fail."""

import json
import os
import re
import shutil
import subprocess
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
    return None


_why = _slurm_running()
if _why and os.environ.get("MEGATRON_RPG_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MEGATRON_RPG_REQUIRE_SLURM=1 but {_why}")
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


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


def test_signal_checkpoints_requeues_and_resumes(tmp_path):
    process, job = sbatch(tmp_path, "train_steps=30", "checkpoint.save_interval=0")
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    assert log.exists(), output(tmp_path, job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    assert process.wait(timeout=600) == 0, output(tmp_path, job)
    text = output(tmp_path, job)
    # after a whole step, or during one's rollout (that step is abandoned and repeated)
    assert re.search(
        r"stopping on a signal( \(step \d+ abandoned after its rollout\))?: checkpoint", text
    )
    assert "requeueing" in text
    assert "restart 1" in text and "resume: continuing from" in text
    assert steps(tmp_path) == list(range(1, 31))
