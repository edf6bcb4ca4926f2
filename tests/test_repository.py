"""The repository stands on its own: no file points outside it, and the benchmark data ships as
package data that loads from anywhere, each file matching the checksum its README gives."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "megatron_rpg" / "data" / "benchmarks"


def test_no_tracked_file_refers_to_a_sibling_shared_directory():
    files = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    outside = "../" + "shared"  # written apart so that this file does not match itself
    hits = [
        name
        for name in files
        if (ROOT / name).is_file() and outside in (ROOT / name).read_text(errors="replace")
    ]
    assert not hits, hits


def test_shipped_data_matches_the_checksums_in_its_readme():
    readme = (DATA / "README.md").read_text()
    listed = dict(re.findall(r"^\| (\S+\.jsonl) \|.*\| ([0-9a-f]{64}) \|$", readme, re.M))
    assert set(listed) == {p.name for p in DATA.glob("*.jsonl")}
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


def test_aime24_loads_from_the_package_with_nothing_else_present(tmp_path):
    """A process in an empty directory, without MEGATRON_RPG_DATA: the 30 AIME 2024 problems."""
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_RPG_DATA"}
    code = (
        "from megatron_rpg.data.benchmarks import DATA_DIR, load_benchmark\n"
        "problems = load_benchmark('aime24')\n"
        "print(len(problems), DATA_DIR, problems[0]['answer'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    count, where, answer = done.stdout.split()
    assert int(count) == 30 and Path(where) == DATA and answer.isdigit()
