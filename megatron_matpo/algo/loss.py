"""Policy-gradient losses: PPO clip with dual clip, loss aggregation, KL estimators, entropy.

Token tensors are either a padded batch `[B, S]` (each row is a sequence) or a packed 1-D stream
`[T]` whose sequences are given by `cu_seqlens` (`[N+1]`, cumulative lengths starting at 0) or by
`segment_ids` (`[T]`, sequence index per token; negative ids mark padding tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_matpo.algo.off_policy import OffPolicyConfig

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "rollout-mean-token-mean")
KL_KINDS = ("k1", "k3", "abs", "mse")
_MAX_LOG_RATIO = 20.0  # keeps exp() finite; such tokens are far in the clipped region anyway


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, denom: float | Tensor | None = None) -> Tensor:
    """Mean of `x` where `mask` is non-zero; `denom` overrides the mask count (e.g. a global count)."""
    m = mask.to(x.dtype)
    if dim is None:
        total = (x * m).sum()
        count = m.sum() if denom is None else torch.as_tensor(denom, dtype=x.dtype, device=x.device)
    else:
        total = (x * m).sum(dim)
        count = m.sum(dim) if denom is None else torch.as_tensor(denom, dtype=x.dtype, device=x.device)
    return total / count.clamp_min(1.0)


def _segments(x: Tensor, mask: Tensor, cu_seqlens: Tensor | None,
              segment_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(values [T], mask [T], segment index [T]) with one segment per sequence."""
    if x.dim() == 2:
        b, s = x.shape
        seg = torch.arange(b, device=x.device).repeat_interleave(s)
        return x.reshape(-1), mask.reshape(-1), seg
    if x.dim() != 1:
        raise ValueError(f"expected [B, S] or packed [T] tokens, got shape {tuple(x.shape)}")
    if segment_ids is None:
        if cu_seqlens is None:
            raise ValueError("a packed 1-D stream needs cu_seqlens or segment_ids for seq-level aggregation")
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        if int(cu_seqlens[-1]) > x.numel():
            raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens, stream has {x.numel()}")
        seg = torch.full((x.numel(),), -1, dtype=torch.long, device=x.device)
        seg[: int(cu_seqlens[-1])] = torch.arange(lens.numel(), device=x.device).repeat_interleave(lens.to(x.device))
    else:
        seg = segment_ids.to(device=x.device, dtype=torch.long)
    mask = mask * (seg >= 0).to(mask.dtype)  # padding tokens of a packed stream never count
    return x, mask, seg.clamp_min(0)


def per_sequence_sums(x: Tensor, mask: Tensor, cu_seqlens: Tensor | None = None,
                      segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(masked token sum, masked token count) per sequence."""
    vals, m, seg = _segments(x, mask, cu_seqlens, segment_ids)
    n = int(seg.max()) + 1 if seg.numel() else 0
    if cu_seqlens is not None and x.dim() == 1 and segment_ids is None:
        n = cu_seqlens.numel() - 1
    mf = m.to(vals.dtype)
    sums = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, seg, vals * mf)
    counts = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, seg, mf)
    return sums, counts


def aggregate_loss(per_token: Tensor, mask: Tensor, agg: str = "token-mean", cu_seqlens: Tensor | None = None,
                   segment_ids: Tensor | None = None, global_token_count: float | Tensor | None = None,
                   global_seq_count: float | Tensor | None = None, token_weights: Tensor | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    token-mean: sum over masked tokens / masked-token count (or `global_token_count`, so that data
    parallel ranks dividing by the global count and summing gradients get the global token mean).
    seq-mean-token-sum / seq-mean-token-mean: mean over sequences of the per-sequence token sum /
    token mean. Sequences without any masked token (padding rows) are not counted, unless
    `global_seq_count` gives the divisor.
    `token_weights` (from `row_loss_weights`, any `agg`): the masked weighted sum Σ w·loss, the form a
    packed batch split over micro-batches and DP ranks uses: the weights already hold each token's share
    of its mini-batch's mean, so the parts add up to it wherever the rows landed.
    """
    if token_weights is not None:
        return (per_token * mask.to(per_token.dtype) * token_weights.to(per_token.dtype)).sum()
    if agg == "rollout-mean-token-mean":
        raise ValueError("rollout-mean-token-mean needs token_weights (row_loss_weights): a rollout's rows are "
                         "not one sequence")
    if agg == "token-mean":
        return masked_mean(per_token, mask, denom=global_token_count)
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGG_MODES}")
    sums, counts = per_sequence_sums(per_token, mask, cu_seqlens, segment_ids)
    per_seq = sums if agg == "seq-mean-token-sum" else sums / counts.clamp_min(1.0)
    n = (counts > 0).sum().to(per_seq.dtype) if global_seq_count is None else \
        torch.as_tensor(global_seq_count, dtype=per_seq.dtype, device=per_seq.device)
    return per_seq.sum() / n.clamp_min(1.0)


def row_loss_weights(loss_tokens: list[int], agg: str, rollout_ids: list[int | None] | None = None) -> list[float]:
    """Per row of one mini-batch (all its DP ranks): the weight of each of its loss tokens such that
    Σ over the mini-batch's tokens of weight·loss is `agg`'s mean. `loss_tokens`: each row's trained
    tokens; `rollout_ids`: the rollout each row belongs to (rollout-mean: a MATPO planner sample and its
    workers share one). Rows without loss tokens, and rollouts without any, are not counted.

    token-mean 1/N (N: the mini-batch's loss tokens) · seq-mean-token-sum 1/S · seq-mean-token-mean
    1/(S·n_row) (S: rows with loss tokens) · rollout-mean-token-mean 1/(R·n_rollout) (R: rollouts with
    loss tokens, n_rollout: the loss tokens of all its rows), i.e. each full rollout's token mean,
    averaged over the rollouts (equal-sized GRPO groups: the mean over groups of the group mean).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGG_MODES}")
    if agg == "token-mean":
        n = sum(loss_tokens)
        return [1.0 / n if n else 0.0 for _ in loss_tokens]
    if agg != "rollout-mean-token-mean":
        s = sum(1 for n in loss_tokens if n > 0)
        return [0.0 if n == 0 else 1.0 / s if agg == "seq-mean-token-sum" else 1.0 / (s * n) for n in loss_tokens]
    if rollout_ids is None or any(r is None for r in rollout_ids) or len(rollout_ids) != len(loss_tokens):
        raise ValueError("loss.agg=rollout-mean-token-mean needs the rollout of every row (MATPO / single-agent "
                         "rows carry it)")
    per: dict[int, int] = {}
    for n, r in zip(loss_tokens, rollout_ids):
        per[r] = per.get(r, 0) + n
    big_r = sum(1 for v in per.values() if v > 0)
    return [1.0 / (big_r * per[r]) if per[r] else 0.0 for r in rollout_ids]


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip_c: float | None = 3.0,
                    agg: str = "token-mean", cu_seqlens: Tensor | None = None, segment_ids: Tensor | None = None,
                    global_token_count: float | Tensor | None = None,
                    global_seq_count: float | Tensor | None = None,
                    is_weights: Tensor | None = None, token_weights: Tensor | None = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with dual clip; returns (loss, metrics of detached 0-dim tensors).

    pg1 = -A·r, pg2 = -A·clip(r, 1-clip_low, 1+clip_high), loss = max(pg1, pg2); for A < 0 the
    dual clip bounds it: min(max(pg1, pg2), -c·A) (Ye et al. 2020), so a huge ratio on a bad token
    cannot blow up the update. `advantages` must broadcast to `logprobs` (see `broadcast_to_tokens`).
    Metrics: clip_frac (masked tokens where the clipped term was taken, i.e. pg2 > pg1), dual_clip_frac
    (masked tokens bounded by -c·A), approx_kl (masked mean of the k3 estimator (r-1) - log r of
    KL(old || new)), ratio_mean / ratio_max over masked tokens. `is_weights` (detached, shaped like
    `logprobs`) multiply each token's surrogate: the off-policy correction (`algo.off_policy`).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); pass None to disable")
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).expand_as(logprobs)
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_clip = torch.maximum(pg1, pg2)
    if dual_clip_c is not None:
        pg3 = -dual_clip_c * adv
        dual = (adv < 0) & (pg_clip > pg3)
        per_token = torch.where(adv < 0, torch.minimum(pg_clip, pg3), pg_clip)
    else:
        dual = torch.zeros_like(pg_clip, dtype=torch.bool)
        per_token = pg_clip
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, agg, cu_seqlens, segment_ids, global_token_count, global_seq_count,
                          token_weights)

    with torch.no_grad():
        m = mask != 0
        n = m.sum().clamp_min(1).to(logprobs.dtype)
        metrics = {
            "pg_loss": loss.detach(),
            "clip_frac": ((pg2 > pg1) & m).sum().to(logprobs.dtype) / n,
            "dual_clip_frac": (dual & m).sum().to(logprobs.dtype) / n,
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": ratio[m].max() if bool(m.any()) else torch.zeros((), dtype=ratio.dtype),
        }
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || ref) from sampled-token logprobs.

    k1 = logp - ref (unbiased, may be negative); k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased,
    >= 0, low variance); abs = |logp - ref|; mse = 0.5·(logp - ref)^2.
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k3":
        d = (-diff).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(d) - d - 1.0
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def apply_kl_to_rewards(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, loss_mask: Tensor,
                        kl_coef: float, kind: str = "k1", cu_seqlens: Tensor | None = None,
                        segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence `reward - kl_coef · Σ_t kl_t` over masked tokens; returns (new rewards, per-seq KL).

    One reward per sequence (rows of a padded batch, or sequences of a packed stream). In MATPO only
    planner rows hold rewards: the caller decides whether a worker's KL is folded into its parent's.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kind).detach()
    seq_kl, _ = per_sequence_sums(kl, loss_mask, cu_seqlens, segment_ids)
    if seq_kl.numel() != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards for {seq_kl.numel()} sequences")
    return rewards - kl_coef * seq_kl.to(rewards.dtype).reshape(rewards.shape), seq_kl


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, computed in float32: logsumexp - Σ p·logit."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = 3.0
    agg: str = "token-mean"
    kl_coef: float = 0.0  # MATPO's reference run: no KL, no reference model
    kl_kind: str = "k3"
    kl_as: str = "loss"  # "loss": added to the loss; "reward": use apply_kl_to_rewards before advantages
    entropy_coef: float = 0.0
    value_clip: float | None = 0.2  # critic (advantage.estimator=gae): PPO's value clipping range; null = off
    # importance weights engine (behaviour) -> old (proximal) logprobs on each token's surrogate
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)

    def __post_init__(self) -> None:
        if self.agg not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation {self.agg!r}; expected one of {AGG_MODES}")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"unknown KL kind {self.kl_kind!r}; expected one of {KL_KINDS}")
        if self.kl_as not in ("loss", "reward"):
            raise ValueError(f"kl_as must be 'loss' or 'reward', got {self.kl_as!r}")


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
                cfg: LossConfig | None = None, ref_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                cu_seqlens: Tensor | None = None, segment_ids: Tensor | None = None,
                global_token_count: float | Tensor | None = None,
                global_seq_count: float | Tensor | None = None,
                is_weights: Tensor | None = None,
                token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO loss (each token's surrogate times its `is_weights`, if given) + kl_coef·KL (when kl_as ==
    "loss") - entropy_coef·entropy, all aggregated alike.

    `entropy` is the per-token entropy (e.g. `entropy_from_logits`), passed in because full logits
    may be vocab-parallel or too large to keep here.
    """
    cfg = cfg or LossConfig()
    agg_kw = dict(agg=cfg.agg, cu_seqlens=cu_seqlens, segment_ids=segment_ids,
                  global_token_count=global_token_count, global_seq_count=global_seq_count,
                  token_weights=token_weights)
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, loss_mask, cfg.clip_low, cfg.clip_high,
                                    cfg.dual_clip_c, **agg_kw, is_weights=is_weights)
    if ref_logprobs is not None:
        kl_tok = kl_penalty(logprobs, ref_logprobs, cfg.kl_kind)
        kl = aggregate_loss(kl_tok, loss_mask, **agg_kw)
        metrics["kl"] = kl.detach()
        if cfg.kl_as == "loss" and cfg.kl_coef != 0.0:
            loss = loss + cfg.kl_coef * kl
    elif cfg.kl_as == "loss" and cfg.kl_coef != 0.0:
        raise ValueError("kl_coef > 0 with kl_as='loss' needs ref_logprobs")
    if entropy is not None:
        ent = aggregate_loss(entropy, loss_mask, **agg_kw)
        metrics["entropy"] = ent.detach()
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * ent
    elif cfg.entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    metrics["loss"] = loss.detach()
    return loss, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, loss_mask: Tensor, clip: float | None = 0.2,
               global_token_count: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss: 0.5·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²), token-mean.

    The clipped term keeps the critic near the values the advantages were computed with; `clip=None`
    is the plain squared error."""
    mask = loss_mask.to(values.dtype)
    err = (values - returns).square()
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_c = (clipped - returns).square()
        per_token = 0.5 * torch.maximum(err, err_c)
    else:
        err_c, per_token = err, 0.5 * err
    loss = masked_mean(per_token, mask, denom=global_token_count)
    with torch.no_grad():
        m = mask != 0
        n = m.sum().clamp_min(1).to(values.dtype)
        metrics = {"value_loss": loss.detach(), "value_clip_frac": ((err_c > err) & m).sum().to(values.dtype) / n,
                   "value_mean": masked_mean(values.detach(), mask)}
    return loss, metrics
