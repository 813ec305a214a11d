"""The rollout pipeline's schedule (train/pipeline.py) with a produce function of plain Python: which
policy version each step's rollout sees, the staleness bound, rollouts overlapping a step's training,
syncs and evals that never overlap a rollout, errors handed to the loop. The real rollouts through it
are the end-to-end worlds' (tests/test_maporl_train.py runs one at async.max_staleness=1)."""
from __future__ import annotations

import threading

import pytest

from megatron_matpo.train.packing import Row
from megatron_matpo.train.pipeline import AheadRollouts, ReadyRollout, SyncRollouts, rollouts_for
from megatron_matpo.train.tasks import StepRollout

WAIT = 30.0  # seconds before a test fails instead of hanging


class Producer:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, int]] = []  # (step, version) in the order rollouts started
        self.in_flight = threading.Event()
        self.started = {}  # step -> Event, set when its rollout starts
        self.release = {}  # step -> Event the rollout waits for (None: returns at once)
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def event(self, table: dict, step: int) -> threading.Event:
        with self.lock:
            return table.setdefault(step, threading.Event())

    def __call__(self, step: int, version: int) -> ReadyRollout:
        self.calls.append((step, version))
        self.in_flight.set()
        try:
            self.event(self.started, step).set()
            if step in self.release:
                assert self.release[step].wait(WAIT)
            if step == self.fail_at:
                raise RuntimeError(f"engine died in step {step}")
            rows = [[[Row([0] * 5, [1] * 5, [0.0] * 5, 1.0) for _ in range(3)]]]  # 1 policy, 1 prompt, 3 rows of 5
            return ReadyRollout(step, StepRollout(rows, {}), version, {"index": step}, 0.0)
        finally:
            self.in_flight.clear()


def loop(rollouts, steps: int, first: int = 1, on_train=None) -> list[ReadyRollout]:
    """The trainer's order: get → train → sync (exclusive) → synced."""
    got = []
    for step in range(first, steps + 1):
        r = rollouts.get(step)
        got.append(r)
        if on_train:
            on_train(step)
        with rollouts.exclusive():
            assert not rollouts_busy(rollouts), f"a rollout was in flight during step {step}'s sync"
            rollouts.synced(step)
    rollouts.close()
    return got


def rollouts_busy(rollouts) -> bool:
    return getattr(rollouts, "busy", False)


def test_staleness_zero_is_the_synchronous_loop():
    p = Producer()
    r = rollouts_for(0, p, version=0, first_step=1, last_step=4)
    assert isinstance(r, SyncRollouts)
    got = loop(r, 4)
    assert p.calls == [(1, 0), (2, 1), (3, 2), (4, 3)]  # each on the weights of the step before
    assert [g.staleness for g in got] == [0, 0, 0, 0]
    assert got[1].metrics()["async/staleness"] == 0.0 and got[1].metrics()["async/tokens_staleness_0"] == 15.0


def test_staleness_one_rolls_out_the_next_step_while_this_one_trains():
    p = Producer()

    def train(step: int) -> None:  # the next step's rollout starts while this step trains, on the old weights
        if step < 5:
            assert p.event(p.started, step + 1).wait(WAIT), f"step {step + 1}'s rollout did not start in step {step}"

    got = loop(AheadRollouts(p, 0, 1, 5, max_staleness=1), 5, on_train=train)
    assert p.calls == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert [g.staleness for g in got] == [0, 1, 1, 1, 1]
    assert got[2].metrics()["async/tokens_staleness_1"] == 15.0 and got[2].metrics()["async/policy_version"] == 1.0
    # every row (each of its tokens) carries the version that sampled it
    versions = [sorted({r.policy_version for p in g.out.groups for q in p for r in q}) for g in got]
    assert versions == [[0], [0], [1], [2], [3]]


def test_the_bound_holds_at_staleness_two_and_a_resume_starts_from_its_version():
    p = Producer()
    seen = []

    def train(step: int) -> None:  # rollouts run ahead only as far as the bound allows
        seen.append((step, [s for s, _ in p.calls]))

    got = loop(AheadRollouts(p, 4, 5, 9, max_staleness=2), 9, first=5, on_train=train)  # resumed at step 4
    assert all(step - 1 - version <= 2 for step, version in p.calls)
    assert [g.step for g in got] == [5, 6, 7, 8, 9]
    assert all(max(started) <= step + 2 for step, started in seen)
    assert got[0].staleness == 0 and max(g.staleness for g in got) <= 2


def test_a_sync_waits_for_the_rollout_in_flight_and_holds_back_the_next():
    p = Producer()
    p.release[2] = threading.Event()
    r = AheadRollouts(p, 0, 1, 3, max_staleness=1)
    r.get(1)
    assert p.event(p.started, 2).wait(WAIT)
    entered = threading.Event()

    def sync() -> None:
        with r.exclusive():
            entered.set()
            assert not p.in_flight.is_set()
            r.synced(1)

    t = threading.Thread(target=sync)
    t.start()
    assert not entered.wait(0.2)  # step 2's rollout is still in flight: the sync waits (drain)
    p.release[2].set()
    t.join(WAIT)
    assert entered.is_set() and r.get(2).version == 0
    r.close()


def test_a_failed_rollout_reaches_the_loop_and_stops_the_producer():
    p = Producer(fail_at=2)
    r = AheadRollouts(p, 0, 1, 4, max_staleness=1)
    r.get(1)
    with r.exclusive():
        r.synced(1)
    with pytest.raises(RuntimeError, match="engine died in step 2"):
        r.get(2)
    r.close()
    assert [s for s, _ in p.calls] == [1, 2]


def test_bad_staleness():
    with pytest.raises(ValueError, match="max_staleness must be >= 1"):
        AheadRollouts(Producer(), 0, 1, 2, max_staleness=0)


def _draw(advantages: list[list[float]], tag: str) -> StepRollout:
    """One policy; a prompt per entry, a row per advantage."""
    from megatron_matpo.train.packing import Row

    ids = iter(range(100))  # rows and rollouts (one row each here) numbered within the draw, as build_rows does
    groups = [[[Row([1, 2], [0, 1], [0.0, 0.0], a, role=f"{tag}{p}", row_id=(i := next(ids)), rollout_id=i)
                for a in prompt] for p, prompt in enumerate(advantages)]]
    return StepRollout(groups, {"reward/mean": float(len(tag))})


def test_dynamic_sampling_drops_zero_variance_prompts_and_refills_in_order():
    from megatron_matpo.train.pipeline import informative_prompts, refill

    a = _draw([[0.0, 0.0], [1.0, -1.0], [0.0, 0.0], [0.5, -0.5]], "a")  # prompts 0 and 2: all alike
    b = _draw([[0.7, -0.7], [0.0, 0.0], [0.2, -0.2], [0.0, 0.0]], "bb")
    assert informative_prompts(a.groups) == [False, True, False, True]
    out, m = refill([a, b], prompts=3)
    assert [p[0].role for p in out.groups[0]] == ["a1", "a3", "bb0"]  # informative ones, in draw order
    assert m == {"dynamic/dropped_fraction": 4 / 8, "dynamic/kept_prompts": 3.0, "dynamic/draws": 2.0}
    assert out.metrics == {"reward/mean": 1.0}  # the batch as sampled: the first draw's
    assert [r.row_id for p in out.groups[0] for r in p] == list(range(6))  # unique across the draws (pack_rows)
    assert [r.rollout_id for p in out.groups[0] for r in p] == list(range(6))  # what loss.agg rollout-mean counts
    assert a.groups[0][1][0].row_id == 2  # the draws themselves are left as they were
    from megatron_matpo.train.packing import pack_rows

    (mbs,) = pack_rows([r for p in out.groups[0] for r in p], max_tokens_per_micro_batch=64, dp_size=1)
    assert sorted(set(mbs[0].row_ids[0].tolist()) - {-1}) == list(range(6))
    # per-token advantages (GAE-shaped rows) count too; several policies: informative in any
    assert informative_prompts([[[_draw([[0.0]], "x").groups[0][0][0]]], [[_draw([[0.3]], "y").groups[0][0][0]]]]) \
        == [True]


def test_dynamic_sampling_tops_up_so_every_mini_batch_has_a_prompt():
    from megatron_matpo.train.pipeline import refill

    flat = _draw([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], "a")
    out, m = refill([flat, flat], prompts=3, min_prompts=2)
    assert [p[0].role for p in out.groups[0]] == ["a0", "a1"] and m["dynamic/kept_prompts"] == 0.0
    assert m["dynamic/dropped_fraction"] == 1.0
