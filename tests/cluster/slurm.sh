#!/usr/bin/env bash
# A one-node SLURM cluster for the cluster tests (run as root; Debian's slurm-wlm and munge).
#   tests/cluster/slurm.sh start   # writes conf and state under $DISTILLERY_SLURM_DIR, starts
#                                  # munged, slurmctld, slurmd; waits until the node is idle
#   tests/cluster/slurm.sh stop    # stops what `start` started
#   tests/cluster/slurm.sh install # apt-get install slurm-wlm munge
# Clients find the cluster through SLURM_CONF=$DISTILLERY_SLURM_DIR/slurm.conf.
set -euo pipefail
DIR=${DISTILLERY_SLURM_DIR:-/tmp/distillery-slurm}
NODE=$(hostname)

install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  # The node's CPUs and memory as slurmd sees them.
  local hw
  hw=$(slurmd -C | head -1 | grep -o 'CPUs=[0-9]* .*RealMemory=[0-9]*')
  cat >"$DIR/slurm.conf" <<CONF
ClusterName=distillery
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (default 120 s) before it starts again.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Short scheduler ticks: jobs start, time out and requeue within seconds, not minutes.
SchedulerParameters=sched_interval=2
MessageTimeout=30
KillWait=30
MinJobAge=600
NodeName=$NODE $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  mkdir -p "$DIR"/{state,spool,munge}
  chown munge:munge "$DIR/munge"
  chmod 0755 "$DIR/munge"
  [ -s /etc/munge/munge.key ] || mungekey -c
  write_conf
  runuser -u munge -- munged --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  export SLURM_CONF=$DIR/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "SLURM up: export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 1
  done
  echo "SLURM did not come up; logs in $DIR" >&2
  tail -20 "$DIR"/slurm*.log >&2 || true
  return 1
}

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if [ -s "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  sleep 1
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  install) install ;;
  *) echo "usage: $0 start|stop|install" >&2; exit 2 ;;
esac
