#!/usr/bin/env bash
# The embedded tiny run (examples/tiny_cpu.yaml) as a Slurm job: 2 tasks on one CPU node, gloo,
# tensor parallel 2. Extra arguments are config overrides.
#   sbatch slurm/rpg_tiny_local.sh [key=value ...]          (from the repository root)
#SBATCH --job-name=rpg-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --output=slurm-%x-%j.out
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
mrpg_run "$MRPG_PYTHON" -m megatron_rpg.cli train --config examples/tiny_cpu.yaml --resume \
    parallel.tensor_parallel=2 parallel.backend=gloo logging.run_dir=runs/slurm_tiny \
    "checkpoint.stop_after_minutes=$(mrpg_minutes_left)" "$@"
