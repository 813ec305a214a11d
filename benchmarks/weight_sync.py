"""Weight sync Megatron actor → SGLang engine, through each path of `megatron_matpo.bridge.sync`
(broadcast, tensor, disk), against a plain transfer of the same bytes between processes of the same
machine, in one run with alternating repetitions.

The actor is a 2-process gloo world on CPU (TP=2, then PP=2) holding a Qwen3-architecture model made
for this benchmark (default ~59 MB of fp32 weights); one real SGLang engine on the same model serves
every variant. Per repetition: one `WeightSync.sync()` (export from Megatron shards → HF tensors →
buckets → engine → cache flush), then the baseline for that path, then an export-only pass (the
megatron-bridge gather alone, nothing sent), so the sync time splits into export + transport.

Baselines (the same number of bytes):
- broadcast: `torch.distributed.broadcast` of one flat uint8 tensor from actor rank 0 to rank 1 (gloo
  over loopback TCP, as the sync's group with the engine is on CPU);
- tensor: copy into a shared-memory tensor and back out (the two copies the tensor path needs);
- disk: write one file into the sync directory and read it back (the safetensors path writes a shard
  and the engine reads it).

Peak extra memory: each process's resident-set high-water mark is reset (`/proc/<pid>/clear_refs`,
"5") before a sync and read (`VmHWM`) after; extra = high-water mark − resident size at the start.
The processes run with `MALLOC_MMAP_THRESHOLD_=65536` so freed buffers go back to the OS and each
sync's allocations show up in its own high-water mark. Tensor mode keeps its shared-memory bucket
across syncs; that bucket is added to its figure. Target: ≤ 1 bucket + the largest tensor (bucketed
paths; disk writes a whole shard, up to 4 GiB, by design).

    .venv/bin/python benchmarks/weight_sync.py [--buckets 0.25,1,4] [--reps 3] [--hidden 512]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, bench_env, median, meta, write_result  # noqa: E402

RATIO_TARGET = 0.5
# label: (sync.export, sync.stream, other SyncConfig fields). "reshard" is the sync as it runs; the others are
# the sync before a change, run interleaved with it: "reshard-loaded" receives every broadcast bucket into
# the engine's receive buffer and loads it (no tensor straight into its parameter: before 2026-12-08),
# "reshard-per-bucket" makes one engine call per bucket (before 2026-12-07), "megatron_bridge" gathers
# every full tensor (before 2026-12-04)
LABELS = {"reshard": ("reshard", True, {}), "reshard-loaded": ("reshard", True, {"direct_min_kib": 2.0 ** 40}),
          "reshard-per-bucket": ("reshard", False, {}), "megatron_bridge": ("megatron_bridge", False, {})}
LAYOUTS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}


# ---------------------------------------------------------------- memory high-water marks


def _status(pid: int | str) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the engine's launcher, scheduler, detokenizer)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, stack = [], [pid]
    while stack:
        q = stack.pop()
        out.append(q)
        stack += children.get(q, [])
    return out


class PeakExtra:
    """Resident-set growth of some processes over a block: high-water mark after − RSS before."""

    def __init__(self, pids: list[int | str]):
        self.pids = pids
        self.extra: dict[str, int] = {}

    def __enter__(self) -> "PeakExtra":
        self.base = {}
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self.base[pid] = _status(pid)["VmRSS"]
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        for pid, rss in self.base.items():
            try:
                self.extra[str(pid)] = _status(pid)["VmHWM"] - rss
            except OSError:
                pass


# ---------------------------------------------------------------- the actor world (every rank)


def world(model_dir: str, engine_url: str, engine_pids: list[int], layouts: list[str],
          variants: list[tuple[str, float | None, str]], reps: int, disk_dir: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_matpo.bridge import SyncConfig, WeightSync
    from megatron_matpo.bridge.reshard import Resharder
    from megatron_matpo.convert import hf_tensors
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    out: dict = {}
    for lname in layouts:
        layout = ParallelLayout(**LAYOUTS[lname])
        init_megatron(layout)
        rank0 = dist.get_rank() == 0
        built = build_model(model_dir, layout, load_weights=True, ddp_config=ddp_config(OptimConfig()))

        resharder = []

        def export_only(label: str, built=built) -> tuple[float, int]:
            """The export alone (nothing sent): its time and rank 0's peak extra memory. megatron-bridge:
            the gather of every full tensor; reshard: each rank's copy of its slices of every tensor into
            a buffer of the largest tensor (what it writes into the buckets)."""
            export = LABELS[label][0]
            dist.barrier()
            if export == "reshard" and not resharder:
                resharder.append(Resharder(built))
            with PeakExtra(["self"]) as peak:
                t0 = time.perf_counter()
                if export == "reshard":
                    rs = resharder[0]
                    scratch = torch.empty(max(t.nbytes for t in rs.tensors), dtype=torch.uint8)
                    for t in rs.tensors:
                        rs.fill(t, scratch[:t.nbytes].view(t.dtype).view(t.shape))
                    del scratch
                    dist.barrier()
                else:
                    for _ in hf_tensors(built):
                        pass
                dt = time.perf_counter() - t0
            return dt, peak.extra.get("self", -1)

        t0 = time.perf_counter()
        sizes = [t.numel() * t.element_size() for _, t in hf_tensors(built)]  # also warms megatron-bridge
        first_export_s = time.perf_counter() - t0
        total, largest = sum(sizes), max(sizes)
        flat = torch.ones(total, dtype=torch.uint8)
        shm = scratch = None
        if rank0:
            shm = torch.zeros(total, dtype=torch.uint8).share_memory_()
            scratch = torch.zeros(total, dtype=torch.uint8)
        base_file = Path(disk_dir) / f"baseline-{lname}.bin"

        def baseline(mode: str) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "broadcast":
                dist.broadcast(flat, src=0)
                dist.barrier()  # rank 1 has it
            elif rank0 and mode == "tensor":
                shm.copy_(flat)
                scratch.copy_(shm)
            elif rank0 and mode == "disk":
                with open(base_file, "wb") as f:
                    f.write(flat.numpy().data)
                with open(base_file, "rb") as f:
                    f.readinto(scratch.numpy().data)
            dt = time.perf_counter() - t0
            dist.barrier()
            return dt

        res = {"bytes": total, "tensors": len(sizes), "largest_tensor_bytes": largest,
               "first_export_s": first_export_s, "variants": []}
        for mode, bucket_mb, label in variants:
            export, stream, fields = LABELS[label]
            cfg = SyncConfig(mode=mode, bucket_mb=bucket_mb or 64.0, disk_dir=disk_dir, timeout_s=300, export=export,
                             stream=stream, **fields)
            ws = WeightSync(cfg, built, [engine_url])
            try:
                t0 = time.perf_counter()
                ws.sync()  # warm-up: forms the broadcast group, allocates the shared-memory bucket, ...
                warm_s = time.perf_counter() - t0
                rows = []
                for _ in range(reps):
                    dist.barrier()
                    pids = ["self"] + (list(engine_pids) if rank0 else [])
                    with PeakExtra(pids) as peak:
                        t0 = time.perf_counter()
                        stats = ws.sync()
                        wall = time.perf_counter() - t0
                    # a buffer kept across syncs is resident before the sync starts: counted on every
                    # rank that maps it (all of them for shared-memory collection, else rank 0)
                    maps_buffer = rank0 or ws.collection == "shared_memory"
                    mine = {"rank": dist.get_rank(), "extra": peak.extra.get("self", -1), "held": maps_buffer}
                    everyone = [None] * dist.get_world_size()
                    dist.all_gather_object(everyone, mine)
                    base_s = baseline(mode)
                    exp_s, exp_extra = export_only(export)
                    if rank0:
                        engine_extra = max((v for k, v in peak.extra.items() if k != "self"), default=-1)
                        held0 = int(stats.get("held_bytes", 0))
                        by_rank = [e["extra"] + (held0 if e["held"] else 0) for e in everyone]
                        rows.append({"sync_s": wall, "stats": stats, "baseline_s": base_s, "export_s": exp_s,
                                     "export_extra_bytes": exp_extra, "extra_bytes_by_rank": by_rank,
                                     "engine_extra_bytes": engine_extra})
            finally:
                ws.close()
            if rank0:
                res["variants"].append({"mode": mode, "bucket_mb": bucket_mb, "export": label,
                                        "collection": ws.collection, "warmup_s": warm_s, "reps": rows})
        if rank0:
            out[lname] = res
        base_file.unlink(missing_ok=True)
        del built
        parallel_state.destroy_model_parallel()
    return out


# ---------------------------------------------------------------- driver


def ensure_model(args) -> Path:
    from megatron_matpo.model.tiny import TinyShape, make_tiny_model

    shape = TinyShape(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, head_dim=args.head_dim, ffn_hidden_size=args.ffn)
    d = CACHE / f"sync-qwen3-h{args.hidden}-l{args.layers}-f{args.ffn}-a{args.heads}x{args.head_dim}-kv{args.kv_heads}"
    if not (d / "model.safetensors").exists():
        print(f"making the benchmark model at {d}", flush=True)
        make_tiny_model(d, "qwen3", shape=shape)
    return d


# WeightSync's profile of one sync (bridge/sync.py); engine_*: the engine's own, streamed syncs only
PARTS = ("produce_s", "send_s", "session_s", "flush_s", "engine_wait_s", "engine_load_s", "engine_flush_s",
         "engine_direct_mib")


def summarize(layout: str, r: dict) -> list[dict]:
    rows = []
    for v in r["variants"]:
        reps = v["reps"]
        sync_s = median(x["sync_s"] for x in reps)
        base_s = median(x["baseline_s"] for x in reps)
        exp_s = median(x["export_s"] for x in reps)
        bucket = int(v["bucket_mb"] * 2 ** 20) if v["bucket_mb"] else None
        # per rank, the buffer kept across syncs included (see world())
        by_rank = [max(x["extra_bytes_by_rank"][k] for x in reps) for k in range(len(reps[0]["extra_bytes_by_rank"]))]
        target_mem = bucket + r["largest_tensor_bytes"] if bucket else None
        engine_extra = max(x["engine_extra_bytes"] for x in reps)
        rows.append({
            "layout": layout, "mode": v["mode"], "bucket_mb": v["bucket_mb"],
            "export": v.get("export", "megatron_bridge"),
            "collection": v.get("collection", ""), "bytes": r["bytes"],
            "buckets": reps[0]["stats"].get("buckets"), "sync_s": sync_s, "baseline_s": base_s,
            "sync_bytes_per_s": r["bytes"] / sync_s, "baseline_bytes_per_s": r["bytes"] / base_s,
            "sync_s_per_gb": sync_s / (r["bytes"] / 1e9), "baseline_s_per_gb": base_s / (r["bytes"] / 1e9),
            "ratio": base_s / sync_s, "export_s": exp_s,
            # transport = what the sync adds on top of the export (buckets, engine calls, cache flush)
            "transport_s": max(sync_s - exp_s, 1e-9), "transport_ratio": base_s / max(sync_s - exp_s, 1e-9),
            "profile": {p: median(x["stats"].get(p, 0.0) for x in reps) for p in PARTS},
            "peak_extra_rank0_bytes": by_rank[0], "peak_extra_rank1_bytes": by_rank[1],
            "peak_extra_by_rank_bytes": by_rank,
            "peak_extra_engine_bytes": max(x["engine_extra_bytes"] for x in reps),
            # the export alone (megatron-bridge: full tensors gathered over TP/PP, fused ones split)
            "peak_extra_export_bytes": max(x["export_extra_bytes"] for x in reps),
            "memory_target_bytes": target_mem,
            "memory_target_met": (max(by_rank) <= target_mem) if target_mem else None,
            "engine_memory_target_met": (engine_extra <= target_mem) if target_mem else None,
            "ratio_target_met": base_s / sync_s >= RATIO_TARGET, "warmup_s": v["warmup_s"],
            "sync_s_all": [x["sync_s"] for x in reps], "baseline_s_all": [x["baseline_s"] for x in reps]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", default="1,3", help="bucket sizes (MiB) for broadcast and tensor (at the default "
                    "model both give >= 16 buckets per sync, as production's ~28 GB in 512 MiB buckets)")
    ap.add_argument("--exports", default="reshard,reshard-loaded,reshard-per-bucket",
                    help=f"variants of the sync ({', '.join(LABELS)}), each run at every mode, bucket and layout "
                    "(interleaved: after vs before)")
    ap.add_argument("--modes", default="broadcast,tensor,disk")
    ap.add_argument("--layouts", default="tp2,pp2")
    ap.add_argument("--reps", type=int, default=3, help="timed syncs per variant (after one warm-up)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--engine-mem-fraction", type=float, default=0.05,
                    help="the engine's --mem-fraction-static (of host RAM on CPU); weights + KV pool must fit")
    ap.add_argument("--json", help="default: benchmarks/results/weight_sync.json")
    args = ap.parse_args()
    bench_env()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # for the ranks and the engine (see docstring)

    from megatron_matpo.dist import launch_local
    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    t_start = time.perf_counter()
    buckets = [float(x) for x in args.buckets.split(",") if x]
    variants: list[tuple[str, float | None, str]] = []
    unknown = set(args.exports.split(",")) - set(LABELS)
    if unknown:
        ap.error(f"--exports: unknown {sorted(unknown)}; expected some of {', '.join(LABELS)}")
    for mode in args.modes.split(","):
        for export in args.exports.split(","):
            if mode == "disk" and export in ("reshard-per-bucket", "reshard-loaded"):
                continue  # disk makes one engine call either way
            if mode == "tensor" and export == "reshard-loaded":
                continue  # the engine loads from the shared buffer either way
            variants += [(mode, None, export)] if mode == "disk" else [(mode, b, export) for b in buckets]
    layouts = [x for x in args.layouts.split(",") if x]
    model = ensure_model(args)
    disk = Path(tempfile.mkdtemp(prefix="matpo-bench-sync-"))
    print(f"engine on {model.name} ...", flush=True)
    t0 = time.perf_counter()
    (engine,) = launch_engines(EngineConfig(model_path=str(model), log_dir=str(CACHE / "logs"),
                                            mem_fraction_static=args.engine_mem_fraction), 1)
    engine_start_s = time.perf_counter() - t0
    try:
        res = launch_local(world, 2, str(model), engine.url, descendants(engine.proc.pid), layouts, variants,
                           args.reps, str(disk))
    finally:
        engine.stop()
        shutil.rmtree(disk, ignore_errors=True)
    rows = [row for lname in layouts for row in summarize(lname, res[lname])]
    mb = 2 ** 20
    first = res[layouts[0]]
    print(f"model {first['bytes'] / mb:.1f} MiB in {first['tensors']} tensors, "
          f"largest {first['largest_tensor_bytes'] / mb:.2f} MiB")
    print(f"{'layout':>6} {'mode':>9} {'export':>15} {'bucket':>6} {'n':>3} {'sync s':>7} {'s/GB':>6} {'base s/GB':>9} "
          f"{'ratio':>6} {'produce':>7} {'send':>6} {'flush':>6} {'export s':>8} {'max extra MiB':>13} {'target':>7} "
          f"{'engine':>7}")
    for r in rows:
        tgt = f"{r['memory_target_bytes'] / mb:.2f}" if r["memory_target_bytes"] else "n/a"
        p = r["profile"]
        print(f"{r['layout']:>6} {r['mode']:>9} {r['export']:>15} {r['bucket_mb'] or '-':>6} {r['buckets'] or 0:>3.0f} "
              f"{r['sync_s']:>7.3f} {r['sync_s_per_gb']:>6.2f} {r['baseline_s_per_gb']:>9.2f} {r['ratio']:>6.3f} "
              f"{p['produce_s']:>7.3f} {p['send_s']:>6.3f} {p['flush_s']:>6.3f} {r['export_s']:>8.3f} "
              f"{max(r['peak_extra_by_rank_bytes']) / mb:>13.2f} {tgt:>7} {r['peak_extra_engine_bytes'] / mb:>7.2f}")
    write_result("weight_sync", {
        "meta": meta(reps=args.reps, wall_s=time.perf_counter() - t_start, engine_start_s=engine_start_s),
        "targets": {"ratio": RATIO_TARGET, "memory": "<= 1 bucket + largest tensor"},
        "model": {"dir": model.name, "bytes": first["bytes"], "tensors": first["tensors"],
                  "largest_tensor_bytes": first["largest_tensor_bytes"], "hidden": args.hidden, "layers": args.layers,
                  "ffn": args.ffn},
        "rows": rows, "raw": res}, args.json)


if __name__ == "__main__":
    main()
