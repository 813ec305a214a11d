"""Measured mode: real Megatron training steps (build_model, DDP, megatron optimizer, packed THD
micro-batches, `train_step`) for each layout on this machine, and the agreement between predicted and
measured rankings.

Every layout of one world size runs inside one `launch_local` world (process start-up dominates on
CPU), re-forming megatron's parallel groups per layout. Rows are synthetic: random tokens, every
token but the first trained, old logprobs at the uniform-distribution value so PPO ratios start near 1.
"""
from __future__ import annotations

import gc
import math
import threading
import time
from typing import Any, Sequence

import torch

from megatron_matpo.planner.cluster import GIB
from megatron_matpo.planner.cost import Layout


class _ProviderOverrides:
    """An AutoBridge whose providers get extra TransformerConfig settings before `build_model`
    finalizes them (`build_model` takes a bridge, not these settings)."""

    def __init__(self, bridge: Any, **settings: Any):
        self._bridge, self._settings = bridge, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bridge, name)

    def to_megatron_provider(self, *args, **kwargs):
        provider = self._bridge.to_megatron_provider(*args, **kwargs)
        for key, value in self._settings.items():
            setattr(provider, key, value)
        return provider


def provider_settings(layout: Layout) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if layout.recompute:  # full, uniform, one layer per checkpoint: what the cost model assumes
        settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return settings


class _PeakRss:
    """Samples this process's resident set size in a thread (CPU has no resettable peak counter)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "_PeakRss":
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    from megatron_matpo.train.packing import Row

    g = torch.Generator().manual_seed(seed)
    uniform = -math.log(vocab)
    return [Row(token_ids=torch.randint(0, vocab, (seq_len,), generator=g).tolist(),
                loss_mask=[0] + [1] * (seq_len - 1), old_logprobs=[uniform] * seq_len,
                advantage=1.0 if i % 2 == 0 else -1.0, row_id=i) for i in range(n_rows)]


def _measure_one(hf_dir: str, layout: Layout, n_rows: int, seq_len: int, steps: int, warmup: int) -> dict:
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.algo.loss import LossConfig
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model, make_bridge
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.train.actor import train_step
    from megatron_matpo.train.optim import OptimConfig, build_optimizer, ddp_config

    cuda = platform.capabilities().cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    par = ParallelLayout(tp=layout.tp, pp=layout.pp, dp=layout.dp, cp=layout.cp, sp=layout.sp)
    init_megatron(par)
    optim = OptimConfig(use_distributed_optimizer=layout.distributed_optimizer)
    bridge = _ProviderOverrides(make_bridge(hf_dir), **provider_settings(layout))
    built = build_model(hf_dir, par, load_weights=False, dtype=dtype, seq_length=layout.micro_batch_tokens,
                        ddp_config=ddp_config(optim), bridge=bridge)
    opt = build_optimizer(built.chunks, optim, dtype=dtype)
    n_params = sum(p.numel() for c in built.chunks for p in c.parameters())

    rows = synthetic_rows(n_rows, seq_len, built.provider.vocab_size)
    packed = pack_rows(rows, layout.micro_batch_tokens, dp_size=layout.dp, pad_to_multiple=layout.tp,
                       cp_size=layout.cp)
    mbs = packed[parallel_state.get_data_parallel_rank()]
    loss_tokens = sum(sum(r.loss_mask) for r in rows)
    device = platform.device()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    times: list[float] = []
    for _ in range(warmup):
        train_step(built.chunks, opt, mbs, LossConfig(), loss_tokens, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _PeakRss() as rss:
        for _ in range(steps):
            torch.distributed.barrier()
            sync()
            t0 = time.perf_counter()
            stats = train_step(built.chunks, opt, mbs, LossConfig(), loss_tokens, device)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    mine = {"rank": torch.distributed.get_rank(), "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(), "cp_rank": parallel_state.get_context_parallel_rank(),
            "params": n_params, "peak_bytes": peak,
            "times": times, "loss": stats.get("loss"), "micro_batches": len(mbs)}
    everyone: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)

    del built, opt
    parallel_state.destroy_model_parallel()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    step = [max(r["times"][i] for r in everyone) for i in range(steps)]  # the slowest rank sets the pace
    mean = sum(step) / len(step)
    losses = [r["loss"] for r in everyone if r["loss"] is not None]
    return {
        "layout": layout.to_dict(), "key": layout.key, "world": layout.world,
        "device": "cuda" if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_step": n_rows * seq_len, "seq_len": seq_len, "micro_batches": everyone[0]["micro_batches"],
        "step_times_s": step, "step_time_s": mean, "tokens_per_s": n_rows * seq_len / mean,
        "peak_memory_gib": max(r["peak_bytes"] for r in everyone) / GIB,
        "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process RSS (sampled every 5 ms)",
        "loss": losses[0] if losses else None,
        "params_per_rank": [{k: r[k] for k in ("rank", "tp_rank", "pp_rank", "cp_rank", "dp_rank", "params")}
                            for r in everyone],
    }


def _measure_world(hf_dir: str, layouts: list[dict], n_rows: int, seq_len: int, steps: int,
                   warmup: int) -> list[dict]:
    return [_measure_one(hf_dir, Layout(**d), n_rows, seq_len, steps, warmup) for d in layouts]


def measure_layouts(hf_dir: str, layouts: Sequence[Layout], tokens_per_step: int, steps: int = 1, *,
                    seq_len: int | None = None, warmup: int = 0, timeout_s: float = 1800) -> list[dict]:
    """Run `warmup` + `steps` real training steps per layout; one dict per layout, in order.

    `tokens_per_step` is split into rows of `seq_len` tokens (default: the smallest packing budget
    among the layouts, so every layout holds a row). Reports the mean step time of the slowest rank,
    tokens/s, peak memory (max over ranks: CUDA max allocated, or sampled RSS on CPU) and each rank's
    parameter count.
    """
    from megatron_matpo.dist import launch_local

    if not layouts:
        return []
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    seq_len = seq_len or min(lay.micro_batch_tokens for lay in layouts)
    n_rows = tokens_per_step // seq_len
    for lay in layouts:
        if n_rows < lay.dp:
            raise ValueError(f"{lay.key}: {n_rows} rows of {seq_len} tokens cannot feed dp={lay.dp}")
        if lay.micro_batch_tokens < seq_len:
            raise ValueError(f"{lay.key}: micro_batch_tokens < seq_len={seq_len}")
    results: dict[int, dict] = {}
    for world in sorted({lay.world for lay in layouts}):
        idx = [i for i, lay in enumerate(layouts) if lay.world == world]
        out = launch_local(_measure_world, world, str(hf_dir), [layouts[i].to_dict() for i in idx],
                           n_rows, seq_len, steps, warmup, timeout_s=timeout_s)
        results.update(zip(idx, out))
    return [results[i] for i in range(len(layouts))]


# ---------------------------------------------------------------- ranking agreement


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the (tie-averaged) ranks."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list reduce the denominator)."""
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


def compare_rankings(predicted: Sequence[Any], measured: Sequence[dict], metric: str = "step_time_s") -> dict:
    """Agreement of predicted and measured step times on the layouts present in both.

    `predicted`: `Prediction`s or their `to_dict()`; `measured`: `measure_layouts` results. Returns
    Spearman's rho and Kendall's tau-b (nan below two layouts) and the paired values.
    """
    pred = {}
    for p in predicted:
        d = p.to_dict() if hasattr(p, "to_dict") else p
        pred[d["key"]] = d[metric]
    pairs = [(m["key"], pred[m["key"]], m[metric]) for m in measured if m["key"] in pred]
    xs, ys = [p[1] for p in pairs], [p[2] for p in pairs]
    enough = len(pairs) >= 2
    return {"n": len(pairs), "spearman": spearman(xs, ys) if enough else float("nan"),
            "kendall": kendall(xs, ys) if enough else float("nan"),
            "pairs": [{"key": k, "predicted": a, "measured": b} for k, a, b in pairs]}
