"""A dependency-free progress line for long loops (conversion, training, evaluation).

    bar = Progress(total=120, what="tensors")
    for ...:
        bar.update(1, reward=0.42)      # postfix fields shown as key=value
    bar.close()

On a terminal the line is redrawn in place (at most every `interval_s`); elsewhere (CI logs,
Slurm output files) a full line is printed at most every `log_interval_s`, and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(
        self,
        total: int,
        what: str,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval_s: float = 0.2,
        log_interval_s: float = 30.0,
    ):
        self.total, self.what, self.enabled = total, what, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if self.tty else log_interval_s
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self.start = self.shown = time.perf_counter()

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.count += count
        self.postfix.update(postfix)
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= self.interval_s or self.count >= self.total):
            self.shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        fields = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        percent = 100.0 * self.count / self.total if self.total else 100.0
        return (
            f"{self.what} {self.count}/{self.total} ({percent:3.0f}%) {elapsed:6.1f}s "
            f"{rate:.2f}/s {fields}"
        ).rstrip()

    def _show(self, now: float) -> None:
        end = "" if self.tty and self.count < self.total else "\n"
        prefix = "\r\x1b[2K" if self.tty else ""
        self.stream.write(prefix + self.line(now) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.count < self.total:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def step_fields(metrics: dict[str, float]) -> dict[str, float]:
    """The progress line's fields of an RL step's metrics."""
    return dict(
        reward=metrics["reward/mean"],
        kl=metrics.get("kl/k3", float("nan")),
        entropy=metrics.get("entropy/mean", float("nan")),
        clip=metrics.get("clip/upper", 0.0) + metrics.get("clip/lower", 0.0),
        len=metrics["response/length_mean"],
        tok_s=metrics["throughput/tokens_per_s"],
    )
