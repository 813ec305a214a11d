"""The few lines `matpo train` prints before bring-up (what will run, on what, and where it goes) and
the eval line it closes with. The full resolved config (secrets redacted) is in run_dir/config.yaml."""
from __future__ import annotations

from pathlib import Path

from megatron_matpo.train.config import TrainConfig
from megatron_matpo.train.preflight import read_hf_config


def _model(path: str) -> str:
    hf = read_hf_config("model", path)
    arch = (hf.architectures or ["?"])[0]
    return (f"{path} ({arch}, {hf.num_hidden_layers} layers, hidden {getattr(hf, 'hidden_size', '?')}, "
            f"vocab {getattr(hf, 'vocab_size', '?')})")


def startup_summary(cfg: TrainConfig) -> str:
    a, ro, eng = cfg.actor, cfg.rollout, cfg.rollout.engine
    if cfg.algorithm == "maporl":
        d = cfg.maporl.discussion
        models = "one model per agent" if cfg.maporl.models == "distinct" else "one shared model"
        algo = f"MAPoRL: {d.n_agents} agents x {d.rounds} rounds, {models}, advantage {cfg.advantage.estimator}"
        tools = "none"
    else:
        algo = "MATPO (planner + workers)" if ro.workflow.mode == "matpo" else "single agent"
        tb = ro.toolbox
        tools = tb.url or (f"local search over {cfg.corpus or tb.corpus}" if tb.backend == "local" else "web search")
    every = cfg.sync.parity_every
    parity = f"engine parity every {every} step(s)" if every else "no engine parity check"
    stacks = cfg.maporl.stacks if cfg.algorithm == "maporl" else 1
    models = cfg.maporl.agent_models if cfg.algorithm == "maporl" and cfg.maporl.agent_models else [cfg.model]
    lines = [
        f"algorithm  {algo}; {cfg.steps} steps x {cfg.prompts_per_step} prompts x {ro.n_samples} samples",
        *(f"model      {_model(m)}" for m in models),
        f"data       {cfg.data}" + (f" (eval: {cfg.eval.data}" + (" before step 1," if cfg.eval.at_start else "")
                                   + f" every {cfg.eval.every} steps" + _eval_sampling(cfg.eval.temperature) + ")"
                                   if cfg.eval.every else ""),
        f"actor      TP {a.tp}{' (SP)' if a.sequence_parallel else ''} x PP {a.pp}{f' x CP {a.cp}' if a.cp > 1 else ''} x DP {a.dp}, {cfg.resolved_dtype()}, lr {cfg.optim.lr:g}"
        + (f" (output layer {cfg.optim.output_layer_lr:g})" if cfg.optim.output_layer_lr is not None else "")
        + (f"; {stacks} policies" if stacks > 1 else ""),
        f"engines    {eng.num_engines} SGLang engine(s) per policy, TP {eng.tp_size}; tools: {tools}",
        f"sync       {cfg.sync.mode}, {cfg.sync.bucket_mb:g} MiB buckets, {parity}",
        f"run dir    {cfg.run_dir} (full config: {Path(cfg.run_dir) / 'config.yaml'})",
    ]
    return "\n".join(f"matpo train: {line}" for line in lines)


def _eval_sampling(temperature: float | None) -> str:
    return "" if temperature is None else ", greedy" if temperature == 0 else f", temperature {temperature:g}"


def eval_line(before: dict[str, float], after: dict[str, float], rise: bool = True) -> str | None:
    """"eval accuracy <source> <before> -> <after> (<rise>; N questions x k)" for each eval source scored
    at the start and at the last step; `rise=False`: "eval accuracy <source> <before> (N questions x k)".
    None: no source has both."""
    parts = []
    for key, b in sorted(before.items()):
        if key.endswith("/accuracy") and key in after:
            src = key[:-len("/accuracy")]
            n = before.get(f"{src}/questions", 0.0)
            k = before.get(f"{src}/rollouts", 0.0) / max(n, 1.0)
            name, size = src.removeprefix("eval/"), f"{n:g} questions x {k:g}"
            parts.append(f"{name} {b:.3f} -> {after[key]:.3f} ({after[key] - b:+.3f}; {size})" if rise
                         else f"{name} {b:.3f} ({size})")
    return "eval accuracy " + "; ".join(parts) if parts else None
