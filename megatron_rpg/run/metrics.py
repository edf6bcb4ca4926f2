"""Where a run's metrics go (rank 0): JSON lines always, TensorBoard and wandb when configured.

    log = MetricsLog(config.logging, run_dir, resume_step=0)
    log.write(step, {"reward/mean": 0.4, ...})
    log.close()                                  # also writes curves.png

metrics.jsonl holds one object per step ({"step": n, ...}); on resume the lines after the
resumed step (from the interrupted run) are dropped so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Any

from megatron_rpg.config import ConfigError, LoggingConfig
from megatron_rpg.data.records import write_text_atomic
from megatron_rpg.run.plot import write_curves_png

CURVES = ("reward/mean", "kl/k3", "entropy/mean", "eval/accuracy")


def check_logging(config: LoggingConfig) -> None:
    """Refuse, before any work, a backend that cannot be imported."""
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            allowed = "false, or install tensorboard (pip install tensorboard)"
            raise ConfigError("logging.tensorboard", True, allowed) from None
    if config.wandb_project and config.wandb_mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            allowed = "empty, or install wandb (pip install wandb)"
            raise ConfigError("logging.wandb_project", config.wandb_project, allowed) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (its writer died mid-line: a kill, a full
    disk) is dropped with a warning; any other bad line is an error naming file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number == len(lines):
            warnings.warn(f"{path}:{number}: dropped a torn last line", stacklevel=2)
        else:
            raise ValueError(
                f"{path}:{number}: not a metrics record (a JSON object with an "
                f"integer 'step'): {line[:80]!r}"
            )
    return records


class MetricsLog:
    def __init__(self, config: LoggingConfig, run_dir: Path, resume_step: int, run_config: dict):
        check_logging(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if self.path.exists():
            self.history = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if config.wandb_project and config.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=config.wandb_project,
                mode=config.wandb_mode,
                dir=str(run_dir),
                config=run_config,
                id=wandb_run_id(run_dir),  # a requeued job continues the same wandb run
                resume="allow",
            )
        self.run_dir = run_dir

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> str:
        """Flush the backends and draw the curves; returns where they are and their legend."""
        png = self.run_dir / "curves.png"
        curves = {
            key: [(r["step"], r[key]) for r in self.history if key in r and math.isfinite(r[key])]
            for key in CURVES
        }
        write_curves_png(
            png, {key: {"run": points} for key, points in curves.items()}, title=self.run_dir.name
        )
        legend = ", ".join(
            f"{key} [{min(v for _, v in points):.3g}, {max(v for _, v in points):.3g}]"
            for key, points in curves.items()
            if points
        )
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        return f"metrics: {self.path}\ncurves: {png} (panels top to bottom: {legend})"


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run directory: made on the first start, kept in run_dir/wandb_id
    and reused by every resume, so that a requeued job logs into the same wandb run."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(path, run_id)
    return run_id
