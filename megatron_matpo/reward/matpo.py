"""MATPO's reward for a planner rollout, and the single-agent baseline's.

MATPO (planner rows only; worker rows get no reward of their own, they inherit the advantage):

    R = 0.9 * acc + 0.5 * (0.1 * fmt_planner + mean_workers(0.1 * fmt_worker))

- `fmt_*` is `format_score` of that agent's assistant turns (valid blocks / blocks, 1.0 when none).
- No workers (the planner never delegated, or every delegation failed to parse): the worker term
  is 0.1 * 1.0. This extends MATPO's "format is 1.0 when there are no blocks" convention: zero
  workers wrote zero blocks. So a direct answer scores 0.9*acc + 0.05*fmt_planner + 0.05, and
  the planner's format weight never depends on whether it delegated.
- Maximum 1.0 (acc = 1, all formats 1).

Single-agent baseline (MATPO.md gives no formula; ours keeps the same weights and the same
maximum): R = 0.9 * acc + 0.1 * fmt, i.e. the MATPO formula with the agent as its own worker.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_matpo.agents.toolcall import format_score
from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS, WORKER_TOOLS, ToolSpec

ACC_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1
ROLE_WEIGHT = 0.5   # planner and worker format terms share the format budget equally
NO_WORKER_FORMAT = 1.0


@dataclass(frozen=True)
class RewardBreakdown:
    total: float
    accuracy: float
    format_planner: float                # the single agent's own format in the baseline
    format_worker_mean: float | None     # None for the single-agent baseline
    num_workers: int

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        out = {f"{prefix}total": self.total, f"{prefix}accuracy": self.accuracy,
               f"{prefix}format_planner": self.format_planner, f"{prefix}num_workers": float(self.num_workers)}
        if self.format_worker_mean is not None:
            out[f"{prefix}format_worker_mean"] = self.format_worker_mean
        return out


def _unit(name: str, x: float) -> float:
    x = float(x)
    if not (0.0 <= x <= 1.0) or math.isnan(x):
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def matpo_reward(accuracy: float, format_planner: float, format_workers: Sequence[float]) -> RewardBreakdown:
    acc, fp = _unit("accuracy", accuracy), _unit("format_planner", format_planner)
    fws = [_unit("format_worker", f) for f in format_workers]
    fw = sum(fws) / len(fws) if fws else NO_WORKER_FORMAT
    total = ACC_WEIGHT * acc + ROLE_WEIGHT * (FORMAT_WEIGHT * fp + FORMAT_WEIGHT * fw)
    return RewardBreakdown(total, acc, fp, fw, len(fws))


def single_agent_reward(accuracy: float, format_agent: float) -> RewardBreakdown:
    acc, f = _unit("accuracy", accuracy), _unit("format_agent", format_agent)
    return RewardBreakdown(ACC_WEIGHT * acc + FORMAT_WEIGHT * f, acc, f, None, 0)


def matpo_reward_from_turns(accuracy: float, planner_turns: Sequence[str], worker_turns: Sequence[Sequence[str]],
                            planner_tools: Sequence[ToolSpec] = PLANNER_TOOLS,
                            worker_tools: Sequence[ToolSpec] = WORKER_TOOLS) -> RewardBreakdown:
    """`planner_turns`: the planner's assistant messages; `worker_turns`: one list per worker."""
    return matpo_reward(accuracy, format_score(planner_turns, planner_tools),
                        [format_score(w, worker_tools) for w in worker_turns])


def single_agent_reward_from_turns(accuracy: float, turns: Sequence[str],
                                   tools: Sequence[ToolSpec] = SINGLE_AGENT_TOOLS) -> RewardBreakdown:
    return single_agent_reward(accuracy, format_score(turns, tools))
