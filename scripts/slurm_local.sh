#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for testing the
# `hydra/launcher=slurm` sweeps end to end. Needs root (CI runs as root).
#
#   scripts/slurm_local.sh start    install if missing, configure, start munged/slurmctld/slurmd,
#                                   wait until the node is idle (no-op when already up)
#   scripts/slurm_local.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm_local.sh status   exit 0 when a job can be submitted
#
# Exit code 3 from start: SLURM cannot be installed or started here (no root, no apt, no network);
# the message says why, and the tests skip with it.
set -euo pipefail

STATE=${COLA_SLURM_STATE:-/run/cola_slurm}    # pid files + marker of what we started
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
HOST=$(hostname -s)

cant() { echo "slurm_local: $*" >&2; exit 3; }

ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

install() {
    command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || cant "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || cant "SLURM is not installed and there is no apt-get"
    echo "slurm_local: installing slurm-wlm and munge with apt-get" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >"${TMPDIR:-/tmp}/slurm_local_apt.log" 2>&1 \
        || cant "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/slurm_local_apt.log)"
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG"
    cat >"$CONF" <<EOF
# written by cola_train scripts/slurm_local.sh: one node, one partition, root daemons
ClusterName=cola
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=10
MinJobAge=600
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid || cant "munged did not start"
    cp /run/munge/munged.pid "$STATE/munged.started"
}

start() {
    if ready; then
        echo "slurm_local: already up" >&2
        return 0
    fi
    install
    [ "$(id -u)" = 0 ] || cant "starting the SLURM daemons needs root"
    mkdir -p "$STATE"
    if ! getent hosts "$HOST" >/dev/null 2>&1; then  # slurmd must reach slurmctld by this name
        echo "127.0.0.1 $HOST" >>/etc/hosts
    fi
    write_conf
    start_munge
    slurmctld || cant "slurmctld did not start (see $LOG/slurmctld.log)"
    touch "$STATE/slurmctld.started"
    sleep 1
    slurmd || cant "slurmd did not start (see $LOG/slurmd.log)"
    touch "$STATE/slurmd.started"
    for _ in $(seq 60); do
        if ready; then
            echo "slurm_local: node $HOST is up" >&2
            return 0
        fi
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    cant "the node did not come up (see $LOG/slurmctld.log and $LOG/slurmd.log)"
}

stop_pid() {  # name, pid file
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    echo "slurm_local: stopped $1 ($pid)" >&2
}

stop() {
    [ -d "$STATE" ] || return 0
    if [ -e "$STATE/slurmd.started" ]; then stop_pid slurmd "$STATE/slurmd.pid"; rm -f "$STATE/slurmd.started"; fi
    if [ -e "$STATE/slurmctld.started" ]; then stop_pid slurmctld "$STATE/slurmctld.pid"; rm -f "$STATE/slurmctld.started"; fi
    if [ -e "$STATE/munged.started" ]; then stop_pid munged "$STATE/munged.started"; rm -f "$STATE/munged.started"; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
