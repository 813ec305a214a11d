"""Advantages: GRPO within a prompt's group, and MATPO's credit assignment to worker rows.

MATPO trains planner and worker rollouts as separate rows. Only planner rows carry a reward; the
planner advantage is GRPO over the planner rollouts of one prompt, and every worker row inherits
its parent planner's advantage (the worker's contribution is judged by the planner's outcome).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ROLE_PLANNER, ROLE_WORKER, ROLE_SINGLE, ROLE_PAD = "planner", "worker", "single", "pad"


def grpo_advantages(rewards: Tensor | Sequence[float], group_ids: Sequence[Hashable], eps: float = 1e-6,
                    norm_by_std: bool = True) -> Tensor:
    """Per-group `(r - mean) / (std + eps)` with the unbiased std (correction=1), or `r - mean`.

    A group of size 1 has no baseline to compare against (and an undefined unbiased std), so its
    advantage is 0: a lone rollout carries no relative learning signal.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 1 or r.numel() != len(group_ids):
        raise ValueError(f"rewards must be 1-D with one value per group id, got {tuple(r.shape)} "
                         f"for {len(group_ids)} ids")
    index: dict[Hashable, int] = {}
    gidx = torch.tensor([index.setdefault(g, len(index)) for g in group_ids], dtype=torch.long)
    adv = torch.zeros_like(r)
    for g in range(len(index)):
        sel = gidx == g
        if int(sel.sum()) < 2:
            continue
        vals = r[sel]
        centred = vals - vals.mean()
        adv[sel] = centred / (vals.std() + eps) if norm_by_std else centred
    return adv


@dataclass
class RowMeta:
    """What credit assignment needs of one training row (a `Trajectory` has the same fields)."""
    role: str  # planner | worker | single | pad
    traj_id: str
    group_id: Hashable
    parent_id: str | None = None
    reward: float | None = None


def matpo_advantages(roles: Sequence[str], traj_ids: Sequence[str], parent_ids: Sequence[str | None],
                     group_ids: Sequence[Hashable], rewards: Sequence[float | None] | Tensor,
                     eps: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """One advantage per row.

    planner: GRPO over the planner rows of the same group; worker: its parent planner's advantage;
    single: GRPO over the single rows of the same group (the baseline); pad: 0.
    Rewards of worker and pad rows are ignored (may be None).
    """
    n = len(roles)
    if not (len(traj_ids) == len(parent_ids) == len(group_ids) == len(rewards) == n):
        raise ValueError("roles, traj_ids, parent_ids, group_ids and rewards must have the same length")
    rew = rewards.tolist() if isinstance(rewards, Tensor) else list(rewards)

    scored = [i for i, role in enumerate(roles) if role in (ROLE_PLANNER, ROLE_SINGLE)]
    for i, role in enumerate(roles):
        if role not in (ROLE_PLANNER, ROLE_WORKER, ROLE_SINGLE, ROLE_PAD):
            raise ValueError(f"row {i}: unknown role {role!r}")
    for i in scored:
        if rew[i] is None:
            raise ValueError(f"row {i} ({roles[i]} {traj_ids[i]!r}) has no reward")

    adv = torch.zeros(n, dtype=torch.float32)
    if scored:
        # key on role too, so planner and single rows never share a baseline
        keys = [(roles[i], group_ids[i]) for i in scored]
        adv[scored] = grpo_advantages([float(rew[i]) for i in scored], keys, eps=eps, norm_by_std=norm_by_std)

    planner_adv = {traj_ids[i]: adv[i] for i, role in enumerate(roles) if role == ROLE_PLANNER}
    for i, role in enumerate(roles):
        if role != ROLE_WORKER:
            continue
        parent = parent_ids[i]
        if parent not in planner_adv:
            raise ValueError(f"worker row {i} ({traj_ids[i]!r}) has parent {parent!r}, which is not a "
                             "planner row of this batch")
        adv[i] = planner_adv[parent]
    return adv


def matpo_advantages_from_rows(rows: Sequence[RowMeta | Any], eps: float = 1e-6,
                               norm_by_std: bool = True) -> Tensor:
    """`matpo_advantages` over objects with role/traj_id/parent_id/group_id/reward (RowMeta, Trajectory)."""
    return matpo_advantages([r.role for r in rows], [r.traj_id for r in rows], [r.parent_id for r in rows],
                            [r.group_id for r in rows], [r.reward for r in rows], eps=eps,
                            norm_by_std=norm_by_std)


def broadcast_to_tokens(adv_per_row: Tensor | Sequence[float], loss_masks: Sequence[Tensor]) -> list[Tensor]:
    """Each row's advantage on every token of the row, zero where the loss mask is 0."""
    adv = torch.as_tensor(adv_per_row, dtype=torch.float32)
    if adv.numel() != len(loss_masks):
        raise ValueError(f"{adv.numel()} advantages for {len(loss_masks)} rows")
    return [adv[i].to(m.device) * (torch.as_tensor(m) != 0).float() for i, m in enumerate(loss_masks)]
