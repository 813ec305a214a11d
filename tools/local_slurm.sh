#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying the sbatch scripts:
# slurmctld + one slurmd per live "node" on 127.0.0.1 (distinct ports, `slurmd -N nodeK`), munge
# with its own key and socket, GPUs as character devices (slurmd rejects count-only GPUs). Nodes
# beyond --live exist in the config only, so `sbatch --test-only` can check a 16 x 8-GPU request.
#
#   tools/local_slurm.sh start DIR [--nodes 16] [--live 2] [--gpus 8] [--cpus 64] [--mem-mb 512000]
#   export SLURM_CONF=DIR/slurm.conf      # then sbatch / squeue / scontrol talk to it
#   tools/local_slurm.sh stop DIR
#
# Needs root and the Debian packages from tools/setup_slurm.sh. DIR must be short-ish (socket paths).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2
shift 2
nodes=16 live=2 gpus=8 cpus=64 mem_mb=512000
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=$2; shift 2 ;;
    --live) live=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --mem-mb) mem_mb=$2; shift 2 ;;
    *) usage ;;
  esac
done

stop_cluster() {
  local f pid
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  sleep 1
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$f"
  done
}

if [ "$cmd" = stop ]; then
  stop_cluster
  exit 0
fi
[ "$cmd" = start ] || usage
for b in slurmctld slurmd munged mungekey scontrol; do
  command -v "$b" >/dev/null 2>&1 || { echo "local_slurm.sh: $b not found: run tools/setup_slurm.sh" >&2; exit 3; }
done
[ "$(id -u)" -eq 0 ] || { echo "local_slurm.sh: needs root (slurmd runs jobs as their users)" >&2; exit 3; }
[ "$live" -le "$nodes" ] || { echo "local_slurm.sh: --live $live > --nodes $nodes" >&2; exit 2; }

dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
mkdir -p "$dir"/{run,log,state,spool,dev,munge}
chmod 700 "$dir/munge"

# munge: a private key and socket, so this never touches (or needs) a system munged
[ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
chmod 600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
  --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

# fake GPUs: character devices with the NVIDIA major (195), as slurmd's gres/gpu plugin requires
for ((i = 0; i < gpus; i++)); do
  [ -e "$dir/dev/nvidia$i" ] || mknod "$dir/dev/nvidia$i" c 195 "$i"
done

# ports from the directory name's hash: two clusters on one machine do not collide
base=$((20000 + $(printf '%s' "$dir" | cksum | cut -d' ' -f1) % 20000))
{
  echo "ClusterName=matpolocal"
  echo "SlurmctldHost=localhost(127.0.0.1)"
  echo "SlurmctldPort=$base"
  echo "AuthType=auth/munge"
  # cred_expire also sets how long a requeued job waits before it may start again (Slurm's guard
  # against its revoked launch credential; default 120 s): 20 s keeps the requeue test short
  echo "AuthInfo=cred_expire=20,socket=$dir/munge/munge.sock"
  echo "CredType=cred/munge"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "StateSaveLocation=$dir/state"
  echo "SlurmdSpoolDir=$dir/spool/%n"
  echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
  echo "SlurmdPidFile=$dir/run/slurmd.%n.pid"
  echo "SlurmctldLogFile=$dir/log/slurmctld.log"
  echo "SlurmdLogFile=$dir/log/slurmd.%n.log"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "GresTypes=gpu"
  echo "SchedulerType=sched/backfill"
  echo "MpiDefault=none"
  echo "ReturnToService=2"
  echo "SlurmdParameters=config_overrides"  # the configured CPUs/memory/GPUs, not this machine's
  echo "JobRequeue=1"
  echo "KillWait=15"
  echo "MinJobAge=3600"
  echo "SlurmdTimeout=60"
  echo "InactiveLimit=0"
  echo "JobAcctGatherType=jobacct_gather/none"
  for ((n = 1; n <= nodes; n++)); do
    echo "NodeName=node$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + n)) CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$gpus State=UNKNOWN"
  done
  echo "PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$dir/slurm.conf"
if [ "$gpus" -gt 0 ]; then
  echo "NodeName=node[1-$nodes] Name=gpu File=$dir/dev/nvidia[0-$((gpus - 1))]" >"$dir/gres.conf"
else
  : >"$dir/gres.conf"
fi

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
for ((n = 1; n <= live; n++)); do
  mkdir -p "$dir/spool/node$n"
  slurmd -f "$SLURM_CONF" -N "node$n"
done

# ready = every live node idle
for _ in $(seq 60); do
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$live" ] && { echo "local slurm up: $live of $nodes nodes live; export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 1
done
echo "local_slurm.sh: nodes did not become idle; see $dir/log" >&2
sinfo -N >&2 || true
exit 1
