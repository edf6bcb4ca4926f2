"""Reading JSON lines of problems, the seeded order in which a run takes them, and writing a file
whole (atomically)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_records(path: str | Path, fields: dict[str, str]) -> list[dict[str, str]]:
    """Records of a JSON lines file as {name: str(record[key])} for `fields` = {name: key}; a bad
    line is named by file, line number and field. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        for key in fields.values():
            value = record.get(key)
            if not isinstance(value, str | int | float) or isinstance(value, bool) or value == "":
                raise ValueError(f"{path}:{number}: field {key!r} missing or empty (got {value!r})")
        records.append({name: str(record[key]) for name, key in fields.items()})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def take(items: list[T], seed: int, position: int, count: int) -> list[T]:
    """`count` items from global position `position` of the run's sequence: epoch e is a
    permutation of `items` seeded by (seed, e), the same on every rank and every resume."""
    size = len(items)
    orders: dict[int, list[int]] = {}
    out = []
    for i in range(position, position + count):
        epoch = i // size
        if epoch not in orders:
            order = list(range(size))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            orders[epoch] = order
        out.append(items[orders[epoch][i % size]])
    return out


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path` and rename it over `path`: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path
