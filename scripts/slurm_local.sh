#!/usr/bin/env bash
# A single-node SLURM on this machine (localhost), with accounting, for trying the grid launcher and for its test:
#
#   bash scripts/slurm_local.sh install   # as root; Debian/Ubuntu packages: munge, slurmctld, slurmd, slurmdbd, MariaDB
#   bash scripts/slurm_local.sh start     # as root; idempotent: starts what is not running, waits for an idle node
#   bash scripts/slurm_local.sh stop      # as root; stops the daemons this script started
#   bash scripts/slurm_local.sh status
#
# Accounting (slurmdbd + MariaDB) is not optional: without it sacct fails, submitit sees every job as UNKNOWN and
# waits forever on a job that died without a result. One partition, "debug", with this machine's real topology.
# Exit status: 0 up; 3 not installed; 4 not root; 5 a daemon did not come up (its log is named).
set -uo pipefail

STATE=/var/spool/slurm-local          # controller and node state, and a marker of the accounting database's age
LOGS=/var/log/slurm
RUN=/run/slurm
CONF=/etc/slurm
DB=slurm_acct_db
HOST=$(hostname -s)
CLUSTER=localcluster

say() { echo "slurm_local: $*" >&2; }
die() { say "$2"; exit "$1"; }

need_root() { [ "$(id -u)" -eq 0 ] || die 4 "needs root (the daemons run as root and as munge/mysql)"; }

installed() {
  for c in munged slurmctld slurmd slurmdbd mariadbd sbatch sacct sacctmgr; do
    command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || return 1
  done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {   # wait_for SECONDS what command...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

install() {
  need_root
  installed && { say "already installed"; return 0; }
  command -v apt-get >/dev/null || die 3 "apt-get not found: install munge, slurmctld, slurmd, slurmdbd and mariadb-server yourself"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die 3 "apt-get update failed (no package registry reachable?)"
  apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null || die 3 "apt-get install of SLURM failed"
  apt-get install -y -qq --no-install-recommends slurmdbd mariadb-server >/dev/null || die 3 "apt-get install of slurmdbd/MariaDB failed"
  say "installed"
}

write_configs() {
  local node mem
  node=$(slurmd -C | head -1)
  mem=$(echo "$node" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  node=$(echo "$node" | sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/")
  mkdir -p "$CONF" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
  cat > "$CONF/slurm.conf.new" <<EOF
# Written by scripts/slurm_local.sh: a single-node SLURM on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
# A requeued job becomes eligible cred_expire after its requeue (default 120 s) and is started by the next
# scheduling pass (sched_interval, bf_interval: default 60 s, 30 s): measured 138 s from a requeue to the restart
# with the defaults, 13 s with these.
AuthInfo=cred_expire=10
# submitit's jobs ignore SIGTERM (they checkpoint on USR2): a cancelled job ends at SIGKILL, KillWait (default 30 s)
# after it.
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$CONF/slurm.conf.new" "$CONF/slurm.conf"; then mv "$CONF/slurm.conf.new" "$CONF/slurm.conf"; CHANGED=1
  else rm "$CONF/slurm.conf.new"; fi
  cat > "$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-local
StorageLoc=$DB
EOF
  chmod 600 "$CONF/slurmdbd.conf"
}

start_munge() {
  pgrep -x munged >/dev/null && return 0
  mkdir -p /run/munge && chown munge:munge /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged || die 5 "munged did not start"
  wait_for 5 munge munge -n || die 5 "munge does not answer"
}

start_mariadb() {
  if ! mariadb -e "select 1" >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null 2>&1
    (/usr/sbin/mariadbd --user=mysql >>"$LOGS/mariadb.log" 2>&1 &)
    wait_for 20 mariadb mariadb -e "select 1" || die 5 "MariaDB did not start (see $LOGS/mariadb.log)"
  fi
  # A fresh controller state numbers jobs from 1 again: an older accounting database would then answer sacct with
  # the records of other jobs of the same numbers, and submitit would take a running job for finished.
  if [ ! -f "$STATE/ctld/job_state" ]; then
    mariadb -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS $DB; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-local'; GRANT ALL ON $DB.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || die 5 "cannot create the accounting database in MariaDB"
}

start_daemons() {
  if ! alive "$RUN/slurmdbd.pid"; then
    /usr/sbin/slurmdbd || die 5 "slurmdbd did not start (see $LOGS/slurmdbd.log)"
    wait_for 20 slurmdbd sacctmgr -n list cluster || die 5 "slurmdbd does not answer (see $LOGS/slurmdbd.log)"
  fi
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null \
    || die 5 "sacctmgr cannot add cluster $CLUSTER"
  if ! alive "$RUN/slurmctld.pid"; then
    /usr/sbin/slurmctld || die 5 "slurmctld did not start (see $LOGS/slurmctld.log)"
    wait_for 20 slurmctld scontrol ping || die 5 "slurmctld does not answer (see $LOGS/slurmctld.log)"
  fi
  if ! alive "$RUN/slurmd.pid"; then
    /usr/sbin/slurmd || die 5 "slurmd did not start (see $LOGS/slurmd.log)"
  fi
  for _ in $(seq 100); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)
    case "$state" in
      idle*|mix*|alloc*) return 0 ;;
      down*|drain*|drng*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.2
  done
  die 5 "node $HOST is not idle (sinfo says '${state:-nothing}'; see $LOGS/slurmd.log)"
}

start() {
  need_root
  installed || die 3 "SLURM is not installed: bash scripts/slurm_local.sh install (as root)"
  CHANGED=0
  write_configs
  # some settings (AuthInfo) are read only when a daemon starts: a changed slurm.conf restarts them
  if [ "$CHANGED" = 1 ] && { alive "$RUN/slurmctld.pid" || alive "$RUN/slurmd.pid"; }; then stop; fi
  start_munge
  start_mariadb
  start_daemons
  say "up: partition debug on $HOST"
}

stop() {
  need_root
  # No job outlives this private cluster: a job left running (a test that failed while one waited) would keep its
  # step processes and, in the controller's saved state, its node when the cluster starts again.
  if alive "$RUN/slurmctld.pid"; then
    squeue -h -r -o %i 2>/dev/null | xargs -r scancel --full --quiet 2>/dev/null || true
    wait_for 20 "jobs to end" bash -c '[ -z "$(squeue -h 2>/dev/null)" ]' || say "jobs still listed after 20 s"
  fi
  for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid"; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile"); kill "$pid"
      wait_for 10 stop bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null
    fi
  done
  pkill -9 -x slurmstepd 2>/dev/null || true
  say "stopped slurmd, slurmctld, slurmdbd and any job left (munged and MariaDB left running)"
}

status() {
  installed || { say "not installed"; exit 3; }
  scontrol ping 2>/dev/null | head -1
  sinfo 2>/dev/null || exit 5
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
