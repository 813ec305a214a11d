"""Rollouts → training rows: MATPO credit assignment, parity masks and the rollout's metrics.

Every trajectory (planner, each worker, or the single agent) becomes one `Row`; worker rows carry
their parent planner's advantage (`algo.matpo_advantages`).
"""
from __future__ import annotations

import statistics
from collections import Counter
from typing import TYPE_CHECKING

from megatron_matpo.agents.workflow import Trajectory
from megatron_matpo.algo import matpo_advantages_from_rows
from megatron_matpo.train.packing import Row

if TYPE_CHECKING:
    import numpy as np


def flatten(rollouts: list[list[Trajectory]]) -> list[Trajectory]:
    return [t for r in rollouts for t in r]


def parity_mask(t: Trajectory) -> list[int]:
    """The loss mask minus tokens sampled under a grammar constraint (their engine logprobs are of
    the masked distribution, not the policy's)."""
    m = list(t.loss_mask)
    for s, e in t.constrained_spans:
        m[s:e] = [0] * (e - s)
    return m


def build_rows(rollouts: list[list[Trajectory]], eps: float = 1e-6, norm_by_std: bool = True) -> list[Row]:
    """One row per trajectory, row_id = position in `flatten(rollouts)`, rollout_id = its rollout's index
    (the planner and its workers), engine logprobs as old logprobs."""
    trajs = flatten(rollouts)
    owner = [k for k, r in enumerate(rollouts) for _ in r]
    adv = matpo_advantages_from_rows(trajs, eps=eps, norm_by_std=norm_by_std)
    return [Row(token_ids=list(t.token_ids), loss_mask=list(t.loss_mask), old_logprobs=list(t.logprobs),
                advantage=float(a), row_id=i, role=t.role, parity_mask=parity_mask(t), rollout_id=k)
            for i, (t, a, k) in enumerate(zip(trajs, adv.tolist(), owner))]


def build_rows_by_prompt(by_prompt: list[list[list[Trajectory]]], eps: float = 1e-6,
                        norm_by_std: bool = True) -> list[list[Row]]:
    """`build_rows` over [prompt][sample] → rollout, handed back per prompt: each prompt's rows (its
    planners and their workers, the GRPO group that mini-batches keep whole), row ids as in `build_rows`."""
    rows = iter(build_rows([r for group in by_prompt for r in group], eps, norm_by_std))
    return [[next(rows) for rollout in group for _ in rollout] for group in by_prompt]


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


def rollout_metrics(rollouts: list[list[Trajectory]], rows: list[Row]) -> dict[str, float]:
    """Scalars for tensorboard: reward parts, per-role lengths/tokens, workers, tools, advantages."""
    roots = [r[0] for r in rollouts]
    out: dict[str, float] = {
        "reward/mean": _mean([t.reward or 0.0 for t in roots]),
        "reward/std": statistics.pstdev([t.reward or 0.0 for t in roots]) if len(roots) > 1 else 0.0,
    }
    for key in ("accuracy", "format_planner", "format_worker_mean", "num_workers"):
        vals = [t.reward_components[key] for t in roots if key in t.reward_components]
        if vals:
            out[f"reward/{key}"] = _mean(vals)
    trajs = flatten(rollouts)
    for role in sorted({t.role for t in trajs}):
        ts = [t for t in trajs if t.role == role]
        gen = [sum(t.loss_mask) for t in ts]
        out[f"{role}/count"] = float(len(ts))
        out[f"{role}/response_tokens_mean"] = _mean(gen)
        out[f"{role}/response_tokens_max"] = float(max(gen))
        out[f"{role}/sequence_tokens_mean"] = _mean([len(t.token_ids) for t in ts])
        out[f"{role}/generated_tokens"] = float(sum(gen))
        out[f"{role}/turns_mean"] = _mean([t.turns for t in ts])
        out[f"{role}/tool_calls"] = float(sum(t.tool_calls for t in ts))
        out[f"{role}/tool_errors"] = float(sum(t.tool_errors for t in ts))
        out[f"{role}/format_score"] = _mean([t.format_score for t in ts])
        for reason, n in Counter(t.finish for t in ts).items():
            out[f"{role}/finish_{reason}"] = n / len(ts)
    if any(t.role == "planner" for t in roots):
        out["planner/workers_per_planner"] = _mean([float(len(r) - 1) for r in rollouts])
    out.update(advantage_stats(rows))
    return out


def advantage_stats(rows: list[Row]) -> dict[str, float]:
    return advantage_value_stats([r.advantage for r in rows])


def advantage_value_stats(adv: list[float]) -> dict[str, float]:
    """Statistics of scalar advantages (one per row or per turn)."""
    return {"advantage/mean": _mean(adv), "advantage/abs_mean": _mean([abs(a) for a in adv]),
            "advantage/max": max(adv, default=0.0), "advantage/min": min(adv, default=0.0),
            "advantage/nonzero_fraction": _mean([float(a != 0.0) for a in adv])}


def apply_gae(rows: list[Row], values: dict[int, "np.ndarray"], gamma: float, lam: float,
              whiten_advantages: bool = True) -> dict[str, float]:
    """PPO+GAE advantages in place: each row's critic values at its generated tokens (in order, from
    `CriticWorker.values`) and its scalar reward → per-token advantages (whitened over the batch),
    returns (the critic's targets) and old values. A row with one reward per turn (MAPoRL's merged
    turns; a turn = a maximal run of generated tokens) is one episode per turn, as if each turn were
    its own row. Returns the batch's GAE metrics."""
    import numpy as np

    from megatron_matpo.algo.gae import gae, whiten

    pos, vals, advs, rets = [], [], [], []
    for r in rows:
        p = [j for j, m in enumerate(r.loss_mask) if m]
        v = np.asarray(values[r.row_id], dtype=np.float64)
        if r.reward is None or len(v) != len(p):
            raise ValueError(f"row {r.row_id}: {len(v)} values for {len(p)} generated tokens, reward {r.reward}")
        if isinstance(r.reward, list):  # one episode per turn
            rewards = r.reward
            cuts = [0] + [k for k in range(1, len(p)) if p[k] != p[k - 1] + 1] + [len(p)]  # turn boundaries
            if len(cuts) - 1 != len(rewards):
                raise ValueError(f"row {r.row_id}: {len(rewards)} rewards for {len(cuts) - 1} runs of generated tokens")
        else:  # one episode over all its generated tokens (a multi-turn planner row too)
            rewards, cuts = [r.reward], [0, len(p)]
        parts = [gae(v[s:e], rw, gamma, lam) for s, e, rw in zip(cuts, cuts[1:], rewards)]
        a, ret = (np.concatenate([x[i] for x in parts] + [np.zeros(0)]) for i in (0, 1))
        pos.append(p), vals.append(v), advs.append(a), rets.append(ret)
    raw = np.concatenate([*advs, np.zeros(0)])  # the zeros(0): an empty batch is fine
    if whiten_advantages:
        advs = whiten(advs)
    for r, p, v, a, ret in zip(rows, pos, vals, advs, rets):
        full = [np.zeros(len(r)) for _ in range(3)]
        for f, x in zip(full, (a, ret, v)):
            f[p] = x
        r.advantage, r.returns, r.old_values = (f.tolist() for f in full)
    ret_all, v_all = np.concatenate([*rets, np.zeros(0)]), np.concatenate([*vals, np.zeros(0)])
    ev = (1.0 - float(np.var(ret_all - v_all)) / float(np.var(ret_all))
          if ret_all.size > 1 and np.var(ret_all) > 0 else 0.0)
    return {"gae/advantage_mean": _mean(raw.tolist()), "gae/advantage_abs_mean": _mean(np.abs(raw).tolist()),
            "gae/return_mean": _mean(ret_all.tolist()), "gae/value_mean": _mean(v_all.tolist()),
            "gae/explained_variance": ev}
