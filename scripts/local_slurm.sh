#!/usr/bin/env bash
# A single-node Slurm on this machine (slurmctld + slurmd on localhost, one CPU node, no accounting, no cgroups),
# so that tests/train/test_matrix_slurm.py submits real jobs (`fplus matrix --launcher slurm`). Idempotent: when
# the local cluster already answers, it only checks it. Needs root and Debian/Ubuntu's apt (slurm-wlm, munge).
#
#   bash scripts/local_slurm.sh && export FPLUS_SLURM=1     # what .ci/run does
#
# It writes /etc/slurm/slurm.conf only when there is none or when the one there is its own (first line below);
# a machine with another Slurm configuration is left alone (exit 1).
set -euo pipefail

MARK="# fplus local single-node Slurm (scripts/local_slurm.sh)"
CONF=/etc/slurm/slurm.conf

fail() { echo "local_slurm.sh: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "needs root (it installs packages and starts munged, slurmctld and slurmd)"

cluster_up() {
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n1)
  [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "no apt-get: install slurmctld, slurmd, slurm-client and munge yourself"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -qF "$MARK"; then
  fail "$CONF exists and was not written by this script: this machine has its own Slurm; use that one"
fi

# munge: the key (the package usually creates one), its runtime directory, the daemon (as the munge user).
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null || fail "munged does not answer (see /var/log/munge/munged.log)"
fi

# slurm.conf: this host as controller and its one node, with the node's own CPUs and memory (`slurmd -C`).
host=$(hostname -s)
node=$(slurmd -C | head -n1 | sed -E 's/ (Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+//g')
[[ $node == NodeName=* ]] || fail "slurmd -C did not describe this node: $node"
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF.new" <<EOF
$MARK
ClusterName=fplus-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to scontrol for an hour (there is no accounting database for sacct)
MinJobAge=3600
KillWait=30
# the scheduler runs every 2 s, and a requeued job may start again after 10 s (default 120 s)
SchedulerParameters=batch_sched_delay=1,sched_interval=2
AuthInfo=cred_expire=10
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$CONF.new" "$CONF" 2>/dev/null && cluster_up; then  # already set up and running: nothing to do
  rm -f "$CONF.new"
  echo "local Slurm is up: $(sinfo -h -N -o '%N %t %c CPUs')"
  exit 0
fi
changed=0
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
  mv "$CONF.new" "$CONF"
  changed=1
else
  rm -f "$CONF.new"
fi

stop() {  # $1: daemon name; stops the one this script started (its pid file), never anything else
  local pidfile=/run/$1.pid pid
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}

if [[ $changed == 1 ]]; then stop slurmd; stop slurmctld; fi
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
  stop slurmctld
  slurmctld
fi
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.5; done
scontrol ping | grep -q "is UP" || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
if ! { [[ -s /run/slurmd.pid ]] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }; then
  slurmd
fi

for _ in $(seq 60); do cluster_up && break; sleep 0.5; done
state=$(sinfo -h -N -o %t | head -n1)
if [[ $state =~ ^(down|drain|drng|fail) ]]; then
  scontrol update NodeName="$host" State=RESUME || true
  for _ in $(seq 20); do cluster_up && break; sleep 0.5; done
fi
cluster_up || fail "the node is not usable (sinfo: $(sinfo -h -N -o '%N %t %E'); see /var/log/slurm/slurmd.log)"

# a job end to end: sbatch, then wait for it (fails loudly when jobs cannot run here)
out=$(mktemp -d)
job=$(sbatch --parsable --output="$out/check.out" --wrap "echo fplus-slurm-ok")
for _ in $(seq 60); do
  grep -q fplus-slurm-ok "$out/check.out" 2>/dev/null && break
  sleep 0.5
done
grep -q fplus-slurm-ok "$out/check.out" || fail "test job $job did not run (scontrol show job $job)"
rm -rf "$out"
echo "local Slurm is up: $(sinfo -h -N -o '%N %t %c CPUs')"
