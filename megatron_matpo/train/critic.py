"""One Megatron critic rank (advantage.estimator=gae): the policy's architecture with a scalar value head
(`model.value_head`), its own optimizer and checkpoints, the same layout and packed batches as the
actor. Every public method is collective, as in `ActorWorker`, whose bring-up, batch loading and
persistence it shares; it has no engines and no reference model.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_matpo.train.packing import PAD_ROW_ID, PackedMicroBatch
from megatron_matpo.model.forward import run_schedule
from megatron_matpo.train.worker import ActorWorker


def _values(out: torch.Tensor) -> torch.Tensor:
    return out[..., 0].float()  # [b, s, 1] → [b, s]


class CriticWorker(ActorWorker):
    head = "value"

    def connect_engines(self, engine_urls: list[str]) -> None:
        raise RuntimeError("the critic has no engines: only the actor's weights are synced")

    def values(self) -> dict[int, np.ndarray]:
        """Per row (id → values at its loss positions, in token order) of the current batch; the
        reporting ranks of each DP slice return theirs, the others {}."""
        from megatron.core import parallel_state as ps

        from megatron_matpo.model.context_parallel import unshard
        from megatron_matpo.train.actor import cp_parts

        out: dict[int, np.ndarray] = {}

        def keep(o, _p: PackedMicroBatch):  # last pipeline stage only
            return torch.zeros((), device=o.device), {"values": _values(o).detach().cpu()}

        for c in self.built.chunks:
            c.eval()
        cp, group = ps.get_context_parallel_world_size(), ps.get_context_parallel_group()
        for mbs in self.batches:
            parts = cp_parts(mbs)  # each CP rank its part; the values come back whole
            with torch.no_grad():
                reported = run_schedule(self.built.chunks, [p.micro_batch for p in parts], keep, forward_only=True,
                                        device=self.device, with_each=parts)
            for p, r in zip(mbs, reported):
                v = unshard(r["values"], p.micro_batch.cu_seqlens.tolist(), cp, group)[0]
                rows, mask = p.row_ids[0], p.loss_mask[0] > 0
                for rid in rows.unique().tolist():
                    if rid != PAD_ROW_ID:
                        out[rid] = v[(rows == rid) & mask].numpy().astype(np.float32)
        return out if self.reports else {}

    def train(self, global_token_counts: list[int]) -> list[dict[str, float]]:
        """One optimizer step of the clipped value loss per mini-batch (token mean over all DP ranks)."""
        from megatron_matpo.algo.loss import value_loss
        from megatron_matpo.train.actor import optimizer_step

        out = []
        for mbs, n in zip(self.batches, global_token_counts):
            def loss_fn(o, p: PackedMicroBatch, n=n):
                v = _values(o)
                if p.returns is None:  # a padding micro-batch: nothing to fit
                    ret = old = torch.zeros_like(v)
                else:
                    ret, old = p.returns.to(v.device), p.old_values.to(v.device)
                loss, m = value_loss(v, old, ret, p.loss_mask.to(v.device), self.spec.loss.value_clip,
                                     global_token_count=n)
                tokens = p.loss_mask.sum().to(v.device)
                return loss, {"value_loss": m["value_loss"].detach(), "tokens": tokens,
                              "value_clip_frac": m["value_clip_frac"] * tokens,
                              "value_mean": m["value_mean"] * tokens}

            reported, stats = optimizer_step(self.built.chunks, self.optimizer, mbs, loss_fn, self.device)
            self.scheduler.step(increment=1)
            stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
            if reported:
                tokens = max(sum(float(r["tokens"]) for r in reported), 1.0)
                stats["value_loss"] = sum(float(r["value_loss"]) for r in reported)  # divided by the global count
                stats["value_clip_frac"] = sum(float(r["value_clip_frac"]) for r in reported) / tokens
                stats["value_mean"] = sum(float(r["value_mean"]) for r in reported) / tokens
                stats["tokens"] = tokens
            out.append(stats if self.reports or self.rank == 0 else {})
        self.batches = []
        return out
