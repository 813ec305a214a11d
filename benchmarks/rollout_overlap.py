"""MATPO rollout wall time vs its critical path under injected tool latency, with a planner's workers
run concurrently vs one after another (`workflow.concurrent_calls`), in one run on one engine with
alternating repetitions.

The rollouts are `matpo rollout`'s (`RolloutSession`, configs/rollout_tiny_cpu.yaml): a real SGLang
engine on the tiny Qwen3 (CPU), a real MCP search server over the offline multi-hop corpus, the
MATPO planner/worker workflow, exact-match reward. A random model never calls tools, so the
planner's first turn is constrained to delegate `--delegations` subtasks and each worker's first turn
to one search (`workflow.force_delegation`, `force_worker_search`, as the training configs do);
every tool call waits `--latency` seconds (`toolbox.injected_latency_s`) before reaching the server.

Critical path of one planner rollout, from the per-call timings each trajectory records
(`Trajectory.timings`): Σ over its turns of (its generation + the longest of that turn's calls),
where a tool call counts the injected latency and a delegation counts the worker's own critical
path (its generations and tool calls in turn). Generation latencies are the ones measured in the
same batch, so engine batching counts as generation; time the tool client spends beyond the
injected latency (MCP connection, transport, a busy event loop) does not, and neither does any
scheduling gap: wall / critical path is the time the orchestration leaves on the table. (The ratio
with measured tool latencies is printed too.) The batch's critical path is the longest planner's
(all rollouts start together, `max_concurrent` ≥ the batch). Target (issue 7): concurrent ≤ 1.15×.

    .venv/bin/python benchmarks/rollout_overlap.py [--prompts 4] [--samples 2] [--latency 0.5] [--reps 2]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, bench_env, median, meta, write_result  # noqa: E402

RATIO_TARGET = 1.15


def ensure_inputs() -> tuple[Path, Path, Path]:
    """The tiny model and multi-hop data as `matpo train`'s bootstrap makes them (cached)."""
    from megatron_matpo.data.multihop import MultihopConfig, write_multihop
    from megatron_matpo.model.tiny import make_tiny_model, train_tokenizer
    from megatron_matpo.train.bootstrap import tokenizer_texts

    root = CACHE / "rollout-inputs"
    data, corpus, model = root / "multihop" / "matpo_train_multihop", root / "multihop" / "corpus.jsonl", root / "tiny-qwen3"
    if not data.exists():
        write_multihop(root / "multihop", MultihopConfig(n_entities=60, n_train=64, n_val=16))
    if not (model / "model.safetensors").exists():
        make_tiny_model(model, "qwen3", tokenizer=train_tokenizer(tokenizer_texts(str(corpus)), vocab_size=4096))
    return model, data, corpus


def _dur(e: dict) -> float:
    return e["end"] - e["start"]


def critical_path(traj, children: list, tool_s: float | None = None) -> float:
    """Σ over turns of (generation + longest call); a delegation is the worker's critical path
    (a worker belongs to the delegation window its first call starts in). A tool call counts its
    measured latency, or `tool_s` when given (the nominal latency: then time the tool client spends
    beyond it, e.g. connecting, is not on the path)."""
    turns: dict[int, list[dict]] = defaultdict(list)
    for e in traj.timings:
        turns[e["turn"]].append(e)
    total = 0.0
    for turn in sorted(turns):
        evs = turns[turn]
        branches = [_dur(e) if tool_s is None else tool_s for e in evs if e["kind"] == "tool"]
        windows = [(e["start"], e["end"]) for e in evs if e["kind"] == "agent"]
        for w in children:
            if w.timings and any(a <= w.timings[0]["start"] <= b for a, b in windows):
                branches.append(critical_path(w, [], tool_s))
        total += sum(_dur(e) for e in evs if e["kind"] == "generate") + max(branches, default=0.0)
    return total


def timeline(trajs: list, t0: float) -> list[dict]:
    """One rollout's calls, relative to the batch start (for reading, not for the figures)."""
    return [{"agent": t.traj_id.rsplit("/", 1)[-1], "kind": e["kind"], "turn": e["turn"],
             "start": round(e["start"] - t0, 3), "end": round(e["end"] - t0, 3)}
            for t in trajs for e in t.timings]


def analyze(results: list, wall: float, latency: float) -> dict:
    per = []
    busy = 0.0
    tool_lat = []
    for trajs in results:
        planner, workers = trajs[0], trajs[1:]
        cp = critical_path(planner, workers, latency)
        cp_measured = critical_path(planner, workers)
        tool_lat += [_dur(e) for t in trajs for e in t.timings if e["kind"] == "tool"]
        starts = [e["start"] for t in trajs for e in t.timings]
        ends = [e["end"] for t in trajs for e in t.timings]
        busy += sum(_dur(e) for t in trajs for e in t.timings if e["kind"] != "agent")
        per.append({"critical_path_s": cp, "critical_path_measured_tools_s": cp_measured, "wall_s": max(ends) - min(starts), "workers": len(workers),
                    "tool_calls": sum(e["kind"] == "tool" for t in trajs for e in t.timings),
                    "tool_s": sum(_dur(e) for t in trajs for e in t.timings if e["kind"] == "tool")})
    cp_max = max(p["critical_path_s"] for p in per)
    cp_meas = max(p["critical_path_measured_tools_s"] for p in per)
    tools = sum(p["tool_calls"] for p in per)
    return {"wall_s": wall, "critical_path_s": cp_max, "ratio": wall / cp_max,
            "critical_path_measured_tools_s": cp_meas, "ratio_measured_tools": wall / cp_meas,
            "tool_latency_median_s": median(tool_lat), "tool_latency_max_s": max(tool_lat, default=float("nan")),
            "rollout_ratio_median": median(p["wall_s"] / p["critical_path_s"] for p in per),
            "rollout_ratio_max": max(p["wall_s"] / p["critical_path_s"] for p in per),
            "busy_s": busy, "rollouts": len(per), "workers": sum(p["workers"] for p in per),
            "tool_calls": tools, "tool_latency_mean_s": sum(p["tool_s"] for p in per) / max(tools, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "rollout_tiny_cpu.yaml"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2, help="rollouts per prompt")
    ap.add_argument("--delegations", type=int, default=3, help="workers per planner (forced first turn)")
    ap.add_argument("--latency", type=float, default=0.5, help="injected seconds per tool call")
    ap.add_argument("--reps", type=int, default=2, help="batches per mode, alternating")
    ap.add_argument("--json", help="default: benchmarks/results/rollout_overlap.json")
    ap.add_argument("overrides", nargs="*", help="RolloutConfig overrides, key.sub=value")
    args = ap.parse_args()
    bench_env()
    t_start = time.perf_counter()

    from megatron_matpo import config
    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.rollout.runner import RolloutConfig, RolloutSession

    model, data, corpus = ensure_inputs()
    batch = args.prompts * args.samples
    cfg = config.load(RolloutConfig, args.config, [
        f"model={model}", f"data={data}", f"toolbox.corpus={corpus}", f"toolbox.injected_latency_s={args.latency}",
        f"n_samples={args.samples}", f"max_concurrent={max(batch, 1)}", f"log_dir={CACHE / 'logs'}",
        f"workflow.force_delegation={args.delegations}", "workflow.force_worker_search=true",
        # the training config's worker limits (configs/tiny_cpu.yaml), with room for the forced search (up to ~75 tokens)
        "workflow.worker.max_turns=2", "workflow.worker.max_tokens_per_turn=96", "workflow.worker.summary_reserve_tokens=48",
        # room for the forced calls (up to ~75 tokens each with the tiny tokenizer) in the planner's first turn
        f"workflow.planner.max_tokens_per_turn={max(128, 96 * args.delegations)}", *args.overrides])
    samples = list(read_dataset(cfg.data, limit=args.prompts))
    runs: dict[str, list[dict]] = {"concurrent": [], "sequential": []}
    t0 = time.perf_counter()
    with RolloutSession(cfg) as session:
        engine_start_s = time.perf_counter() - t0
        cfg.workflow.concurrent_calls = True
        asyncio.run(session.run(samples[:1], progress=False, uid_prefix="warmup:", n_samples=1))  # grammar, MCP
        for rep in range(args.reps):
            order = ["concurrent", "sequential"] if rep % 2 == 0 else ["sequential", "concurrent"]
            for mode in order:
                cfg.workflow.concurrent_calls = mode == "concurrent"
                t0 = time.perf_counter()
                results = asyncio.run(session.run(samples, progress=False, uid_prefix=f"{rep}-{mode}:"))
                r = analyze(results, time.perf_counter() - t0, args.latency)
                r["example_timeline"] = timeline(results[0], t0)
                runs[mode].append(r)
                print(f"rep {rep} {mode:>10}: wall {r['wall_s']:6.2f}s  critical path {r['critical_path_s']:6.2f}s  "
                      f"ratio {r['ratio']:.3f} (with measured tool latencies {r['ratio_measured_tools']:.3f}, "
                      f"per rollout median {r['rollout_ratio_median']:.3f})  {r['rollouts']} rollouts, "
                      f"{r['workers']} workers, {r['tool_calls']} tool calls (latency median "
                      f"{r['tool_latency_median_s']:.2f}s, max {r['tool_latency_max_s']:.2f}s), busy {r['busy_s']:.1f}s",
                      flush=True)
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {k: median(r[k] for r in rs) for k in (
            "wall_s", "critical_path_s", "ratio", "critical_path_measured_tools_s", "ratio_measured_tools",
            "rollout_ratio_median", "busy_s", "workers", "tool_calls", "tool_latency_mean_s", "tool_latency_median_s",
            "tool_latency_max_s")}
    c, s = summary["concurrent"], summary["sequential"]
    speedup = s["wall_s"] / c["wall_s"]
    print(f"concurrent: wall/critical path {c['ratio']:.3f} (target <= {RATIO_TARGET}); sequential {s['ratio']:.3f}; "
          f"concurrent is {speedup:.2f}x faster than sequential")
    write_result("rollout_overlap", {
        "meta": meta(reps=args.reps, wall_s=time.perf_counter() - t_start, engine_start_s=engine_start_s),
        "targets": {"ratio": RATIO_TARGET},
        "setup": {"prompts": args.prompts, "samples": args.samples, "delegations": args.delegations,
                  "latency_s": args.latency, "config": Path(args.config).name,
                  "planner": vars(cfg.workflow.planner), "worker": vars(cfg.workflow.worker)},
        "summary": summary, "speedup_concurrent_over_sequential": speedup,
        "target_met": c["ratio"] <= RATIO_TARGET, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
