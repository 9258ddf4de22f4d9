#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (for tests/test_slurm.py and CI).
# munged + slurmctld + slurmd, SlurmUser=root, one node with this machine's cores, no
# accounting. Needs root and Debian's slurm-wlm and munge packages (.ci/run installs them).
# Writes /etc/slurm/slurm.conf (the default path, so sbatch & co need no SLURM_CONF).
# Stop with .ci/slurm-down.sh.
set -euo pipefail
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  || { echo "slurm-up: slurm-wlm and munge are not installed" >&2; exit 1; }
host=$(hostname -s)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
# The node line as slurmd itself sees the hardware (CPUs, sockets, cores, threads).
node=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=renio-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
SchedulerParameters=sched_interval=2
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x munged >/dev/null || runuser -u munge -- munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld -c   # -c: start from a clean state
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm-up: node $host is $(sinfo -h -o %T)"; exit 0
  fi
  sleep 0.5
done
echo "slurm-up: the node did not come up; see /var/log/slurm/" >&2
exit 1
