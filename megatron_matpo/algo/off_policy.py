"""Off-policy correction: importance weights between the policy that sampled each token and the one
the PPO ratio is taken against.

Three policies meet in one update (decoupled PPO, Hilton et al. 2021; AReaL): the behaviour policy μ
that generated the token (the engine's sampling logprobs, carried by the trajectory), the proximal
policy π_prox the ratio is clipped around (the recomputed old logprobs, or the update's own first
forward), and the policy π being trained. The surrogate of a token becomes

    w · ppo(π / π_prox),    w = π_prox / μ  (detached)

so PPO's trust region stays around π_prox while w corrects for having sampled from μ: an engine a
few policy versions behind (asynchronous rollouts) or one whose numerics differ from the trainer's
(bf16 kernels, at any staleness). Modes:

- `tis`: truncated IS, w = min(π_prox/μ, c) (slime's --use-tis; veRL's rollout correction);
- `mis`: masked IS, w = π_prox/μ inside [low, high], 0 outside (the token is dropped from the loss;
  the loss's denominator, the global token count, is unchanged, so a dropped token weighs as a
  zero-advantage one);
- level `sequence`: one weight per sequence, exp(Σ_t log(π_prox/μ)) over its corrected tokens, then
  truncated / masked as a whole.

Only tokens sampled from the engine's unconstrained distribution are corrected (`mask`): under
constrained decoding (a regex) μ is the masked distribution, and its ratio to π says nothing about
staleness; those tokens keep w = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence")
_MAX_LOG_W = 20.0  # keeps exp() finite; such weights are truncated or masked anyway


@dataclass
class OffPolicyConfig:
    mode: str = "none"  # none | tis | mis
    level: str = "token"  # token | sequence
    c: float = 2.0  # tis: the truncation
    low: float = 0.5  # mis: weights outside [low, high] drop their tokens (sequences)
    high: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if not self.c >= 1.0:
            raise ValueError(f"c (the TIS truncation) must be >= 1, got {self.c}")
        if not 0.0 <= self.low <= 1.0 <= self.high:
            raise ValueError(f"low/high must satisfy 0 <= low <= 1 <= high, got [{self.low}, {self.high}]")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def importance_weights(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cfg: OffPolicyConfig,
                       segment_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(w, metrics): the detached per-token weights (1 outside `mask`) and, over the masked tokens,
    is_ratio_mean / is_ratio_max (π_prox/μ before truncation or masking; per sequence at level
    `sequence`, each of its tokens carrying it), is_truncated_frac (tis) and is_masked_frac (mis).

    Tensors have one shape: a padded batch [B, S] (level `sequence`: one sequence per row) or a
    packed stream, with `segment_ids` giving each token's sequence (negative: padding)."""
    with torch.no_grad():
        m = mask.to(torch.bool)
        if segment_ids is not None:  # padding tokens of a packed stream are never corrected
            m = m & (segment_ids.to(m.device) >= 0).expand_as(m)
        log_w = torch.where(m, (prox_logprobs.float() - behaviour_logprobs.float()), 0.0)
        if cfg.level == "sequence":  # each token carries its sequence's summed log-weight
            from megatron_matpo.algo.loss import _segments, per_sequence_sums  # loss.py imports this module

            seg = None if segment_ids is None else segment_ids.to(log_w.device).expand_as(log_w).reshape(-1)
            x = log_w if seg is None else log_w.reshape(-1)  # [B, S]: a sequence per row; else packed by `seg`
            sums, _ = per_sequence_sums(x, m.reshape(x.shape), segment_ids=seg)
            _, _, owner = _segments(x, m.reshape(x.shape), None, seg)
            log_w = torch.where(m, sums[owner].reshape(log_w.shape), 0.0)
        raw = torch.exp(log_w.clamp(-_MAX_LOG_W, _MAX_LOG_W))
        zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
        count = m.sum().clamp_min(1).to(raw.dtype)
        metrics = {"is_ratio_mean": torch.where(m, raw, zero).sum() / count,
                   "is_ratio_max": raw[m].max() if bool(m.any()) else zero}
        if cfg.mode == "tis":
            over = (raw > cfg.c) & m
            w = raw.clamp(max=cfg.c)
            metrics["is_truncated_frac"] = over.sum().to(raw.dtype) / count
        elif cfg.mode == "mis":
            out = ((raw < cfg.low) | (raw > cfg.high)) & m
            w = torch.where(out, zero, raw)
            metrics["is_masked_frac"] = out.sum().to(raw.dtype) / count
        else:
            w = raw
        w = torch.where(m, w, torch.ones_like(w))
    return w.to(prox_logprobs.dtype), metrics
