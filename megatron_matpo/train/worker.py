"""One Megatron actor rank: the model (and frozen reference), optimizer, LR schedule, weight sync and
checkpoints, driven by the controller one collective call at a time.

Plain Python: `orchestrate.actor_group` runs it as a Ray actor per rank; tests may run it under
`dist.launch_local`. Every public method is collective: all ranks of the actor world call it in the
same order. Batches stay on the ranks between calls (old/reference logprobs are written into them in
place), so only scalars travel back to the controller.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_matpo.algo.loss import LossConfig, ppo_policy_loss
from megatron_matpo.bridge.sync_config import SyncConfig
from megatron_matpo.train.packing import PackedMicroBatch
from megatron_matpo.model.layout import ParallelLayout
from megatron_matpo.train.optim import OptimConfig


@dataclass
class WorkerSpec:
    model: str  # HF directory (initial weights, tokenizer, config)
    layout: ParallelLayout
    dtype: str = "float32"  # float32 | bfloat16
    max_tokens_per_micro_batch: int = 8192  # actor.max_tokens_per_micro_batch: the model's sequence length
    recompute: str = "none"  # activation recompute of the actor's layers: none | full
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sync: SyncConfig | None = None  # the job's `sync:` section (None: a critic, which syncs nothing)
    use_reference: bool = False
    seed: int = 1234
    total_steps: int = 1
    # the rollouts' sampling temperature: the trained policy is softmax(logits / T), whose logprobs the
    # engines report (`actor.tempered`); parity checks compare the model's own (T = 1)
    temperature: float = 1.0


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ActorWorker:
    head = "lm"  # the model's output: vocabulary logits (a CriticWorker: a scalar value)

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.batches: list[list[PackedMicroBatch]] = []  # this rank's mini-batches of the current step

    # ---- bring-up ---------------------------------------------------------------------------------
    def setup(self, rank: int, world: int, master_addr: str, master_port: int, local_rank: int = 0) -> dict:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        from megatron_matpo.compat import prepare_process
        from megatron_matpo.dist import init_megatron

        prepare_process()  # a Ray worker ran it when it imported megatron_matpo.orchestrate; here for other starts
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        init_megatron(self.spec.layout, seed=self.spec.seed)
        return self.build()

    def build(self) -> dict:
        """Model(s), optimizer and schedule on this rank of an initialized megatron world."""
        from megatron.core import parallel_state as ps

        from megatron_matpo import platform
        from megatron_matpo.model.builder import build_model
        from megatron_matpo.train.optim import build_optimizer, build_scheduler, ddp_config

        s, rank = self.spec, torch.distributed.get_rank()
        self.device = platform.device()
        dtype = _dtype(s.dtype)
        self.built = build_model(s.model, s.layout, dtype=dtype, seq_length=s.max_tokens_per_micro_batch,
                                 ddp_config=ddp_config(s.optim), recompute=s.recompute, head=self.head)
        self.optimizer = build_optimizer(self.built.chunks, s.optim, dtype)
        self.scheduler = build_scheduler(self.optimizer, s.optim, s.total_steps)
        # the reference is the initial policy, frozen (also after a resume: always from `model`)
        self.ref = (build_model(s.model, s.layout, dtype=dtype, seq_length=s.max_tokens_per_micro_batch)
                    if s.use_reference else None)
        if self.ref is not None:
            for c in self.ref.chunks:
                c.requires_grad_(False)
        self.sync = None
        self.rank = rank
        self.reports = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                        and ps.get_context_parallel_rank() == 0)
        return {"rank": rank, "dp_rank": ps.get_data_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                "pp_rank": ps.get_pipeline_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank(),
                "reports": self.reports}

    def connect_engines(self, engine_urls: list[str]) -> None:
        from megatron_matpo.bridge import WeightSync

        self.sync = WeightSync(self.spec.sync, self.built, engine_urls)

    # ---- one step's data --------------------------------------------------------------------------
    def load_batch(self, mini_batches: list[list[PackedMicroBatch]]) -> None:
        """This rank's micro-batches (its DP slice, whole: CP ranks split them at each forward) of each
        mini-batch."""
        self.batches = mini_batches

    def _forward_logprobs(self, chunks: list, mbs: list[PackedMicroBatch],
                          temperature: float | None = None) -> list[torch.Tensor] | None:
        """Logprobs of the policy at `temperature` (None: the rollouts', `spec.temperature`)."""
        from megatron_matpo.train.actor import compute_logprobs

        return compute_logprobs(chunks, mbs, self.device,
                                self.spec.temperature if temperature is None else temperature)

    def old_logprobs(self, recompute: bool) -> dict[str, float]:
        """Actor logprobs of every batch token: the train/rollout parity metric against the engine's
        sampling logprobs, and (with `recompute`) the PPO old logprobs (exact ratio 1 before the
        first update, whatever the engine's numerics)."""
        stats = {"abs_diff_sum": 0.0, "abs_diff_max": 0.0, "tokens": 0.0}
        for mbs in self.batches:
            lps = self._forward_logprobs(self.built.chunks, mbs)
            if lps is None:
                continue
            for p, lp in zip(mbs, lps):
                m = p.parity_mask if p.parity_mask is not None else p.loss_mask
                d = (lp - p.old_logprobs).abs() * m
                stats["abs_diff_sum"] += float(d.sum())
                stats["abs_diff_max"] = max(stats["abs_diff_max"], float(d.max()) if d.numel() else 0.0)
                stats["tokens"] += float(m.sum())
                if recompute:
                    p.rollout_logprobs, p.old_logprobs = p.behaviour_logprobs, lp.float()
        return stats if self.reports else {}

    def ref_logprobs(self) -> dict[str, float]:
        """Reference-model logprobs into the batch (KL term), plus the mean KL(k3) for logging."""
        from megatron_matpo.algo.loss import kl_penalty

        if self.ref is None:
            raise RuntimeError("ref_logprobs called but the reference model is off (loss.kl_coef == 0)")
        stats = {"kl_sum": 0.0, "tokens": 0.0}
        for mbs in self.batches:
            lps = self._forward_logprobs(self.ref.chunks, mbs)
            if lps is None:
                continue
            for p, lp in zip(mbs, lps):
                p.ref_logprobs = lp.float()
                kl = kl_penalty(p.old_logprobs, p.ref_logprobs, self.spec.loss.kl_kind) * p.loss_mask
                stats["kl_sum"] += float(kl.sum())
                stats["tokens"] += float(p.loss_mask.sum())
        return stats if self.reports else {}

    # ---- update -----------------------------------------------------------------------------------
    def train(self, global_token_counts: list[int], old_from_forward: bool = False) -> list[dict[str, float]]:
        """One optimizer step per mini-batch; returns this rank's stats per mini-batch (reporting
        ranks only carry loss terms; grad norm and lr are the same everywhere). `old_from_forward`
        (one mini-batch, no `old_logprobs` call before): see `actor.train_step`."""
        from megatron_matpo.train.actor import train_step

        if old_from_forward and len(self.batches) != 1:
            raise ValueError(f"old logprobs from the update's forward need one mini-batch, got {len(self.batches)}")
        out = []
        for mbs, n in zip(self.batches, global_token_counts):
            stats = train_step(self.built.chunks, self.optimizer, mbs, self.spec.loss, n, self.device,
                               old_from_forward, self.spec.temperature)
            if self.reports:
                stats.update(self._role_terms(mbs, n))
            self.scheduler.step(increment=1)
            stats.update(self._lrs())
            out.append(stats if self.reports or self.rank == 0 else {})
        self.batches = []
        return out

    def _lrs(self) -> dict[str, float]:
        """The current lr, and the output layer's when `optim.output_layer_lr` gives it its own
        param group (megatron's override puts that peak in the group's `max_lr`)."""
        groups, own = self.optimizer.param_groups, self.spec.optim.output_layer_lr
        if own is None:
            return {"lr": float(groups[0]["lr"])}
        out = [g for g in groups if g.get("max_lr") == own]
        rest = [g for g in groups if g.get("max_lr") != own] or groups
        return {"lr": float(rest[0]["lr"]), "lr_output_layer": float((out or rest)[0]["lr"])}

    def _role_terms(self, mbs: list[PackedMicroBatch], global_token_count: int) -> dict[str, float]:
        """Each role's share of the policy-gradient surrogate at the pre-update policy (ratio 1):
        -Σ A over its loss tokens / the global token count (or weighted by the rows' loss weights: the
        loss.agg modes other than token-mean), and its loss tokens. Non-zero for every role
        (planner and worker; each MAPoRL agent) means each receives gradient (∂loss/∂logp = -A/N)."""
        out: dict[str, float] = {}
        for p in mbs:
            for role in sorted(set((p.roles or {}).values())):
                ids = torch.tensor([rid for rid, r in p.roles.items() if r == role], dtype=p.row_ids.dtype)
                m = p.loss_mask * torch.isin(p.row_ids, ids).float()
                term, _ = ppo_policy_loss(p.old_logprobs, p.old_logprobs, p.advantages, m, dual_clip_c=None,
                                          global_token_count=global_token_count, token_weights=p.loss_weights)
                out[f"pg_term_{role}"] = out.get(f"pg_term_{role}", 0.0) + float(term)
                out[f"loss_tokens_{role}"] = out.get(f"loss_tokens_{role}", 0.0) + float(m.sum())
        return out

    # ---- engines ----------------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, float]:
        if self.sync is None:
            raise RuntimeError("connect_engines must be called before sync_weights")
        return self.sync.sync()

    def parity(self, token_ids: list[list[int]], engine_url: str) -> dict[str, float]:
        """Engine prompt logprobs vs this actor's logprobs on the same sequences (after a sync)."""
        from megatron_matpo.bridge import engine_parity
        from megatron_matpo.train.packing import Row, pack_rows

        rows = [Row(token_ids=t, loss_mask=[1] * len(t), old_logprobs=[0.0] * len(t), advantage=0.0) for t in token_ids]
        (mbs,) = pack_rows(rows, max_tokens_per_micro_batch=max(map(len, token_ids)) * len(rows), dp_size=1,
                           pad_to_multiple=self.spec.layout.tp, cp_size=self.spec.layout.cp)
        lps = self._forward_logprobs(self.built.chunks, mbs, temperature=1.0)  # the engine's prefill: T = 1
        if lps is None or not self.reports or self.rank_dp() != 0:
            return {}
        actor = []
        for p, lp in zip(mbs, lps):
            for rid in p.row_ids.unique().tolist():
                if rid < 0:
                    continue
                pos = (p.row_ids[0] == rid).nonzero().flatten()
                # position i predicts token i+1: token j's logprob sits at j-1; token 0 has none
                actor.append((rid, [None] + lp[0, pos[:-1]].tolist()))
        actor = [v for _, v in sorted(actor)]
        return asyncio.run(engine_parity(engine_url, token_ids, actor))

    def rank_dp(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, run_dir: str, step: int, extra: dict, keep_last: int) -> str:
        from megatron_matpo.train.checkpoint import save_checkpoint

        return str(save_checkpoint(run_dir, step, self.built.chunks, self.optimizer, self.scheduler, extra,
                                   keep_last=keep_last, hf_dir=self.spec.model))

    def load(self, ckpt_dir: str) -> dict:
        from megatron_matpo.train.checkpoint import load_checkpoint

        return load_checkpoint(ckpt_dir, self.built.chunks, self.optimizer, self.scheduler)

    def export_hf(self, out_dir: str) -> str:
        from megatron_matpo.convert import copy_hf_metadata, export_hf

        out = Path(out_dir)
        export_hf(self.built, out, show_progress=False)
        if torch.distributed.get_rank() == 0:
            copy_hf_metadata(Path(self.spec.model), out)
        torch.distributed.barrier()
        return str(out)

    def shutdown(self) -> None:
        from megatron_matpo.dist import shutdown_megatron

        if self.sync is not None:
            self.sync.close()
        shutdown_megatron()
