"""Generated times-table problems with a disjoint held-out split: the task of the real-model
recipe (examples/smollm2_cpu.yaml, docs/recipes/smollm2_cpu.md).

    train, heldout = multiplication_problems(seed=0)   # {"problem": ..., "answer": ...} records
    write_jsonl(train, "runs/smollm2_cpu/data/train.jsonl")

Each problem is one of TEMPLATES filled with factors a and b in FACTORS; the answer is a * b.
Held-out problems are whole (template, a, b) combinations never seen in training, chosen by
seed: training reaches the same facts in other words and other facts in the same words, never
the held-out text itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_rpg.data.records import write_text_atomic

FACTORS = range(2, 13)
TEMPLATES = (
    "Calculate {a} * {b}.",
    "What is {a} × {b}?",
    "What is {a} times {b}?",
    "Compute {a} * {b}.",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
)


Records = list[dict[str, str]]


def multiplication_problems(seed: int, heldout: int = 150) -> tuple[Records, Records]:
    """(train, held-out) records; `heldout` of the len(TEMPLATES) x 11 x 11 problems held out."""
    records = [
        {"problem": template.format(a=a, b=b), "answer": str(a * b)}
        for template in TEMPLATES
        for a in FACTORS
        for b in FACTORS
    ]
    if not 1 <= heldout < len(records):
        raise ValueError(f"heldout={heldout}: need 1 <= heldout < {len(records)}")
    random.Random(seed).shuffle(records)
    return records[heldout:], records[:heldout]


def write_jsonl(records: list[dict[str, str]], path: str | Path) -> Path:
    """Write records as JSON lines through a temporary file renamed into place."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    """python -m megatron_rpg.data.multiplication OUT_DIR [--seed S] [--heldout N]: writes
    OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_rpg.data.multiplication")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=150)
    args = parser.parse_args(argv)
    train, heldout = multiplication_problems(args.seed, args.heldout)
    for name, records in (("train", train), ("heldout", heldout)):
        print(write_jsonl(records, Path(args.out_dir) / f"{name}.jsonl"), len(records))


if __name__ == "__main__":
    main()
