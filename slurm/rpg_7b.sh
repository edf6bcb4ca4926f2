#!/usr/bin/env bash
# RPG at the paper's scale: a 7B model on one node of 8 H100 80GB (examples/rpg_7b.yaml: trainer
# TP 2 x DP 4, four vLLM engines of TP 2, colocated). Extra arguments are config overrides.
#   CKPT=/lustre/ckpt/qwen2.5-7b-tp2 sbatch slurm/rpg_7b.sh [key=value ...]
#SBATCH --job-name=rpg-7b
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
mrpg_train "${CONFIG:-examples/rpg_7b.yaml}" "$@"
