"""Fit the cost model's machine constants from a short probe on the machine the layouts will run on.

The analytic model (`cost.py`) prices compute by FLOPs and communication by bytes. Measured on this
repo's CPU machine it missed two costs that decide rankings (docs/benchmarks.md, layout planner):
a fixed latency per collective (on gloo ~0.3 ms whatever the size; TP issues 4 per layer per
micro-batch) and a fixed cost per layer and micro-batch (Python dispatch, kernel launches), which
makes fewer, larger micro-batches faster than the bubble alone predicts. The probe measures them:

- collective latency and bandwidth: all-reduces of a 4-byte and of a 4 MiB tensor between 2 ranks;
- compute: one rank runs forward + backward of the model on packed micro-batches of two sizes; the
  slope over tokens gives the effective FLOP rate, the intercept (spread over the layers) the fixed
  cost per layer and micro-batch;
- compute with every rank busy: the small micro-batch on all ranks at once; over its time alone, the
  factor by which ranks sharing a host slow each other (memory bandwidth; 1 on GPUs);
- a collective inside a step: the model at TP = world on the small micro-batch. A gloo collective
  between ranks that are computing costs far more than one in an idle loop (~2 ms vs ~0.3 ms on the
  2-core machine: the ranks meet late and wake up slowly), so the latency charged to every collective
  is what this step shows beyond its compute, fixed costs and bytes, per collective the model counts
  (4 per layer, plus the embedding and the output layer).

`calibrated(cluster, probe_result, assumptions)` returns the cluster with these fields set (`peak_tflops` so that
`Assumptions.mfu` of it is the measured rate); `to_yaml` writes it for `--cluster FILE`.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

from megatron_matpo.planner.cluster import Cluster

SMALL_BYTES, LARGE_BYTES = 4, 4 * 2 ** 20


def _probe_world(hf_dir: str, seq_len: int, rows: tuple[int, int], reps: int) -> dict:
    import torch
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.forward import pack_sequences, run_schedule
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.planner.model_stats import ModelSpec, forward_flops

    world = int(os.environ["WORLD_SIZE"])
    init_megatron(ParallelLayout(dp=world))  # one whole model per rank (and the process group)
    device = platform.device()
    sync = torch.cuda.synchronize if platform.capabilities().cuda else (lambda: None)  # time finished work
    out: dict = {}
    if world > 1:
        for label, n in (("small", SMALL_BYTES), ("large", LARGE_BYTES)):
            t = torch.zeros(max(1, n // 4), dtype=torch.float32, device=device)
            times = []
            for i in range(reps * 10 + 3):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                torch.distributed.all_reduce(t)
                sync()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            out[f"all_reduce_{label}_s"] = statistics.median(times)
    # compute on a one-process model (every rank builds it; the ranks run it in turn: the probe wants
    # one rank's speed with the others idle, as a rank's share of a step is measured)
    built = build_model(hf_dir, ParallelLayout(dp=world), load_weights=False)  # bare modules: no DP reduction
    for c in built.chunks:
        c.train()
    spec = ModelSpec.from_hf(hf_dir)
    vocab = built.provider.vocab_size
    g = torch.Generator().manual_seed(0)

    def loss(o, _mb):
        return o.float().mean(), {}

    def micro_batch(k: int):  # k packed rows of seq_len, as the workload packs them
        return pack_sequences([torch.randint(0, vocab, (seq_len,), generator=g) for _ in range(k)])

    def step_times(chunks, mb, together: bool) -> list[float]:
        """`reps` timed forward + backward passes after one warm-up; `together`: all ranks start each one
        at a barrier (else this rank runs alone, as called)."""
        times = []
        for i in range(reps + 1):
            if together:
                torch.distributed.barrier()
            t_start = time.perf_counter()
            run_schedule(chunks, [mb], loss, forward_only=False, device=device)
            sync()
            if i:
                times.append(time.perf_counter() - t_start)
        return times

    def median_over_ranks(times: list[float]) -> float:
        everyone: list = [None] * world
        torch.distributed.all_gather_object(everyone, times)
        return statistics.median([x for ts in everyone for x in ts])

    per_size = {}
    for k in rows:
        mb, times = micro_batch(k), []
        for r in range(world):  # the ranks in turn, the others idle
            torch.distributed.barrier()
            if torch.distributed.get_rank() == r:
                times = step_times(built.chunks, mb, together=False)
        per_size[k] = median_over_ranks(times)
    (k0, k1), (t0_, t1_) = rows, (per_size[rows[0]], per_size[rows[1]])
    if world > 1:  # the same small micro-batch on every rank at once
        out["concurrent_micro_batch_s"] = median_over_ranks(step_times(built.chunks, micro_batch(k0), together=True))
    flops = {k: 3 * k * forward_flops(spec, seq_len) for k in rows}  # forward + backward (2x)
    rate = (flops[k1] - flops[k0]) / max(t1_ - t0_, 1e-9)
    intercept = max(0.0, t0_ - flops[k0] / rate)
    out.update({"seq_len": seq_len, "rows": list(rows), "micro_batch_s": [t0_, t1_], "flops": [flops[k0], flops[k1]],
                "effective_tflops": rate / 1e12, "fixed_per_micro_batch_s": intercept, "layers": spec.layers,
                "hidden": spec.hidden})
    parallel_state.destroy_model_parallel()
    if world > 1 and spec.heads % world == 0 and spec.kv_heads % world == 0:
        del built
        init_megatron(ParallelLayout(tp=world))
        built = build_model(hf_dir, ParallelLayout(tp=world), load_weights=False)
        for c in built.chunks:
            c.train()
        out["tp_micro_batch_s"] = statistics.median(step_times(built.chunks, micro_batch(k0), together=True))
        parallel_state.destroy_model_parallel()
    return out


def probe(hf_dir: str, world: int = 2, seq_len: int = 256, rows: tuple[int, int] = (1, 4), reps: int = 5) -> dict:
    """Run the probe in a local world of `world` processes (gloo on CPU, NCCL on GPU)."""
    from megatron_matpo.dist import launch_local

    res = launch_local(_probe_world, world, str(hf_dir), seq_len, tuple(rows), reps)
    res["world"] = world
    return res


def calibrated(cluster: Cluster, measured: dict, assumptions) -> Cluster:
    """`cluster` with the probe's constants: collective latency, link bandwidth (as `nvlink_gbs`, the
    in-node figure the model uses for groups inside a node), the fixed cost per layer and micro-batch,
    and a peak such that `assumptions.mfu` of it is the measured FLOP rate."""
    changes: dict = {"peak_tflops": measured["effective_tflops"] / assumptions.mfu,
                     "layer_overhead_ms": 1e3 * measured["fixed_per_micro_batch_s"] / measured["layers"]}
    factor = 1.0
    if "concurrent_micro_batch_s" in measured:
        fixed, alone = measured["fixed_per_micro_batch_s"], measured["micro_batch_s"][0]
        factor = max(1.0, (measured["concurrent_micro_batch_s"] - fixed) / max(alone - fixed, 1e-9))
        changes["concurrent_compute_factor"] = factor
    if "all_reduce_small_s" in measured:
        alpha = measured["all_reduce_small_s"]
        n = measured["world"]
        # what the model charges an all-reduce: alpha + 2(n-1)/n * bytes / (nvlink_gbs / 2 * comm_efficiency)
        achieved = 2 * (n - 1) / n * LARGE_BYTES / max(measured["all_reduce_large_s"] - alpha, 1e-9)
        if "tp_micro_batch_s" in measured:  # a collective inside a step (see the module docstring)
            k0, t0_ = measured["rows"][0], measured["micro_batch_s"][0]
            fixed = measured["fixed_per_micro_batch_s"]
            count = 4 * measured["layers"] + 2  # cost._stage_slot's TP collectives: no SP, no recompute
            per_bytes = 2 * (n - 1) / n * k0 * measured["seq_len"] * measured["hidden"] * 4 / achieved
            beyond = measured["tp_micro_batch_s"] - (t0_ - fixed) * factor / n - fixed - count * per_bytes
            alpha = max(alpha, beyond / count)
        changes.update(collective_latency_us=alpha * 1e6, nvlink_gbs=2 * achieved / assumptions.comm_efficiency / 1e9)
    idle = (f" (an idle all-reduce: {measured['all_reduce_small_s'] * 1e6:.4g} us)"
            if "tp_micro_batch_s" in measured else "")
    desc = (f"{cluster.description} | calibrated by planner/calibrate.py: "
            f"{', '.join(f'{k}={v:.4g}' for k, v in changes.items())}{idle}")
    return dataclasses.replace(cluster, name=f"{cluster.name}-calibrated", description=desc, **changes).validate()


def to_yaml(cluster: Cluster, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cluster.to_dict(), sort_keys=False))
    return path
