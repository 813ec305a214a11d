"""MAPoRL rewards per (round, agent): the influence-aware verification reward plus incentives.

Notation: N agents, rounds t = 0..x where x is the last round actually played (a discussion that
stops early on consensus has x < T-1), v[t, i] in [0, 1] the verifier's score of agent i's answer
at round t, c[t, i] = v[t, i] >= threshold ("right"), a[t, i] its extracted final answer.

Influence-aware verification reward (MAPoRL, gamma = 0.3 in the reference code):

    R[t, i] = ( v[t, i] + sum_{t'=t+1..x} gamma^(t'-t) * mean_j v[t', j] ) / sum_{t'=t..x} gamma^(t'-t)

A turn is credited with its own score plus the discounted team score of the rounds it influenced;
the normaliser keeps R in the range of v. `mean_j` runs over ALL agents, agent i included: that is
the reference code (rule "discounted_sum" with agent share "all" sums the future scores of every
agent and divides by the number of agents), and the formula as written sets no j != i.
The horizon stops at the last round played, so an early stop does not dilute earlier rewards.

Incentives, added to R (weights >= 0; a penalty is subtracted). For t >= 1:
- corrective  (+w.corrective): c[t-1, i] = 0 and c[t, i] = 1: agent i fixed its own answer.
- regress     (-w.regress):    c[t-1, i] = 1 and c[t, i] = 0: agent i abandoned a right answer.
For t < x, over the other agents j != i, each counting 1/(N-1) (the fraction of others moved):
- persuasion  (+w.persuasion): c[t, i] = 1, c[t, j] = 0, c[t+1, j] = 1 and j adopted i's answer.
- misleading  (-w.misleading): c[t, i] = 0, c[t, j] = 1, c[t+1, j] = 0 and j adopted i's answer.
"j adopted i's answer" means a[t+1, j] equals a[t, i] and a[t, j] did not (answers compared like
the verifier does: numbers within a tolerance, else normalized text). Without answers (e.g. a
reward-model verifier on free text) adoption is not checked and the correctness flip alone counts.
The persuasion terms are credited to round t, the turn the others saw before they changed.

The reference code has four alpha weights that split the own-change cases by whether the others
were right (alpha0: following them, alpha1: on one's own), and a persuasion branch (beta0, beta1)
whose signs add a bonus when the others go from right to wrong and subtract one when they go from
wrong to right; here the terms follow the paper's stated intent (reward corrective and persuasive
discussion, penalise the reverse).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_matpo.maporl.answers import Tolerance, answers_match


@dataclass(frozen=True)
class IncentiveWeights:
    corrective: float = 0.0
    regress: float = 0.0
    persuasion: float = 0.0
    misleading: float = 0.0

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if v < 0:
                raise ValueError(f"incentive weight {k} must be >= 0 (penalties are subtracted), got {v}")


@dataclass(frozen=True)
class RewardConfig:
    gamma: float = 0.3
    threshold: float = 0.5             # v >= threshold counts as a right answer for the incentives
    incentives: IncentiveWeights = IncentiveWeights()
    tol: Tolerance = Tolerance()

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


@dataclass
class RewardBreakdown:
    """All [rounds played, N] tensors; total = influence + corrective - regress + persuasion - misleading."""
    influence: Tensor
    corrective: Tensor
    regress: Tensor
    persuasion: Tensor
    misleading: Tensor

    @property
    def total(self) -> Tensor:
        return self.influence + self.corrective - self.regress + self.persuasion - self.misleading

    def components(self, t: int, i: int) -> dict[str, float]:
        return {"influence": float(self.influence[t, i]), "corrective": float(self.corrective[t, i]),
                "regress": float(self.regress[t, i]), "persuasion": float(self.persuasion[t, i]),
                "misleading": float(self.misleading[t, i])}


def _scores(scores: Tensor | Sequence[Sequence[float]]) -> Tensor:
    v = torch.as_tensor(scores, dtype=torch.float64)
    if v.dim() != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise ValueError(f"scores must be [rounds, agents] with at least one of each, got {tuple(v.shape)}")
    return v


def influence_aware_rewards(scores: Tensor | Sequence[Sequence[float]], gamma: float = 0.3) -> Tensor:
    """R[t, i] for the rounds played (`scores` is [rounds played, N]); see the module docstring."""
    v = _scores(scores)
    rounds = v.shape[0]
    team = v.mean(dim=1)  # mean_j v[t', j], agent i included
    out = torch.empty_like(v)
    for t in range(rounds):
        w = torch.tensor([gamma ** (tp - t) for tp in range(t, rounds)], dtype=v.dtype)
        future = (w[1:] * team[t + 1:]).sum()
        out[t] = (v[t] + future) / w.sum()
    return out.float()


def incentive_terms(scores: Tensor | Sequence[Sequence[float]], weights: IncentiveWeights,
                    answers: Sequence[Sequence[str | None]] | None = None, threshold: float = 0.5,
                    tol: Tolerance = Tolerance()) -> dict[str, Tensor]:
    """The four incentive terms, each [rounds played, N] and >= 0 (the sign is in `RewardBreakdown.total`)."""
    v = _scores(scores)
    rounds, n = v.shape
    if answers is not None and (len(answers) != rounds or any(len(r) != n for r in answers)):
        raise ValueError(f"answers must be [{rounds}][{n}] like the scores")
    c = v >= threshold
    terms = {k: torch.zeros(rounds, n) for k in ("corrective", "regress", "persuasion", "misleading")}

    def adopted(t: int, j: int, i: int) -> bool:
        if answers is None:
            return True
        return answers_match(answers[t + 1][j], answers[t][i], tol) and not answers_match(answers[t][j],
                                                                                           answers[t][i], tol)

    for t in range(rounds):
        for i in range(n):
            if t >= 1:
                if not c[t - 1, i] and c[t, i]:
                    terms["corrective"][t, i] = weights.corrective
                if c[t - 1, i] and not c[t, i]:
                    terms["regress"][t, i] = weights.regress
            if t + 1 < rounds and n > 1:
                for j in range(n):
                    if j == i:
                        continue
                    if c[t, i] and not c[t, j] and c[t + 1, j] and adopted(t, j, i):
                        terms["persuasion"][t, i] += weights.persuasion / (n - 1)
                    if not c[t, i] and c[t, j] and not c[t + 1, j] and adopted(t, j, i):
                        terms["misleading"][t, i] += weights.misleading / (n - 1)
    return terms


def maporl_rewards(scores: Tensor | Sequence[Sequence[float]], cfg: RewardConfig = RewardConfig(),
                   answers: Sequence[Sequence[str | None]] | None = None) -> RewardBreakdown:
    """Influence-aware reward plus incentives for every (round, agent) of one discussion."""
    terms = incentive_terms(scores, cfg.incentives, answers, cfg.threshold, cfg.tol)
    return RewardBreakdown(influence=influence_aware_rewards(scores, cfg.gamma), **terms)
