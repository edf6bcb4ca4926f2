"""The trainer on CUDA: a world of one under a launcher's environment (as srun/torchrun give it),
so the process group is the CPU+CUDA pair (gloo for the step's CPU flags and counts, NCCL for
tensors on the GPU). Skipped on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU trainer is in tests/"
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("dtype", "engine"), [("float32", "embedded"), ("bfloat16", "embedded"), ("float32", "vllm")]
)
def test_trainer_runs_on_cuda(tmp_path, check, dtype, engine):
    """A few RPG steps; with vLLM colocated (sleep/wake around the update), every step's weight
    sync is checked by the trainer's log-probs of the sampled tokens against vLLM's."""
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[gpu])")
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29541",
    )
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_rpg.cli",
            "train",
            "--config",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            "train_steps=12",
            "sft.steps=10",
            "checkpoint.save_interval=6",
            "eval_interval=6",
            f"model.params_dtype={dtype}",
            f"rollout.engine={engine}",
            f"logging.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert all(v == v for k, v in r.items() if k in ("loss", "reward/mean", "kl/k3"))
    assert any((run_dir / "checkpoints").glob("*12*"))
    gap = max(r["rollout/abs_gap_max"] for r in records)
    bound = 1e-3 if dtype == "float32" else 0.1
    check(gap, f"< {bound} (engine vs trainer log-probs)")
    assert gap < bound
    print(
        f"{dtype}: {records[-1]['time/step'] * 1e3:.0f} ms/step, reward "
        f"{records[0]['reward/mean']:.3f} -> {records[-1]['reward/mean']:.3f}"
    )
