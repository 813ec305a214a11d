"""Accuracy per data source from rollout traces: mean accuracy and avg@k (mean over questions of
the mean over that question's attempts, whether from repeat_k eval rows or n_samples)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from megatron_matpo.agents.transcript import load_traces
from megatron_matpo.data.schema import avg_at_k


def evaluate_traces(path: str | Path) -> dict[str, dict[str, float]]:
    by_source: dict[str, tuple[list[str], list[float]]] = defaultdict(lambda: ([], []))
    for row in load_traces(path):
        if row.get("parent_id") is not None or "accuracy" not in row:
            continue  # workers carry no accuracy of their own
        groups, scores = by_source[row.get("data_source", "?")]
        groups.append(row.get("sample_group") or row["group_id"])
        scores.append(float(row["accuracy"]))
    report = {}
    for src, (groups, scores) in sorted(by_source.items()):
        k = len(groups) / len(set(groups))
        report[src] = {"rollouts": float(len(scores)), "questions": float(len(set(groups))),
                       "accuracy": sum(scores) / len(scores), f"avg@{k:g}": avg_at_k(groups, scores)}
    return report
