"""tools/prepare_data.py on small local fixtures written in the published formats (nothing is
downloaded): DAPO-Math-17k's template stripped, duplicates and CJK problems dropped; GSM8K's
answer after ####; bad rows named; nothing overwritten."""

import json
import subprocess
import sys
from pathlib import Path

from megatron_rpg.data import PROMPT_TEMPLATE
from megatron_rpg.data.math import MathDataset

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prepare_data.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def dapo_row(problem, answer):
    """A row as the published DAPO-Math-17k has it (its JSON lines export)."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": PROMPT_TEMPLATE.format(problem=problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "x"},
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_dapo_english_problems_once_each_in_the_trainers_format(tmp_path):
    source = write(
        tmp_path / "dapo.jsonl",
        [
            dapo_row("What is $2+3$?", "5"),
            dapo_row("What is $2+3$?", "5"),  # the release repeats problems
            dapo_row("求 $x$ 的值，若 $x+1=3$。", "2"),  # a Chinese problem
            dapo_row("Find $n$ with $n^2 = 49$, $n > 0$.", "7"),
        ],
    )
    out = tmp_path / "data" / "dapo_en.jsonl"
    done = run("dapo", "--source", source, "--out", out)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["problem"], r["answer"]) for r in records] == [
        ("What is $2+3$?", "5"),
        ("Find $n$ with $n^2 = 49$, $n > 0$.", "7"),
    ]
    dataset = MathDataset(out)  # data.train_path reads it; the prompt is the published one
    assert (
        dataset.prompt(dataset.problems[0])
        == dapo_row("What is $2+3$?", "5")["prompt"][0]["content"]
    )
    everything = tmp_path / "all.jsonl"
    assert run("dapo", "--source", source, "--out", everything, "--all-languages").returncode == 0
    assert len(everything.read_text().splitlines()) == 3


def test_gsm8k_answers_after_the_marks(tmp_path):
    source = write(
        tmp_path / "train.jsonl",
        [{"question": "How many?", "answer": "2 + 1,000 = <<2+1000=1002>>1,002\n#### 1,002"}],
    )
    out = tmp_path / "gsm8k.jsonl"
    assert run("gsm8k", "--source", source, "--out", out).returncode == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["problem"], record["answer"]) == ("How many?", "1002")
    assert record["solution"].endswith("#### 1,002")


def test_bad_rows_are_named_and_nothing_is_overwritten(tmp_path):
    source = write(tmp_path / "bad.jsonl", [dapo_row("ok", "1"), {"prompt": []}])
    out = tmp_path / "out.jsonl"
    done = run("dapo", "--source", source, "--out", out)
    assert done.returncode == 1 and "bad.jsonl:2: no field 'prompt.0.content'" in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))
    out.write_text("keep me\n")
    good = write(tmp_path / "good.jsonl", [{"question": "q", "answer": "#### 3"}])
    done = run("gsm8k", "--source", good, "--out", out)
    assert done.returncode == 1 and "exists; pass --force" in done.stderr
    assert out.read_text() == "keep me\n"
    assert run("gsm8k", "--source", good, "--out", out, "--force").returncode == 0
    plain = write(tmp_path / "plain.jsonl", [{"question": "q", "answer": "3"}])
    done = run("gsm8k", "--source", plain, "--out", tmp_path / "x.jsonl")
    assert done.returncode == 1 and "plain.jsonl:1: field 'answer' has no '#### <answer>'" in (
        done.stderr
    )
