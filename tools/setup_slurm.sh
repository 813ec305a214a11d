#!/usr/bin/env bash
# System packages for the Slurm tests (tests/test_slurm.py): Slurm 22.05 + munge (a real local
# cluster: slurmctld + several slurmd on 127.0.0.1) and shellcheck (lint of slurm/ and launch/).
# Debian packages; needs root (apt-get). Idempotent: does nothing when they are already installed.
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_slurm.sh: ${need[*]} missing and this is not a root Debian machine; install them by hand" >&2
  exit 3
fi
echo "setup_slurm.sh: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
