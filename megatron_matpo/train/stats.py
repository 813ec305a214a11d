"""Reducing what the actor ranks report into step metrics (plain dicts, no Ray or Megatron here)."""
from __future__ import annotations

from megatron_matpo.train.packing import Row


def prefixed(prefix: str, d: dict) -> dict[str, float]:
    """Scalars of `d` under `prefix/` (lists and other non-numbers are dropped)."""
    return {f"{prefix}/{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def split_even(items: list, k: int) -> list[list]:
    """`items` in order into k contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), k)
    out, i = [], 0
    for c in range(k):
        n = q + (c < r)
        out.append(items[i:i + n])
        i += n
    return out


def parity_stats(reports: list[dict]) -> dict[str, float]:
    """Train/rollout logprob agreement over every unconstrained generated token of the batch."""
    n = sum(r["tokens"] for r in reports)
    return {"train_rollout_logprob_abs_diff": sum(r["abs_diff_sum"] for r in reports) / max(n, 1.0),
            "train_rollout_logprob_abs_diff_max": max((r["abs_diff_max"] for r in reports), default=0.0),
            "train_rollout_logprob_tokens": n}


def kl_stats(reports: list[dict]) -> dict[str, float]:
    n = sum(r["tokens"] for r in reports)
    return {"actor/ref_kl": sum(r["kl_sum"] for r in reports) / max(n, 1.0)}


_SUMMED = ("loss", "kl")
_PER_ROLE = ("pg_term_", "loss_tokens_")  # + role: summed like the loss
_TOKEN_MEANS = ("clip_frac", "approx_kl", "ratio_mean", "dual_clip_frac", "entropy")


def train_stats(per_rank: list[list[dict]], reports: list[bool]) -> dict[str, float]:
    """`per_rank[rank][mini_batch]` → step metrics. Loss-like terms are already normalized by the
    global token count, so they add over DP ranks; ratios are token-weighted; grad norm and lr are
    the same on every rank (rank 0's); the last mini-batch's lr is reported."""
    out: dict[str, float] = {}
    minis = len(per_rank[0])
    rank0 = per_rank[0]
    out["actor/grad_norm"] = sum(s["grad_norm"] for s in rank0) / minis
    out["actor/steps_skipped"] = sum(s["step_skipped"] for s in rank0)
    out["actor/lr"] = rank0[-1]["lr"]
    if "lr_output_layer" in rank0[-1]:
        out["actor/lr_output_layer"] = rank0[-1]["lr_output_layer"]
    rep = [stats for stats, r in zip(per_rank, reports) if r]
    per_role = sorted({k for ranks in rep for s in ranks for k in s if k.startswith(_PER_ROLE)})
    for k in (*_SUMMED, *per_role):
        vals = [s[k] for ranks in rep for s in ranks if k in s]
        if vals:
            out[f"actor/{k}"] = sum(vals) / (minis if k in _SUMMED else 1)
    tok = [(sum(v for k, v in s.items() if k.startswith("loss_tokens_")), s) for ranks in rep for s in ranks]
    total = sum(n for n, _ in tok)
    for k in _TOKEN_MEANS:
        if any(k in s for _, s in tok):
            out[f"actor/{k}"] = sum(n * s.get(k, 0.0) for n, s in tok) / max(total, 1.0)
    ratio_max = [s["ratio_max"] for _, s in tok if "ratio_max" in s]
    if ratio_max:
        out["actor/ratio_max"] = max(ratio_max)
    out.update(prefixed("actor", is_stats([s for _, s in tok if "is_tokens" in s])))
    return out


def is_stats(reports: list[dict]) -> dict[str, float]:
    """The off-policy correction's metrics (loss.off_policy) over several reports (micro-batches on a rank,
    then mini-batches and DP ranks): weighted by the corrected tokens each saw, which are not the loss
    tokens (constrained tokens keep weight 1 and are not counted); the ratio's max is the max."""
    if not reports:
        return {}
    n = sum(float(r["is_tokens"]) for r in reports)
    out = {"is_tokens": n, "is_ratio_max": max(float(r["is_ratio_max"]) for r in reports)}
    for k in ("is_ratio_mean", "is_truncated_frac", "is_masked_frac"):
        if any(k in r for r in reports):
            out[k] = sum(float(r.get(k, 0.0)) * float(r["is_tokens"]) for r in reports) / max(n, 1.0)
    return out


def parity_sample(rows: list[Row], k: int) -> list[list[int]]:
    """Up to k sequences for the engine-vs-actor check: the first row of each role, then in order."""
    firsts, seen = [], set()
    for r in rows:
        if r.role not in seen:
            seen.add(r.role)
            firsts.append(r)
    rest = [r for r in rows if all(r is not f for f in firsts)]
    return [list(r.token_ids) for r in (firsts + rest)[:k]]


def critic_stats(per_rank: list[list[dict]], reports: list[bool]) -> dict[str, float]:
    """The critic's `per_rank[rank][mini_batch]` → metrics: value loss (normalized by the global token
    count, so it adds over DP ranks; mean over mini-batches), token-weighted clip fraction and value."""
    rank0, minis = per_rank[0], len(per_rank[0])
    out = {"critic/grad_norm": sum(s["grad_norm"] for s in rank0) / minis, "critic/lr": rank0[-1]["lr"]}
    rep = [s for stats, r in zip(per_rank, reports) if r for s in stats if "tokens" in s]
    tokens = max(sum(s["tokens"] for s in rep), 1.0)
    out["critic/value_loss"] = sum(s["value_loss"] for s in rep) / minis
    for k in ("value_clip_frac", "value_mean"):
        out[f"critic/{k}"] = sum(s[k] * s["tokens"] for s in rep) / tokens
    return out
