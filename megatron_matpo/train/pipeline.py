"""Where each step's rollout comes from: rolled out when the loop asks (synchronous), or ahead of the
loop by up to `async.max_staleness` steps while it trains (a producer thread).

Policy versions: version v means the engines hold the weights after step v (0: the initial or restored
weights). A weight sync never overlaps a rollout: it waits for the one in flight to finish (drain) and
holds the next one back (`exclusive`), so every token of a step's rollout (a MATPO group's planner
samples and all their workers; a MAPoRL discussion) comes from one version, and the group's staleness
is the step's: (step - 1) - version, the updates its samples lag behind the weights being trained.
The rollout of step j starts once version >= j - 1 - max_staleness; 0 is the synchronous loop.

Checkpoints: the prompt loader runs ahead with the rollouts, so each ready rollout carries the loader
state right after its own batch was drawn; a checkpoint at step j stores that one. A resume then rolls
out again the steps that were in flight or buffered: no prompt is trained twice or skipped.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from megatron_matpo.train.tasks import StepRollout


@dataclass
class ReadyRollout:
    """One step's rollout, every row tagged with the policy version that sampled it."""
    step: int
    out: StepRollout
    version: int  # the engines' weights for all of it: those after step `version`
    data_state: dict  # the prompt loader's state right after this step's batch was drawn
    rollout_s: float  # the rollout's own duration (the loop may have waited less)

    def __post_init__(self):
        self.out = dataclasses.replace(self.out, groups=[
            [[dataclasses.replace(r, policy_version=self.version) for r in prompt] for prompt in policy]
            for policy in self.out.groups])

    @property
    def staleness(self) -> int:
        """The oldest token's: (step - 1) - its version."""
        return self.step - 1 - min(self.versions(), default=self.version)

    def rows(self):
        return (r for policy in self.out.groups for prompt in policy for r in prompt)

    def versions(self) -> list[int]:
        return [r.policy_version for r in self.rows()]

    def metrics(self) -> dict[str, float]:
        """Staleness, the version, the rollout's duration, and the tokens trained per staleness."""
        m = {"async/staleness": float(self.staleness), "async/policy_version": float(self.version),
             "async/rollout_s": self.rollout_s}
        for r in self.rows():
            key = f"async/tokens_staleness_{self.step - 1 - r.policy_version}"
            m[key] = m.get(key, 0.0) + len(r)
        return m


Produce = Callable[[int, int], ReadyRollout]  # (step, version) -> that step's rollout on those weights


class SyncRollouts:
    """max_staleness 0: each step's rollout runs when the loop asks for it, on the weights of the step
    before (today's loop, exactly)."""

    def __init__(self, produce: Produce, version: int):
        self.produce, self.version = produce, version

    def get(self, step: int) -> ReadyRollout:
        return self.produce(step, self.version)

    @contextmanager
    def exclusive(self):
        yield

    def synced(self, version: int) -> None:
        self.version = version

    def close(self) -> None:
        pass


class AheadRollouts:
    """A producer thread rolls out steps first_step.. last_step in order, each as soon as the staleness
    bound allows and no sync or eval holds the engines; `get` waits for a step's rollout."""

    def __init__(self, produce: Produce, version: int, first_step: int, last_step: int, max_staleness: int):
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1 here, got {max_staleness}")
        self.produce, self.version, self.max_staleness = produce, version, max_staleness
        self.cond = threading.Condition()
        self.ready: dict[int, ReadyRollout | BaseException] = {}
        self.busy = False  # a rollout is in flight
        self.holders = 0  # syncs / evals waiting for or holding the engines
        self.closed = False
        self.thread = threading.Thread(target=self._run, args=(first_step, last_step), name="rollouts", daemon=True)
        self.thread.start()

    def _may_start(self, step: int) -> bool:
        return self.closed or (not self.holders and self.version >= step - 1 - self.max_staleness)

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last + 1):
            with self.cond:
                self.cond.wait_for(lambda: self._may_start(step))
                if self.closed:
                    return
                self.busy, version = True, self.version
            try:
                got: ReadyRollout | BaseException = self.produce(step, version)
            except BaseException as e:  # handed to the loop when it asks for this step
                got = e
            with self.cond:
                self.ready[step], self.busy = got, False
                self.cond.notify_all()
            if isinstance(got, BaseException):
                return

    def get(self, step: int) -> ReadyRollout:
        with self.cond:
            self.cond.wait_for(lambda: step in self.ready)
            got = self.ready.pop(step)
        if isinstance(got, BaseException):
            raise got
        return got

    @contextmanager
    def exclusive(self):
        """No rollout in flight while inside (waits for the one running: drain); none starts either."""
        with self.cond:
            self.holders += 1
            self.cond.wait_for(lambda: not self.busy)
        try:
            yield
        finally:
            with self.cond:
                self.holders -= 1
                self.cond.notify_all()

    def synced(self, version: int) -> None:
        with self.cond:
            self.version = version
            self.cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Starts nothing more; a rollout in flight ends with the engines (torn down after this)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=timeout_s)


def rollouts_for(max_staleness: int, produce: Produce, version: int, first_step: int, last_step: int):
    if max_staleness == 0:
        return SyncRollouts(produce, version)
    return AheadRollouts(produce, version, first_step, last_step, max_staleness)



# ---- dynamic sampling ------------------------------------------------------------------------------
# A GRPO group whose samples all got the same reward has advantages 0 on every row: it carries no
# gradient, only cost, and it dilutes the token-mean of the informative ones (DAPO). With
# `dynamic_sampling.enabled`, such prompts are dropped and the batch is refilled by rolling out more
# prompts (up to `max_draws` batches in all); the step trains on the first `prompts_per_step` kept.

def informative_prompts(groups: list[list[list]]) -> list[bool]:
    """Per prompt: whether any of its rows, of any policy, has a non-zero advantage."""
    def nonzero(a) -> bool:
        return any(x != 0.0 for x in a) if isinstance(a, list) else a != 0.0

    return [any(nonzero(r.advantage) for policy in groups for r in policy[p]) for p in range(len(groups[0]))]


def refill(draws: list[StepRollout], prompts: int, min_prompts: int = 1) -> tuple[StepRollout, dict[str, float]]:
    """The first `prompts` informative prompts of the draws, in order, as one step's rollout (the first
    draw's metrics: the batch as sampled). Fewer than `min_prompts` informative ones (each mini-batch
    needs a prompt) are topped up with the first draw's others: a step of less gradient rather than
    none. Metrics: dynamic/dropped_fraction of the prompts rolled out, dynamic/kept_prompts (informative
    ones trained), dynamic/draws."""
    kept: list[list[list]] = [[] for _ in draws[0].groups]
    rolled = dropped = 0
    for d in draws:
        for p, ok in enumerate(informative_prompts(d.groups)):
            rolled += 1
            dropped += not ok
            if ok and len(kept[0]) < prompts:
                for policy, groups in zip(kept, d.groups):
                    policy.append(groups[p])
    stats = {"dynamic/dropped_fraction": dropped / max(rolled, 1), "dynamic/kept_prompts": float(len(kept[0])),
             "dynamic/draws": float(len(draws))}
    first = informative_prompts(draws[0].groups)
    for p in [p for p, ok in enumerate(first) if not ok][:max(0, min_prompts - len(kept[0]))]:
        for policy, groups in zip(kept, draws[0].groups):
            policy.append(groups[p])
    # each draw numbered its rows and rollouts from 0 (a row id names a row within one packed batch; a
    # rollout, within one prompt's group, is what loss.agg rollout-mean averages over): renumber both
    for policy in kept:
        ids, rollouts = itertools.count(), itertools.count()
        for g, group in enumerate(policy):
            own = {r.rollout_id: next(rollouts) for r in group if r.rollout_id is not None}
            policy[g] = [dataclasses.replace(r, row_id=next(ids), rollout_id=own.get(r.rollout_id)) for r in group]
    return StepRollout(kept, dict(draws[0].metrics)), stats
