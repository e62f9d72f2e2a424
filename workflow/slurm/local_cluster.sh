#!/usr/bin/env bash
# Bring up or tear down a real single-node SLURM cluster (Debian's Slurm 22.05 + munge) on
# this machine, for the SLURM test and for trying the profile without a cluster.
#
#   workflow/slurm/local_cluster.sh up   [STATE_DIR]   # install if needed, start, wait until idle
#   workflow/slurm/local_cluster.sh down [STATE_DIR]   # stop only the daemons this script started
#
# Facts this relies on (Debian 12, no systemd, gVisor): the config must live at
# /etc/slurm/slurm.conf (the job-step plugin clears SLURM_* inside jobs, so SLURM_CONF alone
# fails); cgroups are unavailable (proctrack/linuxproc, task/none); no slurmdbd, so the
# Snakemake profile uses `squeue` for status and MinJobAge keeps finished jobs visible.
set -euo pipefail
action=${1:?usage: local_cluster.sh up|down [STATE_DIR]}
state=${2:-/tmp/dnd-slurm}
host=$(hostname -s)

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
      --no-install-recommends slurmctld slurmd slurm-client munge) >"$state.apt.log" 2>&1 || {
      echo "cannot install slurmctld slurmd slurm-client munge (see $state.apt.log)" >&2; exit 3; }
  fi
  mkdir -p "$state"/{ctld,spool,log}
  # munge: a key and a socket dir owned by the munge user
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged  # daemonises; the munge user cannot write into $state
    pgrep -n -x munged >"$state/munged.pid"
    echo "munged" >>"$state/started"
  fi
  local mem
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  local cpus
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
  cat >"$state/slurm.conf" <<CONF
ClusterName=dnd-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  mkdir -p /etc/slurm
  if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    mv /etc/slurm/slurm.conf "$state/slurm.conf.orig"
  fi
  ln -sfn "$state/slurm.conf" /etc/slurm/slurm.conf
  slurmctld -D -i >>"$state/log/slurmctld.out" 2>&1 &
  echo "$!" >"$state/slurmctld.daemon"
  slurmd -D >>"$state/log/slurmd.out" 2>&1 &
  echo "$!" >"$state/slurmd.daemon"
  for _ in $(seq 60); do
    if timeout 5 scontrol ping 2>/dev/null | grep -q UP && timeout 5 sinfo -h -o %t 2>/dev/null | grep -q idle; then
      echo "slurm up: $(timeout 5 sinfo -h -o '%P %D %t')"; return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in $state/log" >&2; tail -20 "$state"/log/*.log >&2 || true; exit 4
}

down() {
  for d in slurmd slurmctld; do
    if [ -f "$state/$d.daemon" ]; then kill "$(cat "$state/$d.daemon")" 2>/dev/null || true; rm -f "$state/$d.daemon"; fi
  done
  if grep -qx munged "$state/started" 2>/dev/null && [ -f "$state/munged.pid" ]; then
    kill "$(cat "$state/munged.pid")" 2>/dev/null || true
  fi
  rm -f "$state/started"
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$state/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
    [ -f "$state/slurm.conf.orig" ] && mv "$state/slurm.conf.orig" /etc/slurm/slurm.conf
  fi
  echo "slurm down"
}

"$action"
