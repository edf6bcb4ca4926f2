#!/usr/bin/env bash
# The RPG paper's experiment: Qwen3-4B on one node of 8 H100 80GB (examples/rpg_paper_qwen3_4b.yaml:
# trainer TP 2 x DP 4, eight vLLM engines of TP 1, colocated). CKPT: a Megatron checkpoint of
# Qwen3-4B (megatron-rpg convert hf-to-mcore --hf Qwen3-4B --out $CKPT --tp 2); extra arguments are
# config overrides (data.train_path=... for the DAPO-Math-17k English JSON lines).
#   CKPT=/lustre/ckpt/qwen3-4b-tp2 sbatch slurm/rpg_paper_qwen3_4b.sh [key=value ...]
#SBATCH --job-name=rpg-paper-qwen3-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
mrpg_train "${CONFIG:-examples/rpg_paper_qwen3_4b.yaml}" "$@"
