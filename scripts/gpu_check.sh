#!/usr/bin/env bash
# The first hour on a GPU machine, as one command: the GPU tests (tests/gpu: fused log-probs vs the
# fp32 full vocabulary, a training step under the local and Transformer Engine specs, the trainer
# in fp32/bf16, vLLM colocated with its weight sync checked by log-probs) and the CPU twin's
# GPU-branch tests (TE names, checkpoints across specs, vLLM's packed transfer), then one table:
# check, value, bound, pass. Exits non-zero on any failure, and on a machine without CUDA.
# Usage: bash scripts/gpu_check.sh [python]   (default: .venv/bin/python, else python3)
# Under 10 minutes on one H100/H200; see README.md "On a GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
[ -x "$python" ] || python=python3
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); the CPU suite is scripts/test.sh" >&2
    exit 2
fi
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
status=0
timeout 540 "$python" -m pytest -q -p no:cacheprovider tests/gpu tests/test_gpu_branches.py \
    --junitxml="$report/gpu.xml" || status=$?
"$python" - "$report/gpu.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

rows = [("check", "value", "bound", "pass")]
for case in ET.parse(sys.argv[1]).iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    outcome = "skip" if case.find("skipped") is not None else "FAIL" if (
        case.find("failure") is not None or case.find("error") is not None) else "ok"
    value = props.get("value", f"{float(case.get('time', 0)):.1f} s")
    rows.append((case.get("name"), value, props.get("bound", "passes"), outcome))
widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
for row in rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
PY
exit "$status"
