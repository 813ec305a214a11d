"""Generalized advantage estimation (Schulman et al. 2016) over the generated tokens of a row.

A row's trajectory is its loss tokens in order (a turn's answer; tokens the policy did not generate
are not steps). The row's scalar reward arrives on its last generated token; the episode ends there
(V after it = 0). With values V_t from the critic:

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = Σ_k (γλ)^k δ_{t+k},   R_t = A_t + V_t (the critic's target)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def gae(values: Sequence[float], reward: float, gamma: float = 1.0, lam: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) of one trajectory whose only reward comes after its last step."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    adv = np.zeros(n)
    running = 0.0
    for t in range(n - 1, -1, -1):  # backwards: A_t = δ_t + γλ·A_{t+1}
        nxt = v[t + 1] if t + 1 < n else 0.0
        r = reward if t == n - 1 else 0.0
        running = r + gamma * nxt - v[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + v


def whiten(arrays: list[np.ndarray], eps: float = 1e-6) -> list[np.ndarray]:
    """Zero-mean, unit-std over all tokens of the batch (PPO's advantage normalization)."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    if flat.size < 2:
        return [a - flat.mean() if flat.size else a for a in arrays]
    mu, sd = flat.mean(), flat.std()
    return [(a - mu) / (sd + eps) for a in arrays]
