"""What one training step rolls out: the seam between the loop (trainer.py) and an algorithm.

A task turns a batch of prompts into each policy's training rows, grouped by prompt, plus the
rollout's metrics (`rollout`), and runs evaluation on held-out prompts (`evaluate`). The grouping is
structural: the runner returns rollouts per prompt (`RolloutSession.run_by_prompt`) and a prompt's
rows stay together (`train.rows.build_rows_by_prompt`), because mini-batches split whole GRPO
groups. The loop never branches on the algorithm; `trainer.make_task` does, once, at bring-up.

  MatpoTask    planner + workers (or the single agent) on the engines and tool server; rewards;
               GRPO advantages that workers inherit from their planner (`train.rows.build_rows`)
  MaporlRollout  (maporl/task.py) discussions, verifier, influence-aware rewards, GRPO per
               (question, agent, round), rows routed to each agent's policy
"""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Protocol

from megatron_matpo.train.packing import Row
from megatron_matpo.data.schema import Sample


@dataclasses.dataclass
class StepRollout:
    groups: list[list[list[Row]]]  # [policy][prompt] → that prompt's rows for that policy
    metrics: dict[str, float]


class RolloutTask(Protocol):
    def rollout(self, batch: list[Sample], out_path: Path, uid_prefix: str,
                seed: int | None) -> StepRollout: ...

    def evaluate(self, samples: list[Sample], out_path: Path, tag: str, n_samples: int | None,
                 temperature: float | None = None) -> dict[str, float]: ...

    def close(self) -> None: ...


class MatpoTask:
    """MATPO (or the single-agent baseline) over a started `RolloutSession`, which it closes."""

    def __init__(self, session, eps: float = 1e-6, norm_by_std: bool = True):
        self.session, self.eps, self.norm_by_std = session, eps, norm_by_std

    def rollout(self, batch: list[Sample], out_path: Path, uid_prefix: str, seed: int | None) -> StepRollout:
        from megatron_matpo.train.rows import build_rows_by_prompt, rollout_metrics

        by_prompt = asyncio.run(self.session.run_by_prompt(batch, out_path, progress=False, seed=seed,
                                                           uid_prefix=uid_prefix))
        per_prompt = build_rows_by_prompt(by_prompt, self.eps, self.norm_by_std)
        metrics = rollout_metrics([r for group in by_prompt for r in group], [r for p in per_prompt for r in p])
        return StepRollout([per_prompt], metrics)

    def evaluate(self, samples: list[Sample], out_path: Path, tag: str, n_samples: int | None,
                 temperature: float | None = None) -> dict[str, float]:
        """Accuracy (and the rest of `evaluate_traces`) per data source, from the transcripts written.
        `temperature` replaces the rollouts' own (None: keep it)."""
        from megatron_matpo.rollout.evaluate import evaluate_traces

        asyncio.run(self.session.run(samples, out_path, progress=False, n_samples=n_samples, uid_prefix=f"{tag}:",
                                     temperature=temperature))
        return {f"eval/{src}/{k}": v for src, m in evaluate_traces(out_path).items() for k, v in m.items()}

    def close(self) -> None:
        self.session.__exit__(None, None, None)
