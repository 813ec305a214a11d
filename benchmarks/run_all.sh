#!/usr/bin/env bash
# Every CPU-capable benchmark at sizes that finish in < 15 min on a 2-core machine; each writes
# benchmarks/results/<name>.json, then report.py re-renders the tables in docs/benchmarks.md.
# GPU-only figures (actor MFU on Qwen3-14B layers, benchmarks/actor_mfu.py without --dtype fp32) and
# the larger weight-sync model (see docs/benchmarks.md) are run by hand.
#
#   bash benchmarks/run_all.sh            # everything
#   bash benchmarks/run_all.sh report     # only re-render docs/benchmarks.md from benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash tools/setup_venv.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
stage() { echo; echo "=== $1 (t+$(( $(date +%s) - start ))s)"; }

if [ "${1:-}" != "report" ]; then
  stage "packing efficiency"
  $PY benchmarks/capture.py packing -- $PY benchmarks/packing.py

  stage "actor forward+backward, CPU reference (tiny Qwen3, fp32)"
  model=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); from rollout_overlap import ensure_inputs; print(ensure_inputs()[0])')
  $PY benchmarks/capture.py actor_mfu_cpu -- $PY benchmarks/actor_mfu.py --model "$model" --layers 4 \
      --tokens 2048 --max-len 512 --dtype fp32

  stage "weight sync (TP=2, PP=2; broadcast/tensor/disk; buckets 1/3 MiB; reshard vs megatron-bridge export)"
  $PY benchmarks/weight_sync.py --reps 2

  stage "rollout overlap (0.5 s per tool call; concurrent vs sequential workers)"
  $PY benchmarks/rollout_overlap.py --prompts 2 --samples 2 --reps 2

  stage "end-to-end step breakdown (matpo train, configs/tiny_cpu.yaml, 3 steps)"
  $PY benchmarks/step_breakdown.py --steps 3

  stage "bring-up (matpo train on the embedded default: process start -> first rollout request)"
  $PY benchmarks/bringup.py --reps 3

  stage "async pipeline (matpo train, tool latency 0 / 1 s, staleness 0 / 1 / 2)"
  $PY benchmarks/async_pipeline.py --steps 5

  stage "CPU engine decode: SGLang's per-request loop vs our batched decode (one engine each)"
  $PY benchmarks/engine_decode.py --reps 3

  stage "layout planner: predicted vs measured ranking"
  $PY benchmarks/layout_accuracy.py --count 6 --rounds 2 --steps 2 --batch-tokens 2048
fi

stage "report"
$PY benchmarks/report.py
echo "total $(( $(date +%s) - start ))s"
