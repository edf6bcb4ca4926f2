# shellcheck shell=bash
# Sourced by the slurm/*.sh batch scripts (not run on its own): rendezvous from Slurm, NCCL and
# InfiniBand settings, the plan, and a task launcher that turns Slurm's warning signal into a
# checkpoint and a requeue.
#
#   source "$SLURM_SUBMIT_DIR/slurm/common.sh"
#   mrpg_run megatron-rpg train --config examples/x.yaml --resume "$@"
#
# Variables (all optional): MRPG_PYTHON (interpreter with megatron_rpg; default .venv/bin/python
# when present, python3 in a container), MRPG_OUTPUT_ROOT / MRPG_EXPERIMENT (where a recipe's run goes: see mrpg_train),
# MRPG_CONTAINER_IMAGE / MRPG_CONTAINER_MOUNTS (pyxis/enroot: srun
# --container-image), NCCL_* / MRPG_IB_HCA (InfiniBand adapters, e.g. mlx5), MRPG_SOCKET_IFNAME (the network
# interface, e.g. ib0, for NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME alike).
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [ -z "${MRPG_PYTHON:-}" ]; then  # in a container: the image's python3
    if [ -z "${MRPG_CONTAINER_IMAGE:-}" ] && [ -x .venv/bin/python ]; then
        MRPG_PYTHON=.venv/bin/python
    else
        MRPG_PYTHON=python3
    fi
fi
export MRPG_PYTHON
# srun's flags for a step inside the image (pyxis), for every step: the trainer's tasks, the
# vLLM server and the batch shell's own checks (mrpg_python); none without an image
MRPG_CONTAINER=()
if [ -n "${MRPG_CONTAINER_IMAGE:-}" ]; then
    MRPG_CONTAINER=(--container-image="$MRPG_CONTAINER_IMAGE" --container-workdir="$PWD")
    if [ -n "${MRPG_CONTAINER_MOUNTS:-}" ]; then
        MRPG_CONTAINER+=(--container-mounts="$MRPG_CONTAINER_MOUNTS")
    fi
fi

# rendezvous: the first node's address (emulated node names need not resolve), a job-scoped port
mapfile -t MRPG_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=$(scontrol show node "${MRPG_HOSTS[0]}" | grep -oP 'NodeAddr=\K\S+' || true)
export MASTER_ADDR=${MASTER_ADDR:-${MRPG_HOSTS[0]}}
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
export WORLD_SIZE=$SLURM_NTASKS

# GPUs: Megatron's TP comm overlap needs one connection per device; NCCL over InfiniBand
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_IB_HCA=${MRPG_IB_HCA:-${NCCL_IB_HCA:-}}
# one interface for both backends: NCCL's bootstrap and gloo (the CPU collectives and the weight
# transfer's gloo groups) must reach the other nodes over the same network
if [ -n "${MRPG_SOCKET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME=$MRPG_SOCKET_IFNAME GLOO_SOCKET_IFNAME=$MRPG_SOCKET_IFNAME
fi
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

mrpg_plan() {
    echo "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}): ${#MRPG_HOSTS[@]} node(s) [${MRPG_HOSTS[*]}]," \
        "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT," \
        "restart ${SLURM_RESTART_COUNT:-0}, python $MRPG_PYTHON" \
        "${MRPG_CONTAINER_IMAGE:+, container $MRPG_CONTAINER_IMAGE}"
}

# Minutes this job has left (squeue's %L: [D-]HH:MM:SS, MM:SS or UNLIMITED) less
# MRPG_EXIT_MARGIN_MINUTES (default 3) for the ranks to exit and the job to requeue: the
# trainer's checkpoint.stop_after_minutes, so that a run whose time limit comes first saves
# before it and is requeued (a job that reaches its limit ends as TIMEOUT, which --requeue does
# not requeue). 0 when the job has no limit.
mrpg_minutes_left() {
    local left days=0 total=0 part
    left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)
    [[ $left =~ ^([0-9]+-)?[0-9:]+$ ]] || { echo 0; return; }
    if [[ $left == *-* ]]; then days=${left%%-*}; left=${left#*-}; fi
    IFS=: read -r -a parts <<<"$left"
    while [ "${#parts[@]}" -lt 3 ]; do parts=(0 "${parts[@]}"); done  # MM:SS, SS
    for part in "${parts[@]}"; do total=$((total * 60 + 10#$part)); done
    total=$(((days * 86400 + total) / 60 - ${MRPG_EXIT_MARGIN_MINUTES:-3}))
    echo $((total > 1 ? total : 1))
}

# Run the command once per task (RANK, LOCAL_RANK from Slurm; output lines labelled with the
# task's rank), each task with the job's
# --cpus-per-task (srun does not inherit it since Slurm 22.05: without it every task of a node
# shares one core). USR1/TERM to this batch shell (--signal=B:USR1@N, scancel --signal,
# preemption) are forwarded to every task. A run that stopped early (on a signal, or before the
# time limit: checkpoint.stop_after_minutes) has checkpointed and says so in
# MRPG_STOPPED_EARLY_FILE; the job then requeues itself and the next run resumes (--resume).
mrpg_run() {
    local rc=0 srun_pid
    export MRPG_STOPPED_EARLY_FILE="$PWD/.mrpg/stopped-$SLURM_JOB_ID"
    mkdir -p .mrpg
    rm -f "$MRPG_STOPPED_EARLY_FILE"
    mrpg_plan
    trap 'kill -USR1 "$srun_pid" 2>/dev/null || true' USR1 TERM
    # shellcheck disable=SC2016,SC2086  # $SLURM_*: each task's bash; MRPG_SRUN_ARGS: words
    srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ${MRPG_SRUN_ARGS:-} \
        "${MRPG_CONTAINER[@]}" bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID \
                WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
        _ "$@" &
    srun_pid=$!
    while true; do  # wait returns early when a trapped signal arrives: wait until srun is gone
        rc=0
        wait "$srun_pid" || rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ "$rc" = 0 ] && [ -f "$MRPG_STOPPED_EARLY_FILE" ]; then
        echo "job $SLURM_JOB_ID: stopped at $(cat "$MRPG_STOPPED_EARLY_FILE"); requeueing"
        rm -f "$MRPG_STOPPED_EARLY_FILE"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$rc"
}

# vLLM on nodes of its own (the config's rollout.engine_nodes=E): a `vllm serve` on each of the
# job's last E nodes, data parallel over its GPUs, each engine with the config's
# rollout.tensor_parallel, dtype, GPU memory share and longest sequence (what the launch plan
# checked: vllm_server --config), dummy weights (the trainer sends them over NCCL, to every
# server in one transfer group), the HF directory MRPG_ENGINE_MODEL for the config and tokenizer.
# Each server listens on its node's cluster address only and requires a key made for this job
# (MRPG_ENGINE_API_KEY, which the trainer's tasks inherit); the trainer finds them, comma-
# separated, at MRPG_ENGINE_URL. Returns when all are healthy; ends the job when one's srun step
# ends first. Arguments: E, the config file and its overrides.
mrpg_serve() {
    local nodes=$1 config=$2 gpus=${SLURM_GPUS_ON_NODE:-8} i k host address override sets=()
    shift 2
    for override in "$@"; do sets+=(--set "$override"); done
    : "${MRPG_ENGINE_MODEL:?set MRPG_ENGINE_MODEL to the HF directory of the model (config, tokenizer)}"
    if [ ! -f "$MRPG_ENGINE_MODEL/config.json" ]; then
        echo "MRPG_ENGINE_MODEL=$MRPG_ENGINE_MODEL: no config.json there (a HF model directory)" >&2
        return 1
    fi
    MRPG_ENGINE_API_KEY=${MRPG_ENGINE_API_KEY:-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}
    export MRPG_ENGINE_API_KEY
    local hosts=("${MRPG_HOSTS[@]: -nodes}") urls=() servers=() port
    for k in "${!hosts[@]}"; do
        host=${hosts[k]} port=$((8000 + k))  # a port each: emulated nodes share an address
        address=$(scontrol show node "$host" | grep -oP 'NodeAddr=\K\S+' || echo "$host")
        # the flags VLLMServerEngine needs live in one place: megatron_rpg/rollout/vllm_server.py
        srun --nodes=1 --ntasks=1 --nodelist="$host" --kill-on-bad-exit=1 \
            --cpus-per-task="${MRPG_ENGINE_CPUS:-${SLURM_CPUS_ON_NODE:-1}}" "${MRPG_CONTAINER[@]}" \
            "$MRPG_PYTHON" -m megatron_rpg.rollout.vllm_server "$MRPG_ENGINE_MODEL" \
            --host "$address" --port "$port" --config "$config" "${sets[@]}" --gpus "$gpus" &
        servers+=($!)
        urls+=("http://$address:$port")
    done
    MRPG_ENGINE_URL=$(IFS=,; echo "${urls[*]}")
    export MRPG_ENGINE_URL
    local waiting=("${!hosts[@]}") left
    for ((i = 0; i < 1800; i++)); do
        left=()
        for k in "${waiting[@]}"; do
            if curl -sf "${urls[k]}/health" >/dev/null; then
                echo "vllm serve on ${hosts[k]} is healthy at ${urls[k]} after $i s"
            elif ! kill -0 "${servers[k]}" 2>/dev/null; then  # its srun step ended
                echo "vllm serve on ${hosts[k]} exited before it was healthy (see its output above)" >&2
                return 1
            else
                left+=("$k")
            fi
        done
        [ "${#left[@]}" -eq 0 ] && return 0
        waiting=("${left[@]}")
        sleep 1
    done
    echo "vllm serve on ${hosts[*]} did not become healthy in 30 minutes" >&2
    return 1
}

# Python for the batch shell's own checks (a config value, the launch plan): MRPG_PYTHON, in
# the image when there is one (a one-task step: the host needs no Python of its own).
mrpg_python() {
    if [ "${#MRPG_CONTAINER[@]}" -gt 0 ]; then
        srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${MRPG_CONTAINER[@]}" "$MRPG_PYTHON" "$@"
    else
        "$MRPG_PYTHON" "$@"
    fi
}

# The value of a config key with overrides, as the trainer will read it.
mrpg_config_value() {
    mrpg_python -c 'import sys
from megatron_rpg.config import load_config
value = load_config(sys.argv[1], sys.argv[3:])
for part in sys.argv[2].split("."):
    value = getattr(value, part)
print(value)' "$@"
}

# The GPU recipes' body: check the layout, the memory plan and the input files on the job's
# nodes (in the image, with one), then train from
# the Megatron checkpoint $CKPT (resuming the run's own checkpoints when requeued); with
# rollout.engine_nodes=E (in the config or an override) the engines get the last E nodes and the
# trainer the others.
mrpg_train() {
    local config=$1 engine_nodes
    shift
    : "${CKPT:?set CKPT to a Megatron checkpoint of the model (megatron-rpg convert hf-to-mcore)}"
    # one directory per experiment, outside the checkout: MRPG_OUTPUT_ROOT/MRPG_EXPERIMENT (default
    # runs/<job name>-<job id>: a requeued job keeps its id, a new submission starts its own);
    # a logging.run_dir argument still wins
    local run_dir=${MRPG_OUTPUT_ROOT:-$PWD/runs}/${MRPG_EXPERIMENT:-${SLURM_JOB_NAME:-rpg}-$SLURM_JOB_ID}
    local overrides=("logging.run_dir=$run_dir" "model.checkpoint=$CKPT" "$@")
    engine_nodes=$(mrpg_config_value "$config" rollout.engine_nodes "${overrides[@]}")
    mrpg_python -m megatron_rpg.cli launch --config "$config" --nodes "$SLURM_JOB_NUM_NODES" \
        --gpus-per-node "${SLURM_GPUS_ON_NODE:-8}" --dry-run --check-inputs "${overrides[@]}"
    if [ "$engine_nodes" -gt 0 ]; then
        mrpg_serve "$engine_nodes" "$config" "${overrides[@]}"
        local trainer_nodes=$((SLURM_JOB_NUM_NODES - engine_nodes))
        MRPG_SRUN_ARGS="--nodes=$trainer_nodes --ntasks=$((trainer_nodes * ${SLURM_NTASKS_PER_NODE:-8}))"
        MRPG_SRUN_ARGS+=" --nodelist=$(IFS=,; echo "${MRPG_HOSTS[*]:0:trainer_nodes}")"
        export MRPG_SRUN_ARGS
    fi
    mrpg_run "$MRPG_PYTHON" -m megatron_rpg.cli train --config "$config" --resume "${overrides[@]}" \
        "checkpoint.stop_after_minutes=$(mrpg_minutes_left)"
}
