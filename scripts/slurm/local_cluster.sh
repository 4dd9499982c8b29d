#!/usr/bin/env bash
# A one-node Slurm on this machine (munge + slurmctld + slurmd), for the tests marked `slurm`
# and for trying the launchers as a cluster user would.
#
#   scripts/slurm/local_cluster.sh [start]   install (Debian/Ubuntu, as root) and start; idempotent
#   scripts/slurm/local_cluster.sh status    exit 0 when the node accepts jobs
#   scripts/slurm/local_cluster.sh stop      stop the three daemons (packages and config stay)
#
# The settings suit a container without systemd or a writable cgroup tree:
# ProctrackType=proctrack/linuxproc (every process a step starts is signalled, also the ones in a
# new session, such as torchrun's workers), TaskPlugin=task/none, no accounting; CPUs and memory
# are consumables (select/cons_tres, CR_CPU_Memory), so --cpus-per-task reserves cores; the
# node gets the core count and memory slurmd detects; requeue is allowed and finished jobs are
# forgotten after MinJobAge=300 s. The configuration is written once to /etc/slurm/slurm.conf
# (marked as ours); an existing slurm.conf that is not ours is used as it is.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by virtex-d2 scripts/slurm/local_cluster.sh"
LOG_DIR=/var/log/slurm

ready() {
    command -v sinfo >/dev/null 2>&1 && [[ "$(sinfo -h -o %t 2>/dev/null | head -n 1)" =~ ^(idle|mix|alloc) ]]
}

stop() {  # by the pid files the daemons write, so that nothing else of the same name is touched
    local pidfile pid
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
        fi
    done
}

# Not scripts/apt_install.sh: that installs Recommends too, which for slurm-wlm are 31 more
# packages (accounting, GPU and monitoring plugins) that a one-node test cluster does not use.
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    if ! command -v apt-get >/dev/null; then
        echo "error: no apt-get here; install Slurm (slurmctld, slurmd, sbatch) and munge with your package manager" >&2
        exit 1
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: installing Slurm needs root; run: sudo apt-get update && sudo apt-get install -y --no-install-recommends slurm-wlm munge" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends slurm-wlm munge
    echo "installed slurm-wlm and munge"
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        echo "using the existing $CONF (not written by this script)"
        return
    fi
    local node
    node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=... as slurmd detects them
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge
    chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
    cat >"$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$(hostname -s)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=4096
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "wrote $CONF: $node"
}

start() {
    if ready; then
        echo "Slurm is already running here: nothing to do ($(sinfo -h -o '%P %D node(s) %c CPUs %t' | head -n 1))"
        echo "stop it with: $0 stop"
        return
    fi
    install_packages
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: Slurm is installed but not running, and starting its daemons needs root: sudo $0 start" >&2
        exit 1
    fi
    write_config
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        [[ -f /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
        su -s /bin/sh munge -c munged && echo "started munged"
    fi
    pgrep -x slurmctld >/dev/null || { slurmctld && echo "started slurmctld (log $LOG_DIR/slurmctld.log)"; }
    pgrep -x slurmd >/dev/null || { slurmd && echo "started slurmd (log $LOG_DIR/slurmd.log)"; }
    local tries
    for tries in $(seq 60); do
        if ready; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
            echo "Slurm is up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t' | head -n 1)"
            echo "stop it with: $0 stop"
            return
        fi
        sleep 1
    done
    echo "error: Slurm did not come up within 60 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
    exit 1
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) ready ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
