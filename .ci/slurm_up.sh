#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine, for tests/test_slurm.py.
#
# What it does: installs Debian's slurm-wlm + munge (apt-get), writes a minimal slurm.conf
# for one node called `localhost` (cgroup-free: proctrack/linuxproc, task/none, no
# accounting, select/cons_tres by CPU), starts munged, slurmctld and slurmd directly (no
# systemd in containers), and waits until `sinfo` reports the node idle.
#
# Idempotent: when the node already answers as idle/mixed/allocated it exits at once.
# Needs root. Knobs (env): SLURM_UP_CPUS (CPUs the node advertises; default max(nproc,4),
# over-subscribing a small CI box so 2-task jobs with a few CPUs each still schedule),
# SLURM_UP_TIMEOUT (seconds to wait for the node, default 120).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
TIMEOUT=${SLURM_UP_TIMEOUT:-120}
MARK="# written by mcore_rl .ci/slurm_up.sh, config v3"

log() { echo "[slurm_up] $*" >&2; }

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

is_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

if is_up && grep -qF "$MARK" "$CONF" 2>/dev/null; then
    log "already up: $(sinfo -h -o '%P %D %T %C' | head -n1)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root (installs packages and starts daemons)"
    exit 1
fi

# --- 1. packages ---------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm + munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from trying to start services: we start them ourselves below.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_added=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# --- 2. munge ------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null
fi

# --- 3. slurm.conf -------------------------------------------------------------------
NPROC=$(nproc)
CPUS=${SLURM_UP_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}
MEM_MB=$(awk '/MemTotal/ {print int($2/1024*0.9)}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
if [ ! -f "$CONF" ] || ! grep -qF "$MARK" "$CONF"; then
    [ -f "$CONF" ] && cp "$CONF" "$CONF.bak.$(date +%s)"
    log "writing $CONF (CPUs=$CPUS RealMemory=$MEM_MB)"
    cat > "$CONF" <<CONF
$MARK
# Single-node test cluster. Not a production configuration: no cgroups, no accounting.
ClusterName=mcore-rl-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# cgroup-free: containers rarely give slurmd a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults 60 s / 30 s): requeued test jobs restart quickly.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job may start again after cred_expire seconds (default 120): short for tests.
AuthInfo=cred_expire=5
# Let the node advertise more CPUs/memory than slurmd detects (small CI boxes).
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    # Daemons running on an older config: stop them (only via their own pid files).
    for pidf in /run/slurmd.pid /run/slurmctld.pid; do
        if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
            pid=$(cat "$pidf"); log "stopping $(basename "$pidf" .pid) ($pid) to apply the new config"
            kill "$pid"; for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
    done
    # A stale state dir from another config would keep the old node definition.
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi

# --- 4. daemons ----------------------------------------------------------------------
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! pid_alive /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -c   # -c: start clean (no old job state)
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! pid_alive /run/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd -N localhost
fi

# --- 5. wait -------------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
while ! is_up; do
    state=$(node_state)
    case "$state" in
        down|drained|draining|fail|unknown) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node not idle after ${TIMEOUT}s (state: ${state:-none}); logs:"
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
log "up: $(sinfo -h -o '%P %D %T %C' | head -n1)"
