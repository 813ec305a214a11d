#!/usr/bin/env bash
# MATPO training on this one machine through the same launcher as the Slurm jobs: a one-node Ray
# cluster, the driver, teardown. Installs the venv on first use.
#
#   launch/local.sh [--config configs/tiny_cpu.yaml] [--resume] [key.sub=value ...]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash tools/setup_venv.sh
export PATH=$repo/.venv/bin:$PATH
gpus=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
# logical CPUs (one per Ray actor: actor ranks, engines, tool server), not cores
cpus=${MATPO_CPUS_PER_NODE:-$(($(nproc) > 16 ? $(nproc) : 16))}
exec launch/ray_cluster.sh --gpus-per-node "$gpus" --cpus-per-node "$cpus" -- matpo train "$@"
