#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, as root), for trying launch/pretrain.sh
# without a cluster and for CI's SLURM tests:
#
#   sudo launch/slurm_localhost.sh          # install slurm-wlm + munge if needed, start, wait until idle
#   sudo launch/slurm_localhost.sh stop     # stop the daemons this script started
#
# slurmctld and slurmd on localhost, select/cons_tres (CR_CPU: every CPU schedulable), proctrack/linuxproc
# (no cgroups needed), one partition `local` holding this node, no accounting. Does nothing if a SLURM
# cluster already answers, and never overwrites a slurm.conf it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by sessa_scale launch/slurm_localhost.sh"
STATE=/var/lib/slurm
LOGS=/var/log/slurm

die() { echo "slurm_localhost.sh: $*" >&2; exit 1; }

stop() {
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}

if [[ ${1:-start} == stop ]]; then stop; exit 0; fi
[[ ${1:-start} == start ]] || die "usage: $0 [start|stop]"

if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then
    echo "slurm_localhost.sh: a SLURM cluster already answers; nothing to do"
    sinfo
    exit 0
fi
[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: shared-secret authentication between the SLURM daemons and clients.
[[ -s /etc/munge/munge.key ]] || mungekey --create --force
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -u munge -x munged >/dev/null || runuser -u munge -- munged --force
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

host=$(hostname -s)
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
fi
node=$(slurmd -C | head -n1)  # NodeName=<host> CPUs=... RealMemory=... as slurmd detects them
mkdir -p "$STATE/slurmctld" "$STATE/slurmd" "$LOGS"
chown slurm:slurm "$STATE/slurmctld" "$LOGS"
cat >"$CONF" <<EOF
$MARK
ClusterName=localhost
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=30
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case $state in
        idle|mix|alloc) echo "slurm_localhost.sh: node $host is $state"; sinfo; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
die "the node did not become idle within 60 s (state: ${state:-none}); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
