"""Published training sets -> our JSON lines (`id`, `problem`, `answer`, ...), which
`data.train_path` reads. tools/prepare_data.py is the command.

    dapo:  DAPO-Math-17k (BytedTsinghua-SIA/DAPO-Math-17k, parquet or its JSON lines export):
           each row's user prompt holds the problem inside DAPO's template (megatron_rpg.data.
           PROMPT_TEMPLATE), its reward_model.ground_truth the answer. The template is stripped
           (the trainer adds it back, `data.prompt_template: dapo`), rows are deduplicated on the
           problem (the release repeats each one), and with english=True a problem with any CJK
           character is dropped: the paper's "DAPO-Math-17k (13.9k English)".
    gsm8k: GSM8K (openai/grade-school-math jsonl: question, answer "... #### 42"): the answer is
           the number after ####, commas removed; the worked solution is kept.

A row that does not have these fields is refused with its line number and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_rpg.data.math import PROMPT_TEMPLATE

_DAPO_BEFORE, _DAPO_AFTER = PROMPT_TEMPLATE.split("{problem}")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) of a .jsonl file, or of a .parquet file (needs pyarrow)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
            ) from None
        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None


def _field(path: Path, number: int, row: dict[str, Any], *keys: str | int) -> Any:
    value: Any = row
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            name = ".".join(str(k) for k in keys)
            raise ValueError(f"{path}:{number}: no field {name!r}") from None
    return value


def dapo_records(path: Path, english: bool = True) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for number, row in read_rows(path):
        prompt = str(_field(path, number, row, "prompt", 0, "content"))
        if not (prompt.startswith(_DAPO_BEFORE) and prompt.endswith(_DAPO_AFTER)):
            raise ValueError(f"{path}:{number}: field 'prompt' is not in DAPO's template")
        problem = prompt[len(_DAPO_BEFORE) : len(prompt) - len(_DAPO_AFTER)]
        answer = str(_field(path, number, row, "reward_model", "ground_truth"))
        if problem in seen or (english and _CJK.search(problem)):
            continue
        seen.add(problem)
        out.append({"id": f"dapo-{len(out):05d}", "problem": problem, "answer": answer})
    return out


def gsm8k_records(path: Path, split: str = "train") -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for number, row in read_rows(path):
        question = str(_field(path, number, row, "question"))
        solution = str(_field(path, number, row, "answer"))
        if "####" not in solution:
            raise ValueError(f"{path}:{number}: field 'answer' has no '#### <answer>'")
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        record = {"id": f"gsm8k-{split}-{len(out):05d}", "problem": question, "answer": answer}
        out.append({**record, "solution": solution})
    return out


def write_jsonl(records: list[dict[str, str]], out: Path, force: bool = False) -> None:
    """Write atomically (a temporary file renamed); an existing file is refused unless force."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    staging.replace(out)
