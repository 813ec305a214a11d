"""Benchmark plumbing without processes or engines (no timing assertions): the critical path built
from per-call timing records, the step-breakdown arithmetic and the markdown rendering between
markers. (That a real rollout records those timings is tests/test_workflow.py.)"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from async_pipeline import summarize  # noqa: E402
from matpo_vs_single import summarize as compare_arms  # noqa: E402
from rollout_overlap import critical_path  # noqa: E402
from step_breakdown import breakdown  # noqa: E402


def _ev(kind, turn, start, end):
    return {"kind": kind, "turn": turn, "start": start, "end": end}


def test_critical_path_takes_the_longest_worker_of_each_turn():
    # planner: generate [0,1], two delegations in turn 0, generate [5,6] in turn 1
    planner = SimpleNamespace(timings=[_ev("generate", 0, 0, 1), _ev("agent", 0, 1, 5), _ev("agent", 0, 1, 4),
                                       _ev("generate", 1, 5, 6)])
    a = SimpleNamespace(timings=[_ev("generate", 0, 1.0, 2), _ev("tool", 0, 2, 3), _ev("generate", 1, 3, 5)])  # 4 s
    b = SimpleNamespace(timings=[_ev("generate", 0, 1.1, 2), _ev("tool", 0, 2, 2.5), _ev("generate", 1, 2.5, 4)])
    assert critical_path(planner, [a, b]) == pytest.approx(1 + 4 + 1)
    # nominal tool latency instead of the measured one: worker a = 1 + 0.5 + 2
    assert critical_path(planner, [a, b], tool_s=0.5) == pytest.approx(1 + 3.5 + 1)
    # workers one after another: same critical path (it is what concurrency could reach)
    b_late = SimpleNamespace(timings=[_ev("generate", 0, 5.0, 6), _ev("tool", 0, 6, 6.5), _ev("generate", 1, 6.5, 8)])
    seq = SimpleNamespace(timings=[_ev("generate", 0, 0, 1), _ev("agent", 0, 1, 5), _ev("agent", 0, 5, 8),
                                   _ev("generate", 1, 8, 9)])
    assert critical_path(seq, [a, b_late]) == pytest.approx(1 + 4 + 1)


def test_step_breakdown_overhead_is_step_minus_stages():
    recs = [{"step": 1, "time": 100.0, "time/step_s": 10.0, "time/rollout_s": 6.0, "time/train_s": 3.0},
            {"step": 2, "time": 110.5, "time/step_s": 10.0, "time/rollout_s": 5.0, "time/train_s": 4.5,
             "time/sync_s": 0.3, "sync/seconds": 0.25}]
    b = breakdown(recs, Path("/nonexistent"))
    assert b["steady_steps"] == [2]
    assert b["mean_overhead_s"] == pytest.approx(0.2) and b["overhead_share"] == pytest.approx(0.02)
    assert b["share"]["rollout"] == pytest.approx(0.5) and b["target_met"]
    assert b["steps"][1]["between_steps_s"] == pytest.approx(0.5)
    assert b["steps"][1]["sync_ray_roundtrip_s"] == pytest.approx(0.05)


def test_async_pipeline_summary_by_hand():
    # steps logged at t = 0, 10, 18, 28 (step 1 began at -8): intervals 10, 8, 10 (median 10); rollouts waited
    # 1, 2, 0 s of them; busy over the 36 s from step 1's start: rollouts 6 + 7 + 6 + 8, actor 2 + 7 + 6 + 8
    recs = [{"time": 0.0, "time/step_s": 8.0, "time/rollout_s": 6.0, "time/train_s": 1.5, "time/sync_s": 0.5,
             "async/staleness": 0},
            {"time": 10.0, "time/rollout_s": 1.0, "async/rollout_s": 7.0, "time/train_s": 6.0, "time/sync_s": 1.0,
             "async/staleness": 1},
            {"time": 18.0, "time/rollout_s": 2.0, "async/rollout_s": 6.0, "time/train_s": 5.0, "time/sync_s": 1.0,
             "async/staleness": 1},
            {"time": 28.0, "time/rollout_s": 0.0, "async/rollout_s": 8.0, "time/train_s": 7.0, "time/sync_s": 1.0,
             "async/staleness": 1}]
    s = summarize(recs)
    assert s["step_s"] == 10.0 and s["rollout_s"] == 1.0 and s["rest_s"] == 9.0  # 9, 6, 10
    assert s["engine_busy"] == pytest.approx(27 / 36) and s["actor_busy"] == pytest.approx(23 / 36)
    assert s["staleness"] == [0, 1, 1, 1]


def test_matpo_vs_single_summary_by_hand():
    """Before = each run's first eval (step 0), after = its last; the verdicts compare the arms' means
    after RL and their spreads over seeds."""
    def run(arm, seed, *accs):
        return {"arm": arm, "seed": seed, "curve": {str(2 * i): a for i, a in enumerate(accs)}}

    runs = [run("matpo", 0, 0.4, 0.5, 0.45), run("single", 0, 0.2, 0.1, 0.3),
            run("matpo", 1, 0.4, 0.4, 0.35), run("single", 1, 0.2, 0.2, 0.1)]
    s = compare_arms(runs)
    assert s["matpo"]["before"] == [0.4, 0.4] and s["matpo"]["after"] == [0.45, 0.35]
    assert s["matpo"]["rise_mean"] == pytest.approx(0.0) and s["matpo"]["after_spread"] == pytest.approx(0.1)
    assert s["single"]["after_mean"] == pytest.approx(0.2) and s["single"]["rise_mean"] == pytest.approx(0.0)
    assert s["matpo_above_single"] and s["matpo_more_stable"]  # 0.40 > 0.20; spread 0.10 <= 0.20
    s = compare_arms([dict(r, curve={"0": 0.1, "4": 0.1}) if r["arm"] == "matpo" else r for r in runs])
    assert not s["matpo_above_single"] and s["matpo_more_stable"]  # 0.10 < 0.20 after RL; spread 0 <= 0.20


def test_report_renders_between_markers_only(tmp_path):
    import json

    from report import render

    (tmp_path / "packing.json").write_text(json.dumps({
        "meta": {"date": "2026-01-01", "machine": "m", "versions": {"python": "3.12"}, "commit": "c"},
        "targets": {"real_token_fraction": 0.98, "dp_imbalance": 1.05},
        "rows": [{"seed": 0, "rows": 10, "packed_fraction": 1.0, "padded_fraction": 0.5, "ratio": 2.0,
                  "packed_imbalance": 1.0, "padded_imbalance": 1.2, "pack_s": 0.1}]}))
    doc = "keep\n<!-- BEGIN packing -->\nold\n<!-- END packing -->\nkeep too\n<!-- BEGIN weight_sync -->\nstays\n<!-- END weight_sync -->\n"
    new, done = render(doc, tmp_path)
    assert done == ["packing"]  # no weight_sync result: that section keeps its content
    assert "old" not in new and "| 0 | 10 | **1.0000** |" in new and "**met**" in new
    assert new.startswith("keep\n") and "keep too\n" in new and "stays" in new
