#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for testing scripts/slurm/ddpm.sbatch (tests/test_launchers.py).
#
#   sudo scripts/slurm_cluster.sh install   # apt-get Debian's slurm-wlm and munge (needs the Debian mirror)
#   sudo scripts/slurm_cluster.sh start     # configure + start munged, slurmctld and two slurmd; waits until idle
#   scripts/slurm_cluster.sh status         # sinfo
#   sudo scripts/slurm_cluster.sh stop      # stop the daemons
#
# `start` installs first when slurmctld is missing, and is idempotent: with the cluster already up and the config
# unchanged it does nothing. The two nodes, ddpm-node1 and ddpm-node2, are two slurmd daemons on 127.0.0.1 with
# their own port, spool dir, pid and log file (the %n in slurm.conf); the names are added to /etc/hosts because
# Lightning's SLURMEnvironment uses the first node's name as MASTER_ADDR. No cgroups (containers rarely allow
# them): proctrack/linuxproc and task/none. Runs as root (SlurmUser=root); jobs run as the submitting user.
#
# Environment: SLURM_NODE_CPUS (CPUs each node offers, default: all of this machine's), DDPM_SLURM_PORT_BASE
# (slurmctld port; the nodes use the next two, default 16817).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODES=(ddpm-node1 ddpm-node2)
PORT_BASE=${DDPM_SLURM_PORT_BASE:-16817}
NODE_CPUS=${SLURM_NODE_CPUS:-$(nproc)}
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
START_TIMEOUT=${DDPM_SLURM_START_TIMEOUT:-60}

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
need_root() { [[ $(id -u) -eq 0 ]] || die "run as root (it writes $CONF and /etc/hosts, starts daemons)"; }

install_packages() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    local ctl_host
    ctl_host=$(hostname -s)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR"
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm_cluster.sh: two slurmd daemons on 127.0.0.1 form a two-node test cluster.
ClusterName=ddpmtest
SlurmctldHost=${ctl_host}(127.0.0.1)
SlurmctldPort=${PORT_BASE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# job credentials live 10 s (default 120): a requeued job is held that long before it may start again (slurmd
# refuses to relaunch a job id whose credential it revoked); the tests requeue a job on purpose
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
SlurmdTimeout=60
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
NodeName=${NODES[0]} NodeAddr=127.0.0.1 NodeHostname=${NODES[0]} Port=$((PORT_BASE + 1)) CPUs=${NODE_CPUS} State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 NodeHostname=${NODES[1]} Port=$((PORT_BASE + 2)) CPUs=${NODE_CPUS} State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    return 0
}

add_hosts() {
    local name
    for name in "${NODES[@]}"; do
        grep -qE "^[^#]*[[:space:]]${name}([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 ${name}" >>/etc/hosts
    done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || {
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none)
        chown munge:munge /etc/munge/munge.key
    }
    runuser -u munge -- /usr/sbin/munged
    local _
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemons() {
    mkdir -p "$LOG_DIR" "$STATE_DIR"
    if ! pid_alive /run/slurmctld.pid; then
        slurmctld -i # -i: ignore state saved by an earlier, differently configured cluster
    fi
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$SPOOL_DIR/$node"
        pid_alive "/run/slurmd-$node.pid" || slurmd -N "$node"
    done
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [[ $(grep -cE ' (idle|mix|alloc)$' <<<"$states") -eq ${#NODES[@]} ]]; then
            log "up: $(tr '\n' ' ' <<<"$states")"
            return
        fi
        # nodes left down/drained by an earlier run come back once their slurmd answers
        scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N >&2 || true
    tail -n 20 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log >&2 || true
    die "the nodes did not become idle within ${START_TIMEOUT}s"
}

stop_daemons() {
    local pidfile pid
    for pidfile in /run/slurmd-"${NODES[0]}".pid /run/slurmd-"${NODES[1]}".pid /run/slurmctld.pid; do
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

cmd=${1:-start}
case "$cmd" in
install)
    install_packages
    ;;
start)
    need_root
    install_packages
    add_hosts
    start_munge
    if write_config; then
        log "wrote $CONF"
        stop_daemons # a changed config needs fresh daemons
    fi
    start_daemons
    wait_idle
    ;;
stop)
    need_root
    stop_daemons
    log "stopped slurmctld and slurmd (munged is left running)"
    ;;
status)
    sinfo -N
    ;;
*)
    die "usage: $0 {install|start|stop|status}"
    ;;
esac
