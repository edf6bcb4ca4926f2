#!/usr/bin/env bash
# A real Slurm on this machine, for tests, CI and developers (slurm/README.md):
#   bash scripts/slurm_local.sh start     # install if missing (Debian), start; idempotent
#   bash scripts/slurm_local.sh stop      # cancel jobs, stop only the daemons it started
#   bash scripts/slurm_local.sh status
# Options (environment): SLURM_CI_NODES (1, or N emulated nodes n1..nN), SLURM_CI_CPUS (per node,
# default nproc), SLURM_CI_MEM_MB (per node, default 90% of RAM / nodes), SLURM_CI_GPUS (fake
# gpu GRES per node, default 0), SLURM_CI_DIR (state, default /tmp/megatron_rpg_slurm),
# SLURM_CI_PORT (slurmctld; slurmd take the next ones), SLURM_CONF (default /etc/slurm/slurm.conf).
set -euo pipefail

D=${SLURM_CI_DIR:-/tmp/megatron_rpg_slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
NODES=${SLURM_CI_NODES:-1}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
GPUS=${SLURM_CI_GPUS:-0}
PORT=${SLURM_CI_PORT:-6817}
HOST=$(hostname -s)
MARKER="# written by megatron_rpg scripts/slurm_local.sh"
total_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
MEM_MB=${SLURM_CI_MEM_MB:-$((total_mb * 9 / 10 / NODES))}

log() { echo "slurm_local: $*" >&2; }

node_names() {
    if [ "$NODES" = 1 ]; then echo "$HOST"; else seq -f "n%g" 1 "$NODES"; fi
}

render() {
    local gres_types="" gres="" n=0
    if [ "$GPUS" -gt 0 ]; then gres_types="GresTypes=gpu"; gres="Gres=gpu:$GPUS"; fi
    cat <<CONF
$MARKER
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
KillWait=10
MinJobAge=16
InactiveLimit=0
SlurmdTimeout=60
$gres_types
CONF
    for name in $(node_names); do
        n=$((n + 1))
        echo "NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + n)) CPUs=$CPUS RealMemory=$MEM_MB $gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

render_gres() {  # fake GPUs need File= entries, else slurmd reports 0 and the node is INVALID
    local i
    for ((i = 0; i < GPUS; i++)); do echo "Name=gpu File=/dev/null"; done
}

# a daemon from our pid file, alive (not a zombie) and of the expected name
alive() {
    local pidfile=$1 name=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}

all_alive() {
    alive "$D/munge/munged.pid" munged && alive "$D/run/slurmctld.pid" slurmctld || return 1
    local name
    for name in $(node_names); do alive "$D/run/slurmd.$name.pid" slurmd || return 1; done
}

stop_pid() {
    local pidfile=$1 name=$2 i
    alive "$pidfile" "$name" || return 0
    kill "$(cat "$pidfile")" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pidfile" "$name" || return 0; sleep 0.1; done
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
}

stop() {
    if alive "$D/run/slurmctld.pid" slurmctld; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    local pidfile
    for pidfile in "$D"/run/slurmd.*.pid; do [ -e "$pidfile" ] && stop_pid "$pidfile" slurmd; done
    stop_pid "$D/run/slurmctld.pid" slurmctld
    stop_pid "$D/munge/munged.pid" munged
}

wait_ready() {
    local i states
    for ((i = 0; i < 300; i++)); do
        states=$(sinfo -h -N -o '%T' 2>/dev/null || true)
        if [ -n "$states" ] && ! grep -vqE '^(idle|mixed|allocated|completing)' <<<"$states"; then
            return 0
        fi
        sleep 0.1
    done
    log "nodes not ready: $(sinfo -N 2>&1 | tail -n +2)"
    return 1
}

start() {
    local tool missing=""
    for tool in slurmctld slurmd sinfo scontrol squeue munged; do
        command -v "$tool" >/dev/null || missing="$missing $tool"
    done
    if [ -n "$missing" ]; then  # every daemon and client this script runs
        log "missing:$missing; installing slurm-wlm and munge (Debian packages)"
        apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARKER"; then
        log "$CONF exists and was not written by this script; set SLURM_CONF elsewhere"
        return 1
    fi
    local wanted
    wanted=$(render)
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$wanted" ] && all_alive; then
        wait_ready
        return
    fi
    stop
    rm -rf "$D/state" "$D/spool" "$D/log" "$D/run" "$D/munge"
    mkdir -p "$D/state" "$D/log" "$D/run" "$D/munge"
    for name in $(node_names); do mkdir -p "$D/spool/$name"; done
    chmod 0755 "$D" "$D/spool"
    chown munge:munge "$D/munge" && chmod 0711 "$D/munge"  # clients need x on the socket dir
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    for port in $(seq "$PORT" $((PORT + NODES))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            log "port $port is taken by a daemon this script did not start; set SLURM_CI_PORT"
            return 1
        fi
    done
    mkdir -p "$(dirname "$CONF")"
    echo "$wanted" >"$CONF"
    render_gres >"$(dirname "$CONF")/gres.conf"
    runuser -u munge -- munged --socket="$D/munge/munge.socket.2" --pid-file="$D/munge/munged.pid" \
        --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed" 9>&-
    for ((i = 0; i < 100; i++)); do
        munge -n --socket="$D/munge/munge.socket.2" 2>/dev/null | \
            unmunge --socket="$D/munge/munge.socket.2" >/dev/null 2>&1 && break
        sleep 0.05
    done
    slurmctld -f "$CONF" 9>&-
    for ((i = 0; i < 100; i++)); do scontrol ping >/dev/null 2>&1 && break; sleep 0.05; done
    for name in $(node_names); do
        if [ "$NODES" = 1 ]; then slurmd -f "$CONF" 9>&-; else slurmd -f "$CONF" -N "$name" 9>&-; fi
    done
    wait_ready
    log "running: $NODES node(s) x $CPUS CPUs ($(node_names | tr '\n' ' ')), state in $D"
}

status() {
    if all_alive; then sinfo -N; else echo "not running"; return 1; fi
}

command=${1:-start}
mkdir -p "$(dirname "$D")"
exec 9>"$D.lock"
flock 9
case "$command" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
