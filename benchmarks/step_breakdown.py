"""End-to-end RL step breakdown of `matpo train` (default configs/tiny_cpu.yaml): the share of step
time in each stage the controller times (rollout, advantage + packing, old/ref logprobs, train,
weight sync, parity) and the orchestration overhead = step time − Σ stage times (target ≤ 10%).

Runs `matpo train` in a fresh run directory (or reads an existing run with `--from-run DIR`) and
reads `metrics.jsonl`: `time/<stage>_s` per stage, `time/step_s` per step, `time` (wall clock when
the step was logged). Reward scoring happens inside the rollout stage (each rollout is scored as it
finishes, overlapped with the others' generation), so it has no stage of its own. Also reported:
time between logged steps beyond the step itself (logging, tensorboard, checkpoints, eval), the Ray
round trip of the sync stage (controller's `time/sync_s` − rank 0's own `sync/seconds`), and
bring-up / tear-down of the whole command. Step 1 is reported apart: it forms the weight-broadcast
group with the engine and warms every code path.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 4] [--config configs/tiny_cpu.yaml] [key=value ...]
    .venv/bin/python benchmarks/step_breakdown.py --from-run runs/tiny_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, bench_env, meta, write_result  # noqa: E402

OVERHEAD_TARGET = 0.10


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (no step was logged)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rollout_critical_path(run_dir: Path, step: int) -> float | None:
    """The longest planner chain of the step's rollouts (generation + tool latencies, workers as
    their own chains), from the trajectories' `timings` in rollouts/step_NNNNNN.jsonl."""
    from types import SimpleNamespace

    from rollout_overlap import critical_path

    path = run_dir / "rollouts" / f"step_{step:06d}.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or "timings" not in rows[0]:
        return None  # a run from before trajectories recorded timings
    trajs = {r["traj_id"]: SimpleNamespace(timings=r["timings"], parent=r["parent_id"]) for r in rows}
    roots = [tid for tid, t in trajs.items() if t.parent is None]
    return max(critical_path(trajs[tid], [t for t in trajs.values() if t.parent == tid]) for tid in roots)


def breakdown(records: list[dict], run_dir: Path) -> dict:
    steps = []
    prev_time = None
    for r in records:
        stages = {k[len("time/"):-len("_s")]: v for k, v in r.items()
                  if k.startswith("time/") and k.endswith("_s") and k != "time/step_s"}
        step_s = r["time/step_s"]
        overhead = step_s - sum(stages.values())
        row = {"step": r["step"], "step_s": step_s, "stages": stages, "overhead_s": overhead,
               "overhead_share": overhead / step_s, "between_steps_s": None,
               "sync_ray_roundtrip_s": (stages["sync"] - r["sync/seconds"]) if "sync" in stages and "sync/seconds" in r else None,
               "sync_bytes": r.get("sync/bytes"), "rollout_critical_path_s": rollout_critical_path(run_dir, r["step"])}
        if prev_time is not None:  # logged-time gap beyond the step: logging, checkpoint, eval, loop
            row["between_steps_s"] = r["time"] - prev_time - step_s
        prev_time = r["time"]
        steps.append(row)
    steady = [s for s in steps if s["step"] > 1] or steps
    names = sorted({k for s in steady for k in s["stages"]}, key=lambda k: -sum(s["stages"].get(k, 0) for s in steady))
    mean_step = sum(s["step_s"] for s in steady) / len(steady)
    mean = {k: sum(s["stages"].get(k, 0.0) for s in steady) / len(steady) for k in names}
    mean_overhead = sum(s["overhead_s"] for s in steady) / len(steady)
    gaps = [s["between_steps_s"] for s in steady if s["between_steps_s"] is not None]
    rt = [s["sync_ray_roundtrip_s"] for s in steady if s["sync_ray_roundtrip_s"] is not None]
    cps = [(s["stages"]["rollout"], s["rollout_critical_path_s"]) for s in steady
           if s["rollout_critical_path_s"] and "rollout" in s["stages"]]
    return {"steps": steps, "steady_steps": [s["step"] for s in steady], "mean_step_s": mean_step,
            "mean_stage_s": mean, "share": {k: v / mean_step for k, v in mean.items()},
            "mean_overhead_s": mean_overhead, "overhead_share": mean_overhead / mean_step,
            "mean_between_steps_s": sum(gaps) / len(gaps) if gaps else None,
            "mean_sync_ray_roundtrip_s": sum(rt) / len(rt) if rt else None,
            # rollout stage (generation, tools, reward, session) over its longest planner chain
            "rollout_over_critical_path": sum(a for a, _ in cps) / sum(b for _, b in cps) if cps else None,
            "target_met": mean_overhead / mean_step <= OVERHEAD_TARGET}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-run", help="read this run directory's metrics.jsonl instead of training")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=4, help="RL steps (step 1 is reported apart)")
    ap.add_argument("--run-dir", default=str(CACHE / "step-breakdown"), help="emptied first")
    ap.add_argument("--json", help="default: benchmarks/results/step_breakdown.json")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, key.sub=value")
    args = ap.parse_args()
    bench_env()
    run = {}
    if args.from_run:
        run_dir = Path(args.from_run)
        run["source"] = f"--from-run {run_dir}"
    else:
        run_dir = Path(args.run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "megatron_matpo.cli", "train", "--config", args.config, f"run_dir={run_dir}",
               f"steps={args.steps}", *args.overrides]
        print(" ".join(cmd), flush=True)
        start_epoch, t0 = time.time(), time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
            raise SystemExit(f"matpo train failed ({proc.returncode}):\n{tail}")
        records = read_metrics(run_dir)
        first, last = records[0], records[-1]
        run.update(source=" ".join([f"matpo train --config {Path(args.config).name} steps={args.steps}", *args.overrides]),
                   command_wall_s=wall,
                   bring_up_s=first["time"] - first["time/step_s"] - start_epoch,
                   tear_down_s=start_epoch + wall - last["time"])
    records = read_metrics(run_dir)
    b = breakdown(records, run_dir)
    print(f"{'step':>4} {'step s':>7} " + " ".join(f"{k:>14}" for k in b["mean_stage_s"]) + f" {'overhead':>9}")
    for s in b["steps"]:
        print(f"{s['step']:>4} {s['step_s']:>7.2f} " + " ".join(f"{s['stages'].get(k, 0.0):>14.2f}" for k in b["mean_stage_s"])
              + f" {s['overhead_s']:>9.3f}")
    print(f"steady state (steps {b['steady_steps']}): step {b['mean_step_s']:.2f}s = "
          + ", ".join(f"{k} {v:.1%}" for k, v in b["share"].items())
          + f", overhead {b['overhead_share']:.2%} (target <= {OVERHEAD_TARGET:.0%})")
    if b["mean_between_steps_s"] is not None:
        print(f"between steps (logging etc.): {b['mean_between_steps_s']:.3f}s; "
              f"sync Ray round trip: {b['mean_sync_ray_roundtrip_s'] or float('nan'):.3f}s")
    if b["rollout_over_critical_path"]:
        print(f"rollout stage / its critical path: {b['rollout_over_critical_path']:.3f}")
    if "command_wall_s" in run:
        print(f"matpo train: {run['command_wall_s']:.0f}s total, bring-up {run['bring_up_s']:.0f}s, "
              f"tear-down {run['tear_down_s']:.0f}s")
    write_result("step_breakdown", {"meta": meta(), "targets": {"overhead_share": OVERHEAD_TARGET},
                                    "run": run, "breakdown": b}, args.json)


if __name__ == "__main__":
    main()
