"""MATPO vs the single agent, in miniature: both trained by RL from their own fine-tuned model on the same
questions and budget, with noisy tools and one context limit per agent, evaluated greedy on the held-out
questions before, during and after RL, over several seeds. Does the paper's direction show (MATPO above
the single agent, and more stable)?

    .venv/bin/python benchmarks/matpo_vs_single.py [--seeds 0,1,2] [--steps 4] [--eval-every 2]

Both arms are `matpo train` on the embedded default (configs/tiny_sft_cpu.yaml: the multi-hop set, RL on
its rl split, eval on its 32 held-out questions at temperature 0) with the same overrides:
- tools: every search's results shuffled, and 2 distractor results added, each with probability 0.5
  (`rollout.toolbox.noise`, seeded per run);
- context: every agent has the default's 1,024 tokens. A MATPO worker's conversation (one hop: a search,
  a page, its report) fits; a single agent searches and reads every hop in one context, which 2-3 hops
  of results and pages overflow (the paper's reason for isolated worker contexts);
- budget: the default's prompts, samples, lr and steps per run (`--steps`).
The MATPO arm starts from the default's fine-tune; the single agent's (same base model, the scripted
oracle's single-agent demonstrations of the same training questions, written with 2,048 tokens of context
so that 3-hop demonstrations fit, for about as many optimizer steps as MATPO's) is built on the first run
under runs/bench/matpo_vs_single/. The single
agent gets 8 turns (a search and a page per hop, then the answer), the planner the default's 4.

Writes benchmarks/results/matpo_vs_single.json (every run's eval curve and the per-arm summary) and
benchmarks/results/matpo_vs_single.png (both arms' curves, every seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, ROOT, bench_env, meta, write_result  # noqa: E402

CONFIG = "configs/tiny_sft_cpu.yaml"
DATA = "runs/tiny_sft_cpu/inputs/multihop"  # the default's (bootstrap writes it on the first run)
NOISE = ["rollout.toolbox.noise.shuffle_prob=0.5", "rollout.toolbox.noise.distractor_prob=0.5",
         "rollout.toolbox.noise.num_distractors=2"]
ARMS = ("matpo", "single")
# the default fine-tunes MATPO for 5 epochs of 896 rows (a planner's and each worker's conversation per
# question): 560 steps of 8 rows. The single agent has one row per question (256): 17 epochs give it about
# as many optimizer steps (544). At 5 epochs (160 steps) it still garbled its tool calls: 0/32 held out
SINGLE_SFT_EPOCHS = 17


def arm_overrides(arm: str, root: Path) -> list[str]:
    if arm == "matpo":
        return []
    return ["rollout.workflow.mode=single", f"model={root}/single_sft/hf",
            f"data={DATA}/single_agent_rl_multihop", f"eval.data={DATA}/single_agent_val_multihop",
            "rollout.workflow.planner.max_turns=8",
            f"bootstrap.sft.data={DATA}/single_agent_train_multihop", f"bootstrap.sft.epochs={SINGLE_SFT_EPOCHS}",
            "bootstrap.sft.planner={max_turns: 8, max_context_tokens: 2048, max_tokens_per_turn: 96, "
            "summary_reserve_tokens: 0}"]


def eval_curve(records: list[dict]) -> dict[int, float]:
    """step -> held-out accuracy (step 0: before RL), from a run's metrics.jsonl records."""
    return {int(m["step"]): m["eval/multihop/accuracy"] for m in records if "eval/multihop/accuracy" in m}


def train(arm: str, seed: int, steps: int, every: int, root: Path) -> dict:
    run_dir = root / arm / f"seed{seed}"
    ov = [f"run_dir={run_dir}", f"seed={seed}", f"steps={steps}", f"eval.every={every}", "eval.at_start=true",
          f"rollout.toolbox.noise.seed={seed}", "checkpoint.export_hf=false", *NOISE, *arm_overrides(arm, root)]
    log = root / f"{arm}-seed{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "megatron_matpo.cli", "train", "--config", CONFIG, *ov],
                            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{arm} seed {seed}: matpo train exited {rc}; see {log}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"arm": arm, "seed": seed, "curve": {str(k): v for k, v in sorted(eval_curve(records).items())},
            "train_accuracy": [m["reward/accuracy"] for m in records if "reward/accuracy" in m],
            "wall_s": time.perf_counter() - t0}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        before = [r["curve"][min(r["curve"], key=int)] for r in rs]
        after = [r["curve"][max(r["curve"], key=int)] for r in rs]
        out[arm] = {"before": before, "after": after, "before_mean": statistics.mean(before),
                    "after_mean": statistics.mean(after),
                    "rise_mean": statistics.mean(a - b for a, b in zip(after, before)),
                    "after_spread": max(after) - min(after)}
    m, s = out["matpo"], out["single"]
    out["matpo_above_single"] = m["after_mean"] > s["after_mean"]
    out["matpo_more_stable"] = m["after_spread"] <= s["after_spread"]
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange")):
        for k, r in enumerate(x for x in runs if x["arm"] == arm):
            steps = sorted(map(int, r["curve"]))
            ax.plot(steps, [r["curve"][str(s)] for s in steps], marker="o", color=color, alpha=0.7,
                    label=f"{'MATPO' if arm == 'matpo' else 'single agent'}" if k == 0 else None)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title("MATPO vs single agent (noisy tools, 1,024-token contexts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--root", default=str(CACHE / "matpo_vs_single"))
    ap.add_argument("--json", default=str(RESULTS / "matpo_vs_single.json"))
    args = ap.parse_args()
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        ap.error(f"--steps ({args.steps}) must be a positive multiple of --eval-every ({args.eval_every})")
    seeds = [int(s) for s in args.seeds.split(",")]
    bench_env()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:  # arms interleaved per seed: both see the same machine state
        for arm in ARMS:
            r = train(arm, seed, args.steps, args.eval_every, root)
            print(f"{arm:6s} seed {seed}: held-out accuracy by step {r['curve']} ({r['wall_s']:.0f} s)", flush=True)
            runs.append(r)
    summary = summarize(runs)
    for arm in ARMS:
        s = summary[arm]
        print(f"{arm:6s}: before {s['before_mean']:.3f}, after {s['after_mean']:.3f} (rise {s['rise_mean']:+.3f}; "
              f"after spread over seeds {s['after_spread']:.3f})")
    print(f"MATPO above single agent after RL: {summary['matpo_above_single']}; more stable (smaller spread): "
          f"{summary['matpo_more_stable']}")
    png = Path(args.json).with_suffix(".png")
    plot(runs, png)
    write_result("matpo_vs_single", {
        "meta": meta(wall_s=time.perf_counter() - t0, source="benchmarks/matpo_vs_single.py"),
        "setup": {"config": CONFIG, "steps": args.steps, "eval_every": args.eval_every, "seeds": seeds,
                  "noise": NOISE, "context_tokens": 1024, "single_overrides": arm_overrides("single", root)},
        "runs": runs, "summary": summary, "png": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)},
        args.json)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
