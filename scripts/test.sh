#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: creates .venv, installs the pinned CPU stack
# (constraints/cpu.txt), then lint (ruff), format check, type check (mypy) and pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEGATRON_RPG_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
wheels=()
[ -d /opt/wheels ] && wheels=(--find-links /opt/wheels)  # the CPU torch wheel on these machines
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}" \
    -c constraints/cpu.txt -e ".[dev]"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pytest "$@"
