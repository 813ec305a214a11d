"""Rank functions for tests/test_checkpoint.py: a deterministic PPO loop that checkpoints and resumes.

Each step draws from python `random`, numpy and torch's global generator (which rows train, how
advantages are scaled), so a resume is only exact if the RNG states come back too. Per-rank tensors
the test compares (parameters) are written under the work directory; rank 0 returns the rest.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_matpo.model.layout import ParallelLayout

TOTAL_STEPS = 6  # scheduler horizon; the tests run 4 of them
N_ROWS, ROWS_PER_STEP = 8, 5
RUN, RESHARD_RUN = "run", "reshard-run"


def optim_config():
    from megatron_matpo.train.optim import OptimConfig

    # warmup + linear decay: every step has its own lr, so a wrong scheduler step count shows
    return OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_style="linear")


def _rows(vocab: int) -> list:
    """Fixed synthetic rollouts: random tokens, a prompt third, old logprobs near the random-init
    policy's (~log 1/vocab, so PPO ratios stay near 1 and gradients are not all clipped)."""
    from megatron_matpo.train.packing import Row

    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(N_ROWS):
        n = int(torch.randint(6, 20, (1,), generator=g))
        toks = torch.randint(0, vocab, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)
        old = [0.0] + (float(np.log(1.0 / vocab)) + 0.05 * torch.randn(n - 1, generator=g)).tolist()
        rows.append(Row(toks, mask, old, advantage=float(torch.randn((), generator=g)), row_id=i))
    return rows


def _step_batch(rows: list) -> list:
    """This step's rows, drawn from all three global generators."""
    from megatron_matpo.train.packing import Row

    pick = torch.randperm(len(rows))[:ROWS_PER_STEP].tolist()
    scale = 0.5 + random.random()
    shift = float(np.random.uniform(-0.1, 0.1))
    return [Row(rows[i].token_ids, rows[i].loss_mask, rows[i].old_logprobs, rows[i].advantage * scale + shift,
                row_id=k) for k, i in enumerate(pick)]


def _setup(hf_dir: str, layout: ParallelLayout):
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.train.optim import build_optimizer, build_scheduler, ddp_config

    init_megatron(layout)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    optim = optim_config()
    built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(optim))
    opt = build_optimizer(built.chunks, optim)
    return built, opt, build_scheduler(opt, optim, TOTAL_STEPS)


def _run_steps(built, opt, sched, steps: range) -> dict[str, float]:
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.algo.loss import LossConfig
    from megatron_matpo.train.packing import pack_rows
    from megatron_matpo.train.actor import train_step

    rows = _rows(built.provider.vocab_size)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    out: dict[str, float] = {}
    for step in steps:
        batch = _step_batch(rows)
        mbs = pack_rows(batch, max_tokens_per_micro_batch=32, dp_size=dp)[dp_rank]
        lr = float(opt.param_groups[0]["lr"])
        stats = train_step(built.chunks, opt, mbs, LossConfig(), sum(sum(r.loss_mask) for r in batch),
                           platform.device())
        sched.step(1)
        # the loss lives on the last pipeline stage, per DP rank: sum it over the world's DP group
        loss = torch.tensor([stats.get("loss", 0.0)], dtype=torch.float64)
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        out.update({f"loss{step}": loss.item(), f"grad_norm{step}": stats["grad_norm"], f"lr{step}": lr,
                    f"skipped{step}": stats["step_skipped"]})
    out["sched_steps"] = float(sched.num_steps)
    return out


def _params(built) -> dict[str, torch.Tensor]:
    from megatron_matpo.convert import _unwrap

    return {k: v.detach().clone() for k, v in _unwrap(built.chunks[0]).state_dict().items()
            if isinstance(v, torch.Tensor)}


def _teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _try(call) -> str:
    try:
        call()
        return "no error"
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return f"{type(e).__name__}: {e}"


def train_and_save(hf_dir: str, work: str, layout: ParallelLayout) -> dict:
    """The uninterrupted run: steps 1..4, a checkpoint after every step (keep_last=3), an HF export of
    the live model at step 2, a fully-reshardable copy of step 2 in a second run dir; then a save of
    step 5 that crashes after writing its shards, before the commit."""
    from megatron_matpo.convert import export_hf
    from megatron_matpo.train import checkpoint as ckpt

    run = Path(work) / RUN
    built, opt, sched = _setup(hf_dir, layout)
    rank = torch.distributed.get_rank()
    res: dict = {"before_first_step": _try(lambda: ckpt.save_checkpoint(
        run, 0, built.chunks, opt, sched, {}, keep_last=3, hf_dir=hf_dir))}
    history: list[float] = []
    for step in range(1, 5):
        res.update(_run_steps(built, opt, sched, range(step, step + 1)))
        history.append(res[f"loss{step}"])
        extra = {"step": step, "cursor": step * ROWS_PER_STEP, "history": history}
        ckpt.save_checkpoint(run, step, built.chunks, opt, sched, extra, keep_last=3, hf_dir=hf_dir)
        if step == 2:
            export_hf(built, Path(work) / "hf-live-step2", show_progress=False)
            ckpt.save_checkpoint(Path(work) / RESHARD_RUN, step, built.chunks, opt, sched, extra, keep_last=1,
                                 hf_dir=hf_dir, optim_format="fully_reshardable")
    torch.save(_params(built), Path(work) / f"full_rank{rank}.pt")
    res["after_keep_last"] = sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir())

    # a save that dies after every shard is written, before rank 0's rename (the commit): on disk
    # this is exactly what a killed job leaves
    real_commit = ckpt._commit

    def crash(*_a, **_k):
        raise OSError("simulated crash before the commit")

    ckpt._commit = crash
    try:
        res["crashed"] = _try(lambda: ckpt.save_checkpoint(run, 5, built.chunks, opt, sched, {"step": 5},
                                                           keep_last=3, hf_dir=hf_dir))
    finally:
        ckpt._commit = real_commit
    res["after_crash"] = sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir())
    latest = ckpt.latest_checkpoint(run)
    res["latest_after_crash"] = latest.name if latest else None
    _teardown()
    return res


def resume(hf_dir: str, work: str, layout: ParallelLayout, other: ParallelLayout) -> dict:
    """A fresh world: (1) build fresh, load step 2, run steps 3..4; load `latest_checkpoint` into the
    same (used) objects; (2) megatron→HF export of the step-2 training checkpoint; (3) at `other`
    (same world size, different layout): clear errors, weights-only load, and a resume from the
    fully-reshardable checkpoint."""
    from megatron_matpo.convert import megatron_to_hf_on_ranks
    from megatron_matpo.train import checkpoint as ckpt

    run = Path(work) / RUN
    step2 = run / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(2)
    res: dict = {}

    built, opt, sched = _setup(hf_dir, layout)
    rank = torch.distributed.get_rank()
    for n in (1, 2, 3):  # move every generator away from the seeds: only the restore brings them back
        random.random(), np.random.rand(), torch.rand(n)
    res["extra"] = ckpt.load_checkpoint(step2, built.chunks, opt, sched)
    res["sched_steps_loaded"] = float(sched.num_steps)
    res.update(_run_steps(built, opt, sched, range(3, 5)))
    torch.save(_params(built), Path(work) / f"resumed_rank{rank}.pt")
    latest = ckpt.latest_checkpoint(run)
    res["latest"] = latest.name if latest else None
    res["latest_extra"] = ckpt.load_checkpoint(latest, built.chunks, opt, sched)
    res["latest_sched_steps"] = float(sched.num_steps)
    torch.save(_params(built), Path(work) / f"latest_rank{rank}.pt")
    # re-saving an existing step replaces it; the next successful save clears stale temp dirs
    ckpt.save_checkpoint(run, 4, built.chunks, opt, sched, {**res["latest_extra"], "resaved": True}, keep_last=3,
                         hf_dir=hf_dir)
    res["after_resave"] = sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir())
    _teardown()

    from megatron_matpo.dist import init_megatron

    init_megatron(layout)
    megatron_to_hf_on_ranks(str(step2), str(Path(work) / "hf-from-ckpt-step2"), layout)
    _teardown()

    built, opt, sched = _setup(hf_dir, other)
    res["err_layout"] = _try(lambda: ckpt.load_checkpoint(step2, built.chunks, opt, sched))
    res["err_missing"] = _try(lambda: ckpt.load_checkpoint(run / ckpt.CHECKPOINTS_DIR / "step_000099",
                                                           built.chunks, opt, sched))
    uncommitted = run / ckpt.CHECKPOINTS_DIR / "step_000008.tmp-x"  # complete contents, never renamed
    if rank == 0:
        shutil.copytree(step2, uncommitted)
    torch.distributed.barrier()
    res["err_tmp"] = _try(lambda: ckpt.load_checkpoint(uncommitted, built.chunks, opt, sched))
    res["err_incomplete"] = _try(lambda: ckpt.load_checkpoint(run / ckpt.CHECKPOINTS_DIR / "step_000007",
                                                              built.chunks, opt, sched))
    res["weights_only_extra"] = ckpt.load_checkpoint(step2, built.chunks, None, None)
    reshard = Path(work) / RESHARD_RUN / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(2)
    res["reshard_extra"] = ckpt.load_checkpoint(reshard, built.chunks, opt, sched)
    res.update({f"reshard_{k}": v for k, v in _run_steps(built, opt, sched, range(3, 5)).items()})
    _teardown()
    return res
