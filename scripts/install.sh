#!/usr/bin/env bash
# Create .venv (or $MEGATRON_RPG_VENV) and install the project with the pinned CPU stack
# (constraints/cpu.txt). Sourced by scripts/test.sh and scripts/train_tiny.sh; prints the venv.
# Usage: venv=$(bash scripts/install.sh [extras])   e.g. extras "dev"
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEGATRON_RPG_VENV:-.venv}
extras=${1:-}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
wheels=()
[ -d /opt/wheels ] && wheels=(--find-links /opt/wheels)  # the CPU torch wheel on these machines
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}" \
    -c constraints/cpu.txt -e ".${extras:+[$extras]}" >&2
echo "$venv"
