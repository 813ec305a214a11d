"""`matpo bench-layouts` / `tools/bench_layouts.py`: rank parallel layouts for a model on a cluster
(analytic), optionally run the best few for real on this machine (`--measure`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_matpo.planner.cluster import PRESETS


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="HF model directory or its config.json (Qwen3, Qwen2, Llama)")
    p.add_argument("--cluster", default="a800x128", help=f"preset ({', '.join(PRESETS)}) or a YAML file")
    p.add_argument("--gpus", type=int, help="plan for this many GPUs (default: the whole cluster)")
    p.add_argument("--seq-len", type=int, help="row length in tokens (default: max_position_embeddings)")
    p.add_argument("--global-batch-tokens", type=int, help="tokens per optimizer step (default: 128 rows)")
    p.add_argument("--micro-batch-tokens", type=_ints, help="packing budgets to try, comma-separated "
                   "(default: 1, 2 and 4 rows)")
    p.add_argument("--tp", type=_ints, help="TP sizes to try (default: every divisor of the GPU count)")
    p.add_argument("--pp", type=_ints, help="PP sizes to try (default: every divisor)")
    p.add_argument("--cp", type=_ints, help="CP sizes to try (default: 1,2,4,8)")
    p.add_argument("--recompute", choices=["both", "on", "off"], default="both")
    p.add_argument("--distributed-optimizer", choices=["both", "on", "off"], default="both")
    p.add_argument("--allow-cross-node-tp", action="store_true", help="let TP groups span nodes")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak FLOP/s the kernels reach")
    p.add_argument("--memory-margin", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--overhead-gib", type=float, help="per-GPU memory outside the formula (default: the cluster's)")
    p.add_argument("--comm-efficiency", type=float, default=0.8, help="achieved / nominal link bandwidth")
    p.add_argument("--dp-exposed", type=float, default=1.0, help="fraction of DP grad comm not overlapped")
    p.add_argument("--tp-exposed", type=float, default=1.0, help="fraction of TP comm not overlapped")
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="rank TP layouts without sequence parallelism only (default: each with and without)")
    p.add_argument("--top", type=int, default=10, help="rows in the printed table")
    p.add_argument("--plain", action="store_true", help="plain-text table even when rich is installed")
    p.add_argument("--json", default="runs/bench-layouts/layouts.json", help="write the full ranking here")
    p.add_argument("--png", default="runs/bench-layouts/layouts.png", help="plot here (needs matplotlib)")
    p.add_argument("--calibrate", metavar="YAML",
                   help="first run a short probe on this machine (collective latency and bandwidth, FLOP rate, "
                        "fixed cost per layer and micro-batch: planner/calibrate.py), write the calibrated "
                        "--cluster to YAML and plan with it")
    p.add_argument("--measure", action="store_true",
                   help="also run --measure-count layouts for real on this machine and compare rankings")
    p.add_argument("--measure-count", type=int, default=3,
                   help="layouts to run, spread from the predicted fastest to the slowest (ties dropped)")
    p.add_argument("--measure-steps", type=int, default=1)
    p.add_argument("--measure-warmup", type=int, default=1)
    return p


def _choice(value: str) -> tuple[bool, ...]:
    return {"both": (False, True), "on": (True,), "off": (False,)}[value]


def _local_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    from megatron_matpo.planner.cluster import load_cluster
    from megatron_matpo.planner.cost import Assumptions, Workload
    from megatron_matpo.planner.model_stats import ModelSpec
    from megatron_matpo.planner.report import print_table, write_json, write_png
    from megatron_matpo.planner.search import plan

    spec = ModelSpec.from_hf(args.model)
    cluster = load_cluster(args.cluster)
    seq_len = args.seq_len or spec.max_position_embeddings
    if not seq_len:
        raise ValueError("--seq-len is required: the config has no max_position_embeddings")
    workload = Workload(seq_len=seq_len, global_batch_tokens=args.global_batch_tokens or 128 * seq_len)
    assumptions = Assumptions(
        mfu=args.mfu, memory_margin=args.memory_margin, overhead_gib=args.overhead_gib,
        comm_efficiency=args.comm_efficiency, dp_exposed_fraction=args.dp_exposed,
        tp_exposed_fraction=args.tp_exposed, sequence_parallel=not args.no_sequence_parallel)
    if args.calibrate:
        from megatron_matpo import platform
        from megatron_matpo.planner.calibrate import calibrated, probe, to_yaml

        model_dir = Path(args.model)
        model_dir = model_dir.parent if model_dir.is_file() else model_dir
        if not any(model_dir.glob("*.safetensors")):
            raise ValueError(f"--calibrate runs the model: --model must be an HF model directory with weights "
                             f"(*.safetensors), got {args.model}")
        if not platform.capabilities().cuda and cluster.dtype != "fp32":
            raise ValueError(f"--calibrate measures this machine, which has no GPU, but --cluster {cluster.name} "
                             f"describes {cluster.dtype} GPUs: calibrate on one of its GPU nodes, or pass a "
                             "CPU cluster (e.g. --cluster cpu-tiny)")
        world = 2 if _local_devices() >= 2 else 1
        # the probe fits per-token and per-micro-batch costs; rows longer than this add time, not accuracy
        probe_len = min(seq_len, 512)
        print(f"calibrating {cluster.name} on this machine ({world} processes, {model_dir.name}, "
              f"rows of {probe_len} tokens) ...", flush=True)
        cluster = calibrated(cluster, probe(str(model_dir), world=world, seq_len=probe_len), assumptions)
        print(f"calibrated cluster written to {to_yaml(cluster, args.calibrate)}: {cluster.description}", flush=True)
    result = plan(spec, cluster, workload, assumptions, gpus=args.gpus, tp=args.tp, pp=args.pp, cp=args.cp,
                  micro_batch_tokens=args.micro_batch_tokens, recompute=_choice(args.recompute),
                  distributed_optimizer=_choice(args.distributed_optimizer),
                  allow_cross_node_tp=args.allow_cross_node_tp)
    print_table(result, args.top, plain=args.plain)

    extra = {}
    if args.measure:
        extra = _measure(args, result)
    path = write_json(result, args.json, extra)
    print(f"ranking written to {path}")
    _, message = write_png(result, args.png)
    print(message)
    return 0 if result.ranked else 1


def spread(ranked: list, k: int) -> list:
    """k predictions evenly spaced over a ranking (first and last included), one per distinct
    predicted time: equal predictions say nothing about ranking agreement."""
    distinct = []
    for p in ranked:
        if not distinct or p.time.total > distinct[-1].time.total * (1 + 1e-9):
            distinct.append(p)
    if k >= len(distinct):
        return distinct
    if k <= 1:
        return distinct[:k]
    return [distinct[round(i * (len(distinct) - 1) / (k - 1))] for i in range(k)]


def _measure(args: argparse.Namespace, result) -> dict:
    from megatron_matpo.planner.measure import compare_rankings, measure_layouts

    if result.gpus > _local_devices():
        raise ValueError(f"--measure runs {result.gpus} local processes, this machine has {_local_devices()} "
                         f"devices: pass --gpus")
    chosen = spread(result.ranked, args.measure_count)
    if not chosen:
        raise ValueError("--measure: no fitting layout to run")
    model_dir = Path(args.model)
    model_dir = model_dir.parent if model_dir.is_file() else model_dir
    measured = measure_layouts(str(model_dir), [p.layout for p in chosen], result.workload.global_batch_tokens,
                               args.measure_steps, seq_len=result.workload.seq_len, warmup=args.measure_warmup)
    agreement = compare_rankings(chosen, measured)
    print(f"measured ({measured[0]['device']}, {measured[0]['dtype']}, memory = {measured[0]['memory_kind']}):")
    for p, m in zip(chosen, measured):
        print(f"  {m['key']}: predicted {p.time.total:.3f}s / {p.memory.total / 2 ** 30:.2f} GiB, "
              f"measured {m['step_time_s']:.3f}s ({m['tokens_per_s']:.0f} tok/s) / {m['peak_memory_gib']:.2f} GiB")
    print(f"ranking agreement over {agreement['n']} layouts: Spearman {agreement['spearman']:.3f}, "
          f"Kendall {agreement['kendall']:.3f}")
    return {"measured": measured, "agreement": agreement}


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = add_arguments(argparse.ArgumentParser(prog="bench_layouts", description=__doc__))
    try:
        return run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # bad model, cluster or layout: one line, no traceback
        print(f"bench-layouts: error: {e}", file=sys.stderr)
        return 2
