"""`matpo train-verifier`: a MAPoRL verifier (reward model) trained on the agents' own answers.

Answers (verifier/answers.py) → token ids as the served verifier renders them (the model's chat
template over the question and the answer: `maporl.verifier.verifier_input_ids`) → a Megatron model
(any TP × PP × DP, packed THD micro-batches, megatron DDP and optimizer: `train.worker.ActorWorker` with
the bias-free score head) trained with binary cross-entropy on the score at each answer's last token
(the label: right 1, wrong 0), mean over the step's answers across DP ranks. The held-out questions'
answers are scored after every epoch (or `eval_every` steps): BCE, accuracy (score > 0, i.e.
probability > 0.5) and ROC AUC, to tensorboard and metrics.jsonl. The end: a checkpoint, the HF
sequence-classification export (verifier/export.py) and the held-out answers' Megatron scores
(`heldout_scores.jsonl`: what a served copy must reproduce).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_matpo.train.worker import ActorWorker
from megatron_matpo.verifier.config import VerifierTrainConfig

VERIFIER_DONE = "verifier.json"  # written last in run_dir: the run's summary
HELDOUT_SCORES = "heldout_scores.jsonl"


class VerifierWorker(ActorWorker):
    head = "score"  # the bias-free scalar head of an HF sequence-classification model


def answer_rows(items: list[dict]):
    """Rows of tokenized answers (`{"input_ids", "label"}`); the label rides as the row's advantage."""
    from megatron_matpo.train.packing import Row

    return [Row(token_ids=d["input_ids"], loss_mask=[0] * len(d["input_ids"]), old_logprobs=[0.0] * len(d["input_ids"]),
                advantage=float(d["label"]), row_id=i) for i, d in enumerate(items)]


def last_scores(out: torch.Tensor, p) -> dict[int, torch.Tensor]:
    """Row id → the score at its last token (the model's output there: [1, s, 1])."""
    from megatron_matpo.train.packing import PAD_ROW_ID

    rows = p.row_ids[0].to(out.device)
    pos = torch.arange(rows.numel(), device=out.device)
    got = {}
    for rid in rows.unique().tolist():
        if rid != PAD_ROW_ID:
            got[rid] = out[0, int(pos[rows == rid].max()), 0].float()
    return got


def bce_loss(labels: dict[int, float], global_rows: int):
    """The megatron loss function of one micro-batch: its rows' share of the step's mean BCE."""

    def loss_fn(out, p):
        scores = last_scores(out, p)
        if not scores:  # a padding micro-batch
            zero = out.sum() * 0.0
            return zero, {"bce_sum": zero.detach(), "rows": torch.zeros((), device=out.device),
                          "correct": torch.zeros((), device=out.device)}
        s = torch.stack(list(scores.values()))
        y = torch.tensor([labels[r] for r in scores], device=s.device, dtype=s.dtype)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(s, y, reduction="sum")
        correct = ((s > 0).float() == y).float().sum()
        return bce / global_rows, {"bce_sum": bce.detach(), "rows": torch.tensor(float(len(scores)), device=s.device),
                                   "correct": correct.detach()}

    return loss_fn


def score_rows(worker, rows, max_tokens: int) -> list[float]:
    """Every row's last-token score (forward only, all DP ranks share the rows); the same list on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_matpo.model.forward import run_schedule
    from megatron_matpo.train.packing import pack_rows

    tp, dp = worker.spec.layout.tp, worker.spec.layout.dp
    mine = pack_rows(rows, max_tokens, dp, pad_to_multiple=tp)[ps.get_data_parallel_rank()]
    out = torch.zeros(len(rows), dtype=torch.float64, device=worker.device)

    def keep(o, p):
        for rid, s in last_scores(o, p).items():
            out[rid] = float(s)
        return torch.zeros((), device=o.device), {}

    for c in worker.built.chunks:
        c.eval()
    with torch.no_grad():
        run_schedule(worker.built.chunks, [p.micro_batch for p in mine], keep, forward_only=True,
                     device=worker.device, with_each=mine)
    if not worker.reports:
        out.zero_()  # only each DP slice's reporting rank (last stage, TP 0) contributes its rows
    torch.distributed.all_reduce(out)
    return out.tolist()


def heldout_metrics(scores: list[float], labels: list[int]) -> dict[str, float]:
    from megatron_matpo.verifier.answers import roc_auc

    s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)
    return {"verifier/heldout_bce": float(torch.nn.functional.binary_cross_entropy_with_logits(s, y)),
            "verifier/heldout_accuracy": float(((s > 0).double() == y).double().mean()),
            "verifier/heldout_auc": roc_auc(scores, labels),
            "verifier/heldout_score_right": float(s[y == 1].mean()),
            "verifier/heldout_score_wrong": float(s[y == 0].mean())}


def train_on_ranks(cfg_dict: dict, data_path: str) -> dict:
    """Every rank of a launched world (`dist.launch_local`): train, evaluate, checkpoint, export; rank 0's
    summary is returned."""
    from megatron.core import parallel_state as ps
    from tqdm.auto import tqdm

    from megatron_matpo import config
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.sft.train import step_batches
    from megatron_matpo.train.actor import optimizer_step
    from megatron_matpo.train.config import resolve_dtype
    from megatron_matpo.train.logger import RunLogger
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.train.worker import WorkerSpec
    from megatron_matpo.verifier.export import export_verifier_hf

    cfg = config.build(VerifierTrainConfig, cfg_dict)
    a = cfg.actor
    data = [json.loads(x) for x in Path(data_path).read_text().splitlines()]
    train_items = [d for d in data if d["split"] == "train"]
    held_items = [d for d in data if d["split"] == "heldout"]
    rows, held = answer_rows(train_items), answer_rows(held_items)
    labels = {r.row_id: float(r.advantage) for r in rows}
    batches = step_batches(len(rows), cfg.rows_per_step, cfg.epochs, cfg.seed)
    steps_per_epoch = math.ceil(len(rows) / cfg.rows_per_step)
    eval_every = cfg.eval_every or steps_per_epoch
    spec = WorkerSpec(model=cfg.model, layout=a.layout, dtype=resolve_dtype(a.dtype), recompute=a.recompute,
                      optim=cfg.optim, max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, seed=cfg.seed,
                      total_steps=len(batches))
    worker = VerifierWorker(spec)
    init_megatron(a.layout, seed=cfg.seed)
    worker.build()
    rank0 = torch.distributed.get_rank() == 0
    log = RunLogger(cfg.run_dir) if rank0 else None
    held_labels = [int(d["label"]) for d in held_items]

    def evaluate() -> dict[str, float]:
        return heldout_metrics(score_rows(worker, held, a.max_tokens_per_micro_batch), held_labels)

    first = evaluate()  # the zero head: every answer scores 0 (AUC 0.5)
    if log is not None:
        log.log(0, first)
    bar = tqdm(total=len(batches), desc="train-verifier", unit="step", disable=not rank0)
    history, t0, last_eval = [], time.time(), first
    for step, idx in enumerate(batches, 1):
        batch = [rows[i] for i in idx]
        packed = pack_rows(batch, a.max_tokens_per_micro_batch, a.dp, pad_to_multiple=a.tp)
        lr = worker._lrs()["lr"]  # this step's
        reported, stats = optimizer_step(worker.built.chunks, worker.optimizer, packed[ps.get_data_parallel_rank()],
                                         bce_loss(labels, len(batch)), worker.device)
        worker.scheduler.step(1)
        sums = torch.tensor([sum(float(r[k]) for r in reported) for k in ("bce_sum", "rows", "correct")]
                            if worker.reports else [0.0] * 3, dtype=torch.float64, device=worker.device)
        torch.distributed.all_reduce(sums)
        m = {"verifier/bce": float(sums[0] / sums[1]), "verifier/accuracy": float(sums[2] / sums[1]),
             "verifier/rows": float(sums[1]), "verifier/grad_norm": stats["grad_norm"], "verifier/lr": lr}
        if not math.isfinite(m["verifier/bce"]):
            raise FloatingPointError(f"train-verifier step {step}: loss {m['verifier/bce']} (lower optim.lr)")
        if step % eval_every == 0 or step == len(batches):
            last_eval = evaluate()
            m.update(last_eval)
        history.append(m)
        if log is not None:
            log.log(step, m)
        bar.update(1)
        bar.set_postfix(bce=f"{m['verifier/bce']:.3f}", auc=f"{last_eval['verifier/heldout_auc']:.3f}")
    bar.close()
    final_scores = score_rows(worker, held, a.max_tokens_per_micro_batch)
    if rank0:
        with (Path(cfg.run_dir) / HELDOUT_SCORES).open("w") as f:
            for d, s in zip(held_items, final_scores):
                f.write(json.dumps({"question": d["question"], "response": d["response"], "label": d["label"],
                                    "input_ids": d["input_ids"], "score": s}) + "\n")
    ckpt = worker.save(cfg.run_dir, len(batches), {"verifier": True, "rows": len(rows)}, keep_last=1)
    hf = str(export_verifier_hf(worker.built, Path(cfg.run_dir) / "hf", cfg.model)) if cfg.export_hf else None
    if log is not None:
        log.close()
    worker.shutdown()
    return {"steps": len(batches), "train_answers": len(rows), "heldout_answers": len(held),
            "before": first, "after": last_eval, "first_bce": history[0]["verifier/bce"],
            "last_bce": history[-1]["verifier/bce"], "seconds": time.time() - t0, "checkpoint": ckpt, "hf": hf}


def prepare_answers(cfg: VerifierTrainConfig, out: Path, log=print) -> dict:
    """Transcripts → labelled, balanced, split, tokenized answers (one JSON line each) at `out`."""
    from transformers import AutoTokenizer

    from megatron_matpo.maporl.answers import Tolerance
    from megatron_matpo.maporl.verifier import verifier_input_ids
    from megatron_matpo.verifier.answers import balance, check_labels, read_answers, split_by_question

    answers = read_answers(cfg.transcripts, Tolerance(cfg.rel_tol, cfg.abs_tol))
    check_labels("transcripts", answers)
    kept = balance(answers, cfg.balance_per_question, cfg.seed)
    check_labels(f"after balancing (balance_per_question={cfg.balance_per_question})", kept)
    train, held = split_by_question(kept, cfg.holdout, cfg.seed)
    check_labels(f"the held-out split (holdout={cfg.holdout})", held)
    check_labels("the training split", train)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    longest = 0
    with out.open("w") as f:
        for split, items in (("train", train), ("heldout", held)):
            for x in items:
                ids = verifier_input_ids(tok, x.question, x.response, cfg.enable_thinking)
                longest = max(longest, len(ids))
                f.write(json.dumps({"split": split, "question": x.question, "response": x.response, "label": x.label,
                                    "input_ids": ids, "where": x.where}) + "\n")
    if longest > cfg.actor.max_tokens_per_micro_batch:
        from megatron_matpo.config import ConfigError

        raise ConfigError(f"actor.max_tokens_per_micro_batch: {cfg.actor.max_tokens_per_micro_batch} < the longest "
                          f"answer's {longest} tokens")
    stats = {"answers": len(answers), "right": sum(x.label for x in answers), "balanced": len(kept),
             "train": len(train), "heldout": len(held), "heldout_questions": len({x.question for x in held}),
             "longest_tokens": longest}
    log(f"matpo train-verifier: {stats['answers']} answers ({stats['right']} right) -> {stats['balanced']} balanced: "
        f"{stats['train']} to train, {stats['heldout']} held out ({stats['heldout_questions']} questions)")
    return stats


def run_train_verifier(cfg: VerifierTrainConfig, log=print) -> dict:
    """The whole job: (a sampling pass,) the answers, then the launched Megatron world."""
    import yaml

    from megatron_matpo import config
    from megatron_matpo.dist import launch_local
    from megatron_matpo.model.builder import check_layout

    cfg.validate()
    if cfg.sample is not None:  # the embedded default's inputs (tiny model, arithmetic set) on first use
        from types import SimpleNamespace

        from megatron_matpo.train.bootstrap import ensure_inputs

        ensure_inputs(SimpleNamespace(model=cfg.model, data=cfg.sample.data, corpus=None, seed=cfg.seed,
                                      bootstrap=cfg.bootstrap), log)
    if not Path(cfg.model).exists():
        raise config.ConfigError(f"model: {cfg.model} does not exist")
    check_layout(cfg.model, cfg.actor.layout)
    run = Path(cfg.run_dir)
    if (run / "checkpoints").exists() or (run / VERIFIER_DONE).exists():
        raise config.ConfigError(f"run_dir: {run} already holds a verifier run; give a new run_dir")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.redacted(config.to_dict(cfg)), sort_keys=False))
    if cfg.sample is not None:
        from megatron_matpo.verifier.sample import sample_transcripts

        cfg.transcripts = [str(sample_transcripts(cfg, run / "samples", log))]
    data = run / "answers.jsonl"
    stats = prepare_answers(cfg, data, log)
    summary = launch_local(train_on_ranks, cfg.actor.layout.world_size, asdict(cfg), str(data))
    summary["data"] = stats
    (run / VERIFIER_DONE).write_text(json.dumps(summary, indent=2))
    return summary


def served_parity(verifier, model_path: str) -> dict[str, float]:
    """The served verifier (`maporl.verifier.RewardModelVerifier` on an engine) against the Megatron scores
    `matpo train-verifier` recorded for its held-out answers (`heldout_scores.jsonl` beside the export):
    the largest raw-score difference, and how many inputs tokenize differently ({} when nothing was
    recorded, e.g. a verifier trained elsewhere)."""
    import asyncio

    from megatron_matpo.reward.judge import AccuracyItem

    path = Path(model_path).parent / HELDOUT_SCORES
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    items = [AccuracyItem(r["question"], "", r["response"]) for r in rows]
    got = asyncio.run(verifier.score(items))
    verifier.pop_metrics()  # not a step's scoring
    return {"verifier/served_max_abs_diff": max(abs(g.details["rm_score"] - r["score"]) for g, r in zip(got, rows)),
            "verifier/served_rows": float(len(rows)),
            "verifier/served_ids_differ": float(sum(verifier.input_ids(it) != r["input_ids"]
                                                    for it, r in zip(items, rows)))}
