#!/usr/bin/env python
"""Rank TP x PP x CP x DP layouts for a model on a cluster: predicted per-GPU memory and step time
(same as `matpo bench-layouts`); `--measure` also runs the best few for real on this machine.

    python tools/bench_layouts.py --model configs/models/qwen3-14b --cluster a800x128 --seq-len 40960
    python tools/bench_layouts.py --model runs/tiny-qwen3 --cluster cpu-tiny --gpus 2 --seq-len 64 \
        --global-batch-tokens 512 --measure
"""
import os
import sys

from megatron_matpo.compat import quiet_library_noise
from megatron_matpo.planner.command import main

if __name__ == "__main__":
    quiet_library_noise()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
