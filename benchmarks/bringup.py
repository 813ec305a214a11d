"""Bring-up of `matpo train` on configs/tiny_cpu.yaml (the embedded default's pipeline on a random-init
model): process start → first rollout request, and each part the trainer times (`bringup/<part>_s` in
step 1 of metrics.jsonl): inputs (bootstrap), Ray, placement group, engines + tool server, actor ranks (Ray actors, megatron
world, model, optimizer, reference), the driver's tokenizer, engine connection (broadcast group),
rollout session, the first weight sync (`first_sync`), and on a resume the checkpoint load. With a fixed KV
pool (`rollout.engine.max_total_tokens`, as in the CPU configs) engines, tool server and ranks start at once;
without, engines + tool server come up first, then every stack's ranks together (`ranks`); the tokenizer
loads in the background.

Runs `matpo train steps=1` `--reps` times in fresh run directories (inputs are generated once, before
the first rep, and not timed) and reports each part's median.

    .venv/bin/python benchmarks/bringup.py [--reps 3] [--against key=value ...] [key=value ...]

`--against` also runs the same reps with those overrides added, interleaved with the main ones (so
both see the same machine load), and prints each part's ratio, e.g. `--against
rollout.engine.fork_children=false` for SGLang's own spawned children, or `--against
rollout.engine.max_total_tokens=null rollout.engine.mem_fraction_static=0.05` for engines first.
`--against-rev REV` runs the other side from a git worktree of commit REV instead (same venv, its
package first on PYTHONPATH, which the Ray workers and engines inherit): a code change against its
parent, in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, bench_env, meta, write_result  # noqa: E402

TARGET_S = 30.0


def one(run_dir: Path, inputs: list[str], overrides: list[str], tree: Path = ROOT) -> dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "megatron_matpo.cli", "train", f"run_dir={run_dir}", "steps=1",
           "checkpoint.export_hf=false", *inputs, *overrides]
    env = dict(os.environ)
    if tree != ROOT:  # another checkout's package ahead of the editable install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    with open(run_dir / "stdout.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"matpo train failed ({proc.returncode}):\n{(run_dir / 'stdout.txt').read_text()[-3000:]}")
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {k[len("bringup/"):-len("_s")]: v for k, v in first.items() if k.startswith("bringup/")}


def rev_name(rev: str) -> str:
    """`rev` as a short commit id."""
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def worktree(rev: str, root: Path) -> Path:
    """A detached checkout of `rev` (kept between runs, refreshed when `rev` moves)."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = root / f"rev-{sha[:12]}"
    if not (tree / "megatron_matpo").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="default: benchmarks/results/bringup.json")
    ap.add_argument("--against", nargs="+", default=[], metavar="KEY=VALUE",
                    help="also run with these overrides, interleaved, and report the ratio")
    ap.add_argument("--against-rev", metavar="REV", help="also run the code of git commit REV, interleaved")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, key.sub=value")
    args = ap.parse_args()
    if args.against and args.against_rev:
        ap.error("--against and --against-rev: one or the other")
    bench_env()
    from megatron_matpo import config
    from megatron_matpo.train.bootstrap import ensure_inputs
    from megatron_matpo.train.config import TrainConfig

    root = CACHE / "bringup"
    inputs = [f"model={root}/inputs/tiny-qwen3", f"data={root}/inputs/multihop/matpo_train_multihop",
              f"corpus={root}/inputs/multihop/corpus.jsonl"]
    ensure_inputs(config.load(TrainConfig, ROOT / "configs/tiny_cpu.yaml", inputs + [f"run_dir={root}/run"]))
    sides = {"main": (args.overrides, ROOT)}
    if args.against:
        sides["against"] = (args.overrides + args.against, ROOT)
    if args.against_rev:
        sides["against"] = (args.overrides, worktree(args.against_rev, root))
    reps: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.reps):
        for side, (overrides, tree) in sides.items():
            parts = one(root / "run", inputs, overrides, tree)
            print(f"rep {i + 1} ({side}): " + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items()), flush=True)
            reps[side].append(parts)
    median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in reps.items()}
    for side, m in median.items():
        print(f"median ({side}): " + ", ".join(f"{k} {v:.1f}s" for k, v in m.items()))
    total = median["main"]["total"]
    print(f"process start -> first rollout request: {total:.1f}s (target <= {TARGET_S:.0f}s: "
          f"{'met' if total <= TARGET_S else 'missed'})")
    result = {"meta": meta(source=" ".join(["matpo train steps=1", *args.overrides])), "targets": {"total_s": TARGET_S},
              "reps": reps["main"], "median": median["main"], "target_met": total <= TARGET_S}
    if "against" in sides:
        what = " ".join(args.against) if args.against else f"the code of {rev_name(args.against_rev)}"
        ratio = {k: median["against"][k] / v for k, v in median["main"].items() if v > 0}
        print(f"against {what} / main: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
        result["against"] = {"overrides": args.against, "reps": reps["against"], "median": median["against"],
                             "ratio": ratio, **({"rev": rev_name(args.against_rev)} if args.against_rev else {})}
    write_result("bringup", result, args.json)


if __name__ == "__main__":
    main()
