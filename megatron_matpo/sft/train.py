"""`matpo sft`: supervised fine-tuning of the Megatron actor on demonstrations.

The same actor as RL (`train.worker.ActorWorker`: any TP × PP × DP, megatron DDP and optimizer, the
LR schedule), the same packing (THD micro-batches, rows balanced over DP ranks), the same checkpoints
and HF export. The loss is the token mean of −log p over the assistant tokens of every row of a step
(the rows' loss masks: exactly what the agents wrote, never the prompts, tool results or template),
taken over the whole step's tokens across DP ranks and micro-batches.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_matpo.sft.config import SftConfig

SFT_DONE = "sft.json"  # written last in run_dir: the run's summary


class NoDemonstrations(RuntimeError):
    pass


def demo_rows(demos: list[dict]):
    from megatron_matpo.train.packing import Row

    return [Row(token_ids=d["token_ids"], loss_mask=d["loss_mask"], old_logprobs=[0.0] * len(d["token_ids"]),
                advantage=0.0, row_id=i, role=d.get("role")) for i, d in enumerate(demos)]


def step_batches(n_rows: int, rows_per_step: int, epochs: int, seed: int) -> list[list[int]]:
    """Row indices of every optimizer step: each epoch a seeded shuffle cut into steps (the last one of an
    epoch may be smaller); the same on every rank."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n_rows))
        random.Random(seed * 1000 + epoch).shuffle(order)
        steps += [order[i:i + rows_per_step] for i in range(0, n_rows, rows_per_step)]
    return steps


def sft_loss(global_tokens: int):
    """The megatron loss function of one micro-batch: its share of the step's token-mean NLL."""
    from megatron_matpo.train.actor import token_logprobs

    def loss_fn(out, p):
        lp = token_logprobs(out, p.labels)
        mask = p.loss_mask.to(lp.device)
        nll = -(lp * mask).sum()
        return nll / global_tokens, {"nll_sum": nll.detach(), "tokens": mask.sum()}

    return loss_fn


def sft_on_ranks(cfg_dict: dict, demos_path: str) -> dict:
    """Every rank of a launched world (`dist.launch_local`): fine-tune, checkpoint, export; rank 0's
    summary is returned."""
    from megatron.core import parallel_state as ps
    from tqdm.auto import tqdm

    from megatron_matpo import config
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.sft.demos import read_demonstrations
    from megatron_matpo.train.actor import optimizer_step
    from megatron_matpo.train.config import resolve_dtype
    from megatron_matpo.train.logger import RunLogger
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.train.worker import ActorWorker, WorkerSpec

    cfg = config.build(SftConfig, cfg_dict)
    a = cfg.actor
    rows = demo_rows(read_demonstrations(demos_path))
    batches = step_batches(len(rows), cfg.rows_per_step, cfg.epochs, cfg.seed)
    spec = WorkerSpec(model=cfg.model, layout=a.layout, dtype=resolve_dtype(a.dtype), recompute=a.recompute,
                      optim=cfg.optim, max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, seed=cfg.seed,
                      total_steps=len(batches))
    worker = ActorWorker(spec)
    init_megatron(a.layout, seed=cfg.seed)
    worker.build()
    rank0 = torch.distributed.get_rank() == 0
    log = RunLogger(cfg.run_dir) if rank0 else None
    bar = tqdm(total=len(batches), desc="sft", unit="step", disable=not rank0)
    history, t0 = [], time.time()
    for step, idx in enumerate(batches, 1):
        batch = [rows[i] for i in idx]
        tokens = sum(sum(r.loss_mask[1:]) for r in batch)  # what packing trains: a row's first token is never predicted
        packed = pack_rows(batch, a.max_tokens_per_micro_batch, a.dp, pad_to_multiple=a.tp)
        mine = packed[ps.get_data_parallel_rank()]
        lr = worker._lrs()["lr"]  # this step's
        reported, stats = optimizer_step(worker.built.chunks, worker.optimizer, mine, sft_loss(tokens), worker.device)
        worker.scheduler.step(1)
        # each DP replica's reporting rank (last stage, TP rank 0) adds its micro-batch sums; the others add 0
        sums = torch.tensor([sum(float(r["nll_sum"]) for r in reported), sum(float(r["tokens"]) for r in reported)]
                            if worker.reports else [0.0, 0.0], dtype=torch.float64, device=worker.device)
        torch.distributed.all_reduce(sums)
        m = {"sft/loss": float(sums[0] / max(sums[1], 1.0)), "sft/tokens": float(sums[1]),
             "sft/rows": float(len(batch)), "sft/grad_norm": stats["grad_norm"], "sft/lr": lr}
        if not math.isfinite(m["sft/loss"]):
            raise FloatingPointError(f"sft step {step}: loss {m['sft/loss']} (lower optim.lr)")
        history.append(m)
        if log is not None:
            log.log(step, m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
    bar.close()
    ckpt = worker.save(cfg.run_dir, len(batches), {"sft": True, "rows": len(rows)}, keep_last=1)
    hf = worker.export_hf(str(Path(cfg.run_dir) / "hf")) if cfg.export_hf else None
    if log is not None:
        log.close()
    worker.shutdown()
    return {"steps": len(batches), "rows": len(rows), "first_loss": history[0]["sft/loss"],
            "last_loss": history[-1]["sft/loss"], "seconds": time.time() - t0, "checkpoint": ckpt, "hf": hf}


def run_sft(cfg: SftConfig, log=print) -> dict:
    """The whole job: inputs (bootstrap), demonstrations, then the launched Megatron world."""
    import json

    import yaml

    from megatron_matpo import config
    from megatron_matpo.dist import launch_local
    from megatron_matpo.model.builder import check_layout
    from megatron_matpo.sft.demos import write_demonstrations
    from megatron_matpo.train.bootstrap import ensure_inputs

    cfg.validate()
    ensure_inputs(cfg, log)  # SftConfig has the fields bootstrap reads (model, data, corpus, seed, bootstrap)
    paths = {"data": cfg.data, "corpus": cfg.corpus, **{f"exclude[{i}]": p for i, p in enumerate(cfg.exclude)}}
    for key, path in paths.items():
        if not Path(path).exists():
            raise config.ConfigError(f"{key}: {path} does not exist")
    check_layout(cfg.model, cfg.actor.layout)
    run = Path(cfg.run_dir)
    if (run / "checkpoints").exists() or (run / SFT_DONE).exists():
        raise config.ConfigError(f"run_dir: {run} already holds an SFT run; give a new run_dir")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.redacted(config.to_dict(cfg)), sort_keys=False))
    demos = run / "demos.jsonl"
    stats = write_demonstrations(cfg, demos)
    log(f"matpo sft: {stats.line()} -> {demos}")
    if not stats.kept:
        raise NoDemonstrations(f"no demonstration was kept ({stats.line()})")
    summary = launch_local(sft_on_ranks, cfg.actor.layout.world_size, asdict(cfg), str(demos))
    summary["demos"] = {"kept": stats.kept, "questions": stats.questions, "rows": dict(stats.rows),
                        "excluded": stats.excluded, "dropped": dict(stats.dropped)}
    (run / SFT_DONE).write_text(json.dumps(summary, indent=2))
    return summary
