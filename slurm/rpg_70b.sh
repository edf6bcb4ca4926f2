#!/usr/bin/env bash
# RPG on a 70B model: 8 nodes x 8 H100 80GB (examples/rpg_70b.yaml: trainer TP 8 x PP 4 x DP 2,
# vLLM TP 8 colocated). CKPT: a Megatron checkpoint of the model (megatron-rpg convert hf-to-mcore
# --hf Llama-3.1-70B --out $CKPT --tp 8 --pp 4); extra arguments are config overrides.
#   CKPT=/lustre/ckpt/llama70b-tp8pp4 sbatch slurm/rpg_70b.sh [key=value ...]
# Containers (pyxis/enroot): MRPG_CONTAINER_IMAGE=... MRPG_CONTAINER_MOUNTS=/lustre:/lustre
#SBATCH --job-name=rpg-70b
#SBATCH --nodes=8
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
mrpg_train "${CONFIG:-examples/rpg_70b.yaml}" "$@"
