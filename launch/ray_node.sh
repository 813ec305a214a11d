#!/usr/bin/env bash
# One Ray node (head or worker) for launch/ray_cluster.sh: `ray start --block ARGS...` in its own
# process group, so that stopping this script (SIGTERM from srun or the launcher) stops the raylet,
# GCS and workers it started too. `ray start --block` alone can leave them running.
set -uo pipefail

setsid ray start --block "$@" &
pid=$!
# shellcheck disable=SC2317  # runs from a trap
stop() {
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 -- "-$pid" 2>/dev/null || exit 0
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null
  exit 0
}
trap stop TERM INT HUP
wait "$pid"
rc=$?
kill -KILL -- "-$pid" 2>/dev/null  # ray start ended by itself (a failed start): take its children along
exit "$rc"
