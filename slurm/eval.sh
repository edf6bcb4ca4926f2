#!/usr/bin/env bash
# Benchmark evaluation of a HF-format model with vLLM on one node (megatron-rpg eval: mean@k,
# pass@k, maj@k with bootstrap intervals; results.json and results.md in OUT). The engine's tensor
# parallelism: EVAL_TP, default auto (the largest that fits the model's attention heads on the
# node's GPUs: 4 for Qwen2.5-7B's 28 heads on 8). For a Megatron
# checkpoint, convert first: megatron-rpg convert mcore-to-hf --ckpt C --out HF.
#   HF=/lustre/hf/policy-step400 OUT=runs/eval-step400 sbatch slurm/eval.sh [--k 32 ...]
#SBATCH --job-name=rpg-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
: "${HF:?set HF to the model directory}" "${OUT:?set OUT to the results directory}"
mrpg_run "$MRPG_PYTHON" -m megatron_rpg.cli eval --hf "$HF" --out "$OUT" --engine vllm \
    --tensor-parallel "${EVAL_TP:-auto}" --grader-workers 16 "$@"
