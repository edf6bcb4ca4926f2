#!/usr/bin/env bash
# Hugging Face -> Megatron conversion on the TP x PP ranks the layout needs (hf-to-mcore streams
# one tensor at a time; each rank keeps only its shard): the 70B recipe's TP 8 x PP 4 is 32 tasks,
# 4 nodes of 8. VERIFY=1 adds the round-trip logits check (a forward pass of the whole model).
#   HF=/lustre/hf/Llama-3.1-70B OUT=/lustre/ckpt/llama70b-tp8pp4 sbatch slurm/convert.sh
#   HF=... OUT=... TP=4 PP=1 sbatch --nodes=1 --ntasks-per-node=4 slurm/convert.sh
#SBATCH --job-name=rpg-convert
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
: "${HF:?set HF to the Hugging Face model directory}" "${OUT:?set OUT to the new checkpoint}"
TP=${TP:-8} PP=${PP:-4}
if [ "$((TP * PP))" -gt "$SLURM_NTASKS" ]; then
    echo "TP=$TP x PP=$PP needs $((TP * PP)) tasks; the job has $SLURM_NTASKS" >&2
    exit 2
fi
export MRPG_SRUN_ARGS="--ntasks=$((TP * PP))"
verify=()
[ "${VERIFY:-0}" = 1 ] && verify=(--verify)
mrpg_run "$MRPG_PYTHON" -m megatron_rpg.cli convert hf-to-mcore --hf "$HF" --out "$OUT" \
    --tp "$TP" --pp "$PP" "${verify[@]}"
