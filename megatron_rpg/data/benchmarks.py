"""The shipped benchmarks (AIME24/25, AMC23, MATH-500, GSM8K test) and held-out JSON lines files:
where they are and how they are read. Evaluation (evaluation.py) and the config's checks use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_rpg.data.records import read_records

# Package data (installed with the package; sources, licences and checksums in its README.md);
# $MEGATRON_RPG_DATA points elsewhere (a directory of files with these names).
DATA_DIR = Path(os.environ.get("MEGATRON_RPG_DATA") or Path(__file__).with_name("benchmarks"))
BENCHMARKS = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
}


def benchmark_name(name: str) -> str:
    """A shipped benchmark's name, or a JSON lines file's stem."""
    return name if name in BENCHMARKS else Path(name).stem


def load_benchmark(name: str, data_dir: str | Path = DATA_DIR) -> list[dict[str, str]]:
    """The problems of a shipped benchmark, or of a JSON lines file with `problem` and `answer`
    (a task's held-out split); a bad line is named by file, line number and field."""
    if name in BENCHMARKS:
        path = Path(data_dir) / BENCHMARKS[name]
    elif name.endswith(".jsonl"):
        path = Path(name)
    else:
        raise ValueError(f"benchmark {name!r} is not one of {sorted(BENCHMARKS)} or a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name}: no file {path}")
    return read_records(path, {"problem": "problem", "answer": "answer"})
