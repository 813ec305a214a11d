"""The Megatron actor's two RL operations on packed micro-batches, for any TP × PP × CP × DP:
per-token logprobs (old/reference policy) and one PPO update, whose optimizer step
(`optimizer_step`) the critic's value update shares.

Micro-batches arrive whole on every CP rank; each rank runs its part (`packing.shard_for_cp`) and
logprobs come back whole (gathered over the CP group), so callers never see the CP split. The loss
needs no CP term: each rank's loss is its tokens' sum over the global token count, megatron's
schedule multiplies it by cp and DDP averages gradients over DP × CP.

Logprobs come from the vocab-parallel logits without gathering the vocabulary: megatron's
`vocab_parallel_cross_entropy` is exactly −log p(label) computed shard-wise.
"""
from __future__ import annotations

import torch

from megatron_matpo.algo.loss import LossConfig, policy_loss
from megatron_matpo.algo.off_policy import importance_weights
from megatron_matpo.train.packing import PackedMicroBatch, shard_for_cp
from megatron_matpo.train.stats import is_stats
from megatron_matpo.model.forward import run_schedule


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position from vocab-parallel logits [1, t, V/tp] (fp32 math). Clobbers fp32
    `logits` (megatron writes the softmax into its input): read anything else from them first."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float().contiguous(), labels.to(logits.device))


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position from vocab-parallel logits (a metric: no gradient)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    x = logits.float()
    m = x.max(-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(x - m)
    z = e.sum(-1, keepdim=True)
    ex = (e * x).sum(-1, keepdim=True)
    torch.distributed.all_reduce(z, group=group)
    torch.distributed.all_reduce(ex, group=group)
    return (torch.log(z) + m - ex / z).squeeze(-1)


def cp_parts(mbs: list[PackedMicroBatch]) -> list[PackedMicroBatch]:
    """This rank's CP part of each whole micro-batch (the micro-batches themselves when cp == 1)."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    return mbs if cp == 1 else [shard_for_cp(p, cp, ps.get_context_parallel_rank()) for p in mbs]


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the policy the engines sample: `logits / T`. SGLang 0.5.23 samples softmax(logits / T)
    and reports that distribution's logprobs (the model's own at T = 0, greedy), so the actor's old, new
    and reference logprobs divide by the same T; at T = 1 the logits pass through untouched."""
    return logits if temperature in (0.0, 1.0) else logits / temperature


def compute_logprobs(chunks: list, mbs: list[PackedMicroBatch], device: torch.device,
                     temperature: float = 1.0) -> list[torch.Tensor] | None:
    """Per-position logprobs of each whole micro-batch's labels (last pipeline stage; None elsewhere), of
    the policy at the rollouts' sampling `temperature` (`tempered`)."""
    from megatron.core import parallel_state

    from megatron_matpo.model.context_parallel import unshard

    def keep(out, p: PackedMicroBatch):
        lp = token_logprobs(tempered(out, temperature), p.labels)
        return torch.zeros((), device=out.device), {"logprobs": lp.detach().cpu()}

    for c in chunks:
        c.eval()
    parts = cp_parts(mbs)
    with torch.no_grad():
        reported = run_schedule(chunks, [p.micro_batch for p in parts], keep, forward_only=True, device=device,
                                with_each=parts)
    if not parallel_state.is_pipeline_last_stage():
        return None
    cp, group = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_group()
    return [unshard(r["logprobs"], p.micro_batch.cu_seqlens.tolist(), cp, group) for r, p in zip(reported, mbs)]


# how each reported metric combines over the CP ranks of a micro-batch: token-weighted means, maxima; the
# rest are sums (the losses are already divided by the global token count)
_MEAN_OVER = {"clip_frac": "tokens", "dual_clip_frac": "tokens", "approx_kl": "tokens", "ratio_mean": "tokens",
              "is_ratio_mean": "is_tokens", "is_truncated_frac": "is_tokens", "is_masked_frac": "is_tokens"}
_MAX = ("ratio_max", "is_ratio_max", "parity_abs_diff_max")


def reduce_over_cp(reported: list[dict]) -> list[dict]:
    """Each micro-batch's metrics over its CP parts (a collective of the CP group; identity at cp 1)."""
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() == 1 or not reported:
        return reported
    group = ps.get_context_parallel_group()
    out = []
    for r in reported:
        keys = sorted(r)
        sums = torch.stack([r[k].float().cpu() * (r[_MEAN_OVER[k]].float().cpu() if k in _MEAN_OVER else 1.0)
                            if k not in _MAX else torch.zeros(()) for k in keys])
        maxes = torch.stack([r[k].float().cpu() if k in _MAX else torch.zeros(()) for k in keys])
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX, group=group)
        total = dict(zip(keys, sums))
        out.append({k: maxes[i] if k in _MAX else
                    total[k] / total[_MEAN_OVER[k]].clamp_min(1.0) if k in _MEAN_OVER else total[k]
                    for i, k in enumerate(keys)})
    return out


def optimizer_step(chunks: list, optimizer, mbs: list[PackedMicroBatch], loss_fn, device: torch.device
                   ) -> tuple[list[dict], dict[str, float]]:
    """One optimizer step over this rank's micro-batches with the token-mean over all DP ranks; the
    actor's and the critic's updates differ only in `loss_fn(out, packed) -> (loss, metrics)`, whose
    loss must already be divided by the global token count.

    megatron's schedule divides each micro-batch loss by the number of micro-batches and DDP averages
    gradients over DP; the loss is pre-scaled by both here so the update is the gradient of
    (sum of per-token losses over the global batch) / global_token_count. Returns the last stage's
    reported metrics (one dict per micro-batch; [] elsewhere) and the grad norm / skip flag.
    """
    from megatron.core import parallel_state

    scale = len(mbs) * parallel_state.get_data_parallel_world_size()
    def scaled(out, p: PackedMicroBatch):
        loss, metrics = loss_fn(out, p)
        return loss * scale, metrics

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    optimizer.zero_grad()
    parts = cp_parts(mbs)
    reported = run_schedule(chunks, [p.micro_batch for p in parts], scaled, forward_only=False, device=device,
                            with_each=parts)
    reported = reduce_over_cp(reported)
    ok, grad_norm, _ = optimizer.step()
    return reported, {"grad_norm": float(grad_norm or 0.0), "step_skipped": float(not ok)}


def train_step(chunks: list, optimizer, mbs: list[PackedMicroBatch], cfg: LossConfig, global_token_count: int,
               device: torch.device, old_from_forward: bool = False, temperature: float = 1.0) -> dict[str, float]:
    """One PPO policy update (`optimizer_step` with `algo.loss.policy_loss`) of the policy at the rollouts'
    sampling `temperature` (`tempered`).

    `old_from_forward`: the batch's one update of this rollout (a single mini-batch), so the PPO old
    logprobs are this forward's own, detached (ratio 1; the same loss and gradient as a separate
    no-grad pass before the update, at one forward less). The batch's `old_logprobs` are then the
    engine's: the train/rollout parity sums (`parity_*`) are measured against them here."""
    if cfg.entropy_coef:
        raise ValueError("loss.entropy_coef > 0 is not supported yet: entropy is a metric only (no gradient)")
    if cfg.kl_coef and cfg.kl_as == "loss" and any(p.ref_logprobs is None for p in mbs):
        raise ValueError("loss.kl_coef with kl_as='loss' needs reference logprobs in every micro-batch")

    def loss_fn(out, p: PackedMicroBatch):
        out = tempered(out, temperature)
        # before the logprobs: megatron's cross entropy overwrites fp32 logits with the softmax in place
        ent = vocab_parallel_entropy(out)
        lp = token_logprobs(out, p.labels)
        ref = p.ref_logprobs.to(lp.device) if p.ref_logprobs is not None else None
        old, behaviour, parity = p.old_logprobs.to(lp.device), p.behaviour_logprobs.to(lp.device), {}
        if old_from_forward:
            m = (p.parity_mask if p.parity_mask is not None else p.loss_mask).to(lp.device)
            d = (lp.detach() - old).abs() * m
            parity = {"parity_abs_diff_sum": d.sum(), "parity_abs_diff_max": d.max() if d.numel() else d.sum(),
                      "parity_tokens": m.sum()}
            old = lp.detach()
        weights, is_metrics = None, {}
        if cfg.off_policy.enabled:  # engine (behaviour) -> old (proximal); constrained tokens keep weight 1
            m = p.loss_mask * (p.parity_mask if p.parity_mask is not None else 1.0)
            weights, is_metrics = importance_weights(old, behaviour, m.to(lp.device), cfg.off_policy,
                                                     segment_ids=p.row_ids.to(lp.device))
            is_metrics["is_tokens"] = m.sum().to(lp.device)
        loss, metrics = policy_loss(lp, old, p.advantages.to(lp.device), p.loss_mask.to(lp.device), cfg,
                                    ref_logprobs=ref, global_token_count=global_token_count, is_weights=weights,
                                    token_weights=None if p.loss_weights is None else p.loss_weights.to(lp.device))
        metrics = {k: v.detach().float() for k, v in {**metrics, **parity, **is_metrics}.items()}
        metrics["entropy_sum"] = (ent * p.loss_mask.to(ent.device)).sum()
        metrics["tokens"] = p.loss_mask.sum().to(lp.device)
        return loss, metrics

    reported, stats = optimizer_step(chunks, optimizer, mbs, loss_fn, device)
    if reported:
        tokens = sum(float(r["tokens"]) for r in reported)
        stats["loss"] = sum(float(r["loss"]) for r in reported)  # already divided by the global count
        if "kl" in reported[0]:
            stats["kl"] = sum(float(r["kl"]) for r in reported)
        stats["entropy"] = sum(float(r["entropy_sum"]) for r in reported) / max(tokens, 1.0)
        if old_from_forward:
            stats["abs_diff_sum"] = sum(float(r["parity_abs_diff_sum"]) for r in reported)
            stats["abs_diff_max"] = max(float(r["parity_abs_diff_max"]) for r in reported)
            stats["parity_tokens"] = sum(float(r["parity_tokens"]) for r in reported)
        for k in ("clip_frac", "approx_kl", "ratio_max", "ratio_mean", "dual_clip_frac"):
            if k in reported[0]:
                stats[k] = max(float(r[k]) for r in reported) if k == "ratio_max" else \
                    sum(float(r[k]) * float(r["tokens"]) for r in reported) / max(tokens, 1.0)
        stats.update(is_stats([r for r in reported if "is_tokens" in r]))  # over the corrected tokens
    return stats
