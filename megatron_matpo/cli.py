"""`matpo` command line: `train` (the RL loop; the embedded default is configs/tiny_sft_cpu.yaml), `sft`,
`train-verifier`, `demo`,
`convert`, `rollout`, `eval`, `transcript`, `make-tiny`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_WORK_DIR = Path(os.environ.get("MATPO_WORK_DIR", "runs"))


def _quiet_libraries() -> None:
    from megatron_matpo.compat import prepare_process

    prepare_process()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _layout(args):
    from megatron_matpo.model.layout import ParallelLayout

    return ParallelLayout(tp=args.tp, pp=args.pp)


def cmd_make_tiny(args) -> int:
    from megatron_matpo.model.tiny import make_tiny_model

    path = make_tiny_model(args.out, args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0


def cmd_convert(args) -> int:
    from megatron_matpo import convert

    t0 = time.time()
    if args.direction == "hf-to-megatron":
        out = convert.hf_to_megatron(args.src, args.out, _layout(args))
    else:
        out = convert.megatron_to_hf(args.src, args.out, _layout(args))
    print(f"{args.direction}: {args.src} -> {out} (tp={args.tp}, pp={args.pp}) in {time.time() - t0:.1f}s")
    return 0


def cmd_demo(args) -> int:
    """Embedded default until the RL loop lands: tiny Qwen3 → Megatron TP2×PP2 → HF, verified."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_matpo import convert
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.model.tiny import make_tiny_model

    work = Path(args.work_dir) / "demo"
    layout = ParallelLayout(tp=2, pp=2)
    steps = ["build tiny Qwen3", f"HF -> Megatron (tp={layout.tp}, pp={layout.pp})",
             "Megatron -> HF", "verify tensors and logits"]
    say = lambda i: print(f"[{i + 1}/{len(steps)}] {steps[i]}", flush=True)  # noqa: E731
    say(0)
    hf = make_tiny_model(work / "tiny-qwen3", "qwen3")
    say(1)
    convert.hf_to_megatron(hf, work / "megatron", layout)
    say(2)
    back = convert.megatron_to_hf(work / "megatron", work / "hf-export", layout)
    say(3)
    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    exact = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l1 = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
        l2 = AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits
    diff = (l1 - l2).abs().max().item()
    print(f"round trip: {len(a)} tensors bit-exact={exact}; max logit diff={diff:.3g}; exported to {back}")
    return 0 if exact and diff == 0.0 else 1


def cmd_train(args) -> int:
    from megatron_matpo import config
    from megatron_matpo.train.config import TrainConfig
    from megatron_matpo.trainer import Trainer

    from megatron_matpo.train.summary import eval_line, startup_summary

    overrides = list(args.overrides)
    cfg = config.load(TrainConfig, args.config, overrides)
    cfg.bootstrap = cfg.bootstrap.for_command_line({o.split("=", 1)[0] for o in overrides})
    t0 = time.time()
    from megatron_matpo.train.preemption import Preempted

    trainer = Trainer(cfg, resume=args.resume)  # every check (config, inputs, layout vs model) before any process
    print(startup_summary(cfg), flush=True)
    try:
        with trainer:
            history = trainer.fit()
    except Preempted as e:
        print(f"matpo train: preempted: {e}", file=sys.stderr, flush=True)
        return Preempted.exit_code
    last = history[-1] if history else {}
    evals = eval_line(trainer.eval_at_start, last)
    if evals:
        print(f"matpo train: {evals}", flush=True)
    print(f"trained {len(history)} steps in {time.time() - t0:.0f}s -> {cfg.run_dir}; last step: reward "
          f"{last.get('reward/mean', float('nan')):.3f}, accuracy {last.get('reward/accuracy', float('nan')):.3f}, "
          f"train/rollout logprob diff {last.get('train_rollout_logprob_abs_diff', float('nan')):.2e}")
    return 0


def cmd_sft(args) -> int:
    from megatron_matpo import config
    from megatron_matpo.sft.config import SftConfig
    from megatron_matpo.sft.train import NoDemonstrations, run_sft

    overrides = list(args.overrides)
    cfg = config.load(SftConfig, args.config, overrides)
    cfg.bootstrap = cfg.bootstrap.for_command_line({o.split("=", 1)[0] for o in overrides})
    try:
        out = run_sft(cfg)
    except NoDemonstrations as e:
        print(f"matpo sft: error: {e}", file=sys.stderr)
        return 1
    print(f"matpo sft: {out['steps']} steps on {out['rows']} demonstration rows in {out['seconds']:.0f}s: loss "
          f"{out['first_loss']:.3f} -> {out['last_loss']:.3f}; checkpoint {out['checkpoint']}"
          + (f"; HF model {out['hf']}" if out["hf"] else ""), flush=True)
    return 0


def cmd_train_verifier(args) -> int:
    from megatron_matpo import config
    from megatron_matpo.verifier.answers import VerifierDataError
    from megatron_matpo.verifier.config import VerifierTrainConfig
    from megatron_matpo.verifier.train import run_train_verifier

    overrides = list(args.overrides)
    cfg = config.load(VerifierTrainConfig, args.config, overrides)
    cfg.bootstrap = cfg.bootstrap.for_command_line({o.split("=", 1)[0] for o in overrides})
    try:
        out = run_train_verifier(cfg)
    except VerifierDataError as e:
        print(f"matpo train-verifier: error: {e}", file=sys.stderr)
        return 2
    b, a = out["before"], out["after"]
    print(f"matpo train-verifier: {out['steps']} steps on {out['train_answers']} answers in {out['seconds']:.0f}s; "
          f"held out ({out['heldout_answers']} answers): AUC {b['verifier/heldout_auc']:.3f} -> "
          f"{a['verifier/heldout_auc']:.3f}, accuracy {b['verifier/heldout_accuracy']:.3f} -> "
          f"{a['verifier/heldout_accuracy']:.3f}; checkpoint {out['checkpoint']}"
          + (f"; HF model {out['hf']}" if out["hf"] else ""), flush=True)
    return 0


def cmd_bench_layouts(args) -> int:
    from megatron_matpo.planner.command import run

    try:
        return run(args)
    except ValueError as e:  # unknown cluster fields, --gpus too large, nothing to measure
        print(f"matpo bench-layouts: error: {e}", file=sys.stderr)
        return 2


def cmd_rollout(args) -> int:
    import asyncio

    from megatron_matpo import config
    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.rollout.runner import RolloutConfig, RolloutSession

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    cfg = config.load(RolloutConfig, args.config, overrides)
    if not cfg.model or not cfg.data:
        raise config.ConfigError("rollout needs `model` and `data` (in the config or as model=... data=...)")
    samples = list(read_dataset(cfg.data, limit=cfg.max_prompts))
    with RolloutSession(cfg) as session:
        results = asyncio.run(session.run(samples, args.out))
    accs = [r[0].reward_components.get("accuracy", 0.0) for r in results]
    workers = [len(r) - 1 for r in results]
    print(f"{len(results)} rollouts of {len(samples)} prompts -> {args.out}: accuracy {sum(accs) / len(accs):.3f}, "
          f"workers/rollout {sum(workers) / len(workers):.2f}; tools {session.tool_metrics}")
    return 0


def cmd_eval(args) -> int:
    import json

    from megatron_matpo.rollout.evaluate import evaluate_traces

    report = evaluate_traces(args.traces)
    for src, m in report.items():
        print(f"{src}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_transcript(args) -> int:
    from megatron_matpo.agents import transcript

    argv = [args.traces] + (["--html", args.html] if args.html else ["--terminal"])
    return transcript.main(argv) or 0


def cmd_ray_wait(args) -> int:
    from megatron_matpo.orchestrate.cluster import wait_for_cluster

    try:
        have = wait_for_cluster(args.address, args.nodes, args.gpus, args.timeout)
    except TimeoutError as e:
        print(f"matpo ray-wait: error: {e}", file=sys.stderr)
        return 4
    print(f"Ray cluster at {args.address}: {have['nodes']} nodes, {have['gpus']} GPUs, {have['cpus']} CPUs", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matpo", description="Multi-agent tool-integrated RL on Megatron-core")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="MATPO / single-agent RL: rollouts, PPO on Megatron, weight sync")
    tr.add_argument("--config", default="configs/tiny_sft_cpu.yaml", help="YAML TrainConfig")
    tr.add_argument("--resume", action="store_true", help="continue from the run_dir's latest checkpoint")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=10 actor.tp=1 actor.pp=2")
    tr.set_defaults(fn=cmd_train)

    f = sub.add_parser("sft", help="supervised fine-tuning on scripted-oracle demonstrations of the multi-hop task")
    f.add_argument("--config", default="configs/sft_tiny_cpu.yaml", help="YAML SftConfig")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=3 actor.tp=2 mode=single")
    f.set_defaults(fn=cmd_sft)

    rv = sub.add_parser("train-verifier", help="MAPoRL verifier: a score-head model trained on the agents' answers, "
                                               "labelled by the gold answer (HF sequence-classification export)")
    rv.add_argument("--config", default="configs/verifier_tiny_cpu.yaml", help="YAML VerifierTrainConfig")
    rv.add_argument("overrides", nargs="*", help="dotted overrides, e.g. transcripts=[runs/x/rollouts] epochs=5")
    rv.set_defaults(fn=cmd_train_verifier)

    d = sub.add_parser("demo", help="embedded default: tiny Qwen3 HF -> Megatron TP2xPP2 -> HF, verified")
    d.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="HF <-> Megatron distributed checkpoint, any TP x PP")
    c.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    c.add_argument("src", help="HF model dir (hf-to-megatron) or megatron-matpo checkpoint dir")
    c.add_argument("out", help="output directory")
    c.add_argument("--tp", type=int, default=1, help="tensor parallel size of the converting world")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the converting world")
    c.set_defaults(fn=cmd_convert)

    r = sub.add_parser("rollout", help="run agent rollouts on SGLang engines with MCP tools; write traces")
    r.add_argument("--config", help="YAML RolloutConfig (e.g. configs/rollout_tiny_cpu.yaml)")
    r.add_argument("--data", help="MATPO-data parquet file or directory (overrides the config)")
    r.add_argument("--out", default="traces.jsonl")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. n_samples=4 workflow.mode=single")
    r.set_defaults(fn=cmd_rollout)

    e = sub.add_parser("eval", help="accuracy and avg@k per data source from rollout traces")
    e.add_argument("traces")
    e.add_argument("--json", help="also write the report here")
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("transcript", help="readable view of rollout traces (HTML file or terminal)")
    v.add_argument("traces")
    v.add_argument("--html", help="write a static HTML page here (default: print to the terminal)")
    v.set_defaults(fn=cmd_transcript)

    from megatron_matpo.planner.command import add_arguments as add_bench_layouts_arguments

    b = sub.add_parser("bench-layouts", help="rank TP x PP x CP x DP layouts by predicted memory and step time "
                                            "(--measure: also run a few for real here)")
    add_bench_layouts_arguments(b)
    b.set_defaults(fn=cmd_bench_layouts)

    w = sub.add_parser("ray-wait", help="wait until a Ray cluster has N nodes and G GPUs (exit 4 on timeout)")
    w.add_argument("--address", required=True, help="head GCS address, host:port")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--gpus", type=int, default=0, help="GPUs in total")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds")
    w.set_defaults(fn=cmd_ray_wait)

    t = sub.add_parser("make-tiny", help="write a tiny random-init HF model with a small tokenizer")
    t.add_argument("out")
    t.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_make_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # before the slow imports: SIGUSR1's default action would kill us
        from megatron_matpo.train import preemption

        preemption.install()
    _quiet_libraries()
    from megatron_matpo.config import ConfigError
    from megatron_matpo.data.schema import DatasetError
    from megatron_matpo.model.builder import UnsupportedArchitecture
    from megatron_matpo.model.layout import LayoutError

    try:
        return args.fn(args)
    except (LayoutError, UnsupportedArchitecture, FileNotFoundError, ConfigError, DatasetError) as e:
        print(f"matpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
