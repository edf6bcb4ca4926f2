#!/usr/bin/env bash
# The main job: the embedded tiny RPG training run on the CPU (examples/tiny_cpu.yaml), on a
# fresh machine too: creates .venv, installs the pinned CPU stack, trains. Extra arguments are
# config overrides, e.g. `bash scripts/train_tiny.sh train_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/install.sh)
# --overwrite: running the demo again replaces its run in runs/tiny_cpu
exec "$venv/bin/megatron-rpg" train --config examples/tiny_cpu.yaml --overwrite "$@"
