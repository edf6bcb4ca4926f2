#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: creates .venv, installs the pinned CPU stack
# (constraints/cpu.txt), then lint (ruff), format check, type check (mypy) and pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/install.sh dev,smollm2)
PATH="$(cd "$venv/bin" && pwd):$PATH"  # the venv's tools (shellcheck, megatron-rpg) for tests
export PATH
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pytest "$@"
