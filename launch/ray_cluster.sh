#!/usr/bin/env bash
# Ray across the nodes of this Slurm job (or on this one machine), then the driver, then teardown.
#
#   launch/ray_cluster.sh [--gpus-per-node G] [--cpus-per-node C] [--timeout S] -- DRIVER [ARGS...]
#
# In a Slurm allocation (SLURM_JOB_ID set): a Ray head on the first node (where the batch script
# runs) and one Ray worker on every other node, each a background `srun --overlap` step running
# launch/ray_node.sh. Outside Slurm (launch/local.sh): a one-node cluster on this machine.
# Waits until Ray has every node and GPU (`matpo ray-wait`), runs DRIVER on this node with
# RAY_ADDRESS exported, forwards SIGUSR1 (Slurm's preemption warning) and SIGTERM to it, and stops
# Ray on every exit path. Logs: $MATPO_LOG_DIR/ray-<job>/ (default logs/).
#
# Exit status: DRIVER's own (0 done, 1 crashed, 2 bad config, 75 preempted after a checkpoint),
#   3 environment (ray / matpo not on PATH), 4 Ray did not come up within --timeout.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gpus=${MATPO_GPUS_PER_NODE:-0}
cpus=${MATPO_CPUS_PER_NODE:-}
timeout=${MATPO_RAY_TIMEOUT_S:-300}
while [ $# -gt 0 ]; do
  case $1 in
    --gpus-per-node) gpus=$2; shift 2 ;;
    --cpus-per-node) cpus=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "ray_cluster.sh: unknown option $1 (usage: see the header of $0)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "ray_cluster.sh: no driver command after --" >&2; exit 2; }
for b in ray matpo python; do
  command -v "$b" >/dev/null 2>&1 || { echo "ray_cluster.sh: '$b' not on PATH (activate the venv: bash tools/setup_venv.sh)" >&2; exit 3; }
done

job=${SLURM_JOB_ID:-local-$$}
log_dir=${MATPO_LOG_DIR:-logs}/ray-$job${SLURM_RESTART_COUNT:+-r$SLURM_RESTART_COUNT}
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
port=${MATPO_RAY_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60's `ray start --head` turns on token auth; every node and the driver read this job's token
# (on a cluster, log_dir is on the shared filesystem)
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$log_dir/auth_token}
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")

node_args=(--num-gpus="$gpus" --disable-usage-stats)
[ -n "$cpus" ] && node_args+=(--num-cpus="$cpus")
head_args=(--head --port="$port" --ray-client-server-port=$((port + 1)) --include-dashboard=false
  --temp-dir="/tmp/ray-$job")
pids=()
# a preemption warning before the driver runs: nothing to save yet, so leave as "preempted" (75)
trap 'echo "ray_cluster.sh: SIGUSR1 before the driver started" >&2; exit 75' USR1
trap 'exit 143' TERM INT

# shellcheck disable=SC2317  # runs from a trap
teardown() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
}
trap teardown EXIT

if [ -n "${SLURM_JOB_ID:-}" ]; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  nnodes=${#hosts[@]}
  head_host=${hosts[0]}
  head_ip=${MATPO_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}
  srun --nodes=1 --ntasks=1 --overlap -w "$head_host" \
    "$here/ray_node.sh" "${head_args[@]}" --node-ip-address="$head_ip" "${node_args[@]}" >"$log_dir/head.log" 2>&1 &
  pids+=($!)
  matpo ray-wait --address "$head_ip:$port" --nodes 1 --timeout "$timeout" >/dev/null || exit 4
  if [ "$nnodes" -gt 1 ]; then
    srun --nodes=$((nnodes - 1)) --ntasks=$((nnodes - 1)) --ntasks-per-node=1 --overlap -x "$head_host" \
      "$here/ray_node.sh" --address="$head_ip:$port" "${node_args[@]}" >"$log_dir/workers.log" 2>&1 &
    pids+=($!)
  fi
else
  nnodes=1
  head_ip=${MATPO_HEAD_IP:-127.0.0.1}
  "$here/ray_node.sh" "${head_args[@]}" --node-ip-address="$head_ip" "${node_args[@]}" >"$log_dir/head.log" 2>&1 &
  pids+=($!)
fi

export RAY_ADDRESS=$head_ip:$port
if ! matpo ray-wait --address "$RAY_ADDRESS" --nodes "$nnodes" --gpus $((nnodes * gpus)) --timeout "$timeout"; then
  echo "ray_cluster.sh: Ray did not come up; logs in $log_dir" >&2
  exit 4
fi

"$@" &
driver=$!
trap 'kill -USR1 "$driver" 2>/dev/null' USR1
trap 'kill -TERM "$driver" 2>/dev/null' TERM INT
while :; do
  wait "$driver"
  rc=$?
  # a trapped signal interrupts `wait` (status > 128) while the driver runs on
  if [ "$rc" -gt 128 ] && kill -0 "$driver" 2>/dev/null; then continue; fi
  break
done
exit "$rc"
