"""MAPoRL rollouts for the trainer (algorithm=maporl): a batch of questions → `n_samples` discussions
each on the engines → verifier scores → influence-aware rewards + incentives → GRPO advantages →
training rows (one per (discussion, agent), every turn of it trained with its own advantage), routed
to that agent's actor.

Advantage: GRPO over the n_samples discussions of one question, separately for every (agent, round)
cell (the default of ../shared/MATPO.md's MAPoRL section; a turn is compared with the same agent's
turn at the same round of the other samples). With shared models every row goes to actor 0; with
distinct models agent i's rows go to actor i, whose engines also generated them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

from megatron_matpo.algo import grpo_advantages
from megatron_matpo.train.packing import Row
from megatron_matpo.data.schema import Sample
from megatron_matpo.maporl.answers import answers_match
from megatron_matpo.maporl.config import MaporlSection
from megatron_matpo.maporl.discussion import (Discussion, DiscussionTurn, DiscussionWorkflow, assign_rewards,
                                             verify_discussions)
from megatron_matpo.maporl.verifier import make_verifier
from megatron_matpo.train.rows import advantage_value_stats, parity_mask, rollout_metrics
from megatron_matpo.train.tasks import StepRollout


class MaporlRollout:
    """MAPoRL's `RolloutTask` (train/tasks.py)."""

    def __init__(self, cfg: MaporlSection, tokenizers: list, engine_urls: list[list[str]], n_samples: int,
                 eps: float = 1e-6, norm_by_std: bool = True, seeded: bool = False, grpo: bool = True,
                 merge_turns: bool = True):
        """`tokenizers` / `engine_urls`: per actor stack (one shared, or one per agent). `grpo=False`: the
        trainer replaces the rows' GRPO advantages by GAE from a critic (advantage.estimator=gae).
        `merge_turns`: one row per (discussion, agent) instead of per turn (`turn_rows`)."""
        self.cfg, self.n_samples, self.eps, self.norm_by_std, self.grpo = cfg, n_samples, eps, norm_by_std, grpo
        self.merge_turns = merge_turns
        self.engine_urls = engine_urls
        self.tokenizers = tokenizers
        self.verifier = make_verifier(cfg.verifier)
        self.discussion_cfg = dataclasses.replace(cfg.discussion, seeded=seeded or cfg.discussion.seeded)

    def rollout(self, batch: list[Sample], out_path: Path, uid_prefix: str, seed: int | None) -> StepRollout:
        """→ rows[stack][prompt] = that prompt's rows for that actor, and the metrics (train/tasks.py)."""
        return StepRollout(*self._run(batch, out_path, uid_prefix, seed))

    def evaluate(self, samples: list[Sample], out_path: Path, tag: str, n_samples: int | None,
                 temperature: float | None = None) -> dict[str, float]:
        """Discussions on the val questions, one transcript per data source: accuracy per agent and round.
        `temperature` replaces the discussion's own (None: keep it)."""
        out = {}
        for src in sorted({s.data_source for s in samples}):
            part = [s for s in samples if s.data_source == src]
            _, m = self._run(part, out_path.with_name(f"{out_path.stem}_{src}{out_path.suffix}"), f"{tag}:",
                             n_samples=n_samples, temperature=temperature)
            out.update({f"eval/{src}/{k}": v for k, v in m.items()
                        if k.startswith(("maporl/accuracy", "maporl/consensus", "reward/"))})
        return out

    def close(self) -> None:
        """Nothing to stop: the engines belong to the trainer's stacks."""

    def _run(self, samples: list[Sample], out_path: Path, uid_prefix: str = "", seed: int | None = None,
             n_samples: int | None = None, temperature: float | None = None
             ) -> tuple[list[list[list[Row]]], dict[str, float]]:
        """→ (rows[stack][prompt], metrics). `n_samples` and `temperature` override the discussions per
        question and their sampling (evaluation)."""
        n = n_samples or self.n_samples
        discussions = asyncio.run(self._discuss(samples, uid_prefix, seed, n, temperature))
        for d in discussions:
            assign_rewards(d, self.cfg.reward)
        self._write(discussions, samples, out_path)
        adv = turn_advantages(discussions, n, self.eps, self.norm_by_std)
        rows = rows_of_turns(adv, len(discussions) // n, len(self.engine_urls), self.merge_turns)
        m = self.metrics(discussions)
        m.update(self.verifier.pop_metrics() if hasattr(self.verifier, "pop_metrics") else {})  # its calls, retries
        if self.grpo:  # per turn, whatever the rows
            m.update(advantage_value_stats([a for _, _, a in adv]))
        return rows, m

    async def _discuss(self, samples: list[Sample], uid_prefix: str, seed: int | None, n: int,
                       temperature: float | None = None) -> list[Discussion]:
        from megatron_matpo.agents.workflow import derive_seed
        from megatron_matpo.rollout.engine import EngineClient, EngineRouter

        routers = [EngineRouter([EngineClient(u) for u in urls]) for urls in self.engine_urls]
        try:
            # verified after each round only when agents are shown scores; otherwise once, batched
            dcfg = self.discussion_cfg if temperature is None else dataclasses.replace(self.discussion_cfg,
                                                                                      temperature=temperature)
            wf = DiscussionWorkflow(dcfg, routers, self.tokenizers,
                                    self.verifier if self.discussion_cfg.show_scores else None)
            jobs = [wf.rollout(s.question, f"{uid_prefix}{s.uid}/{k}", s.group, s.ground_truth,
                               derive_seed(seed, s.uid, k)) for s in samples for k in range(n)]
            discussions = list(await asyncio.gather(*jobs))
            await verify_discussions(discussions, self.verifier)
            return discussions
        finally:
            await asyncio.gather(*(r.aclose() for r in routers))

    def metrics(self, discussions: list[Discussion]) -> dict[str, float]:
        """Per-agent, per-round accuracy, the reward terms, consensus, and how often agents change
        their answer after reading the others (with per-role lengths from `rollout_metrics`)."""
        turns = [x for d in discussions for x in d.turns]
        m = {k: v for k, v in rollout_metrics([d.turns for d in discussions], []).items()
             if not k.startswith(("reward/", "advantage/"))}  # per-role lengths; rewards differ here
        mean = lambda xs: float(statistics.fmean(xs)) if xs else 0.0  # noqa: E731
        cells: dict[tuple[int, int], list[float]] = defaultdict(list)
        for x in turns:
            cells[(x.agent, x.round)].append(x.score)
        for (i, t), v in sorted(cells.items()):
            m[f"maporl/accuracy_agent{i}_round{t}"] = mean(v)
        for t in sorted({t for _, t in cells}):
            m[f"maporl/accuracy_round{t}"] = mean([s for (_, tt), v in cells.items() if tt == t for s in v])
        finals = [x.score for d in discussions for x in d.grid()[-1]]
        m["reward/accuracy"] = m["maporl/accuracy_final"] = mean(finals)
        m["reward/mean"] = mean([x.reward for x in turns])
        m["reward/std"] = statistics.pstdev([x.reward for x in turns]) if len(turns) > 1 else 0.0
        for key in sorted({k for x in turns for k in x.reward_components}):
            m[f"maporl/{key}_mean"] = mean([x.reward_components.get(key, 0.0) for x in turns])
        m["maporl/consensus_final"] = mean([float(d.final_consensus(self.cfg.discussion.tol)) for d in discussions])
        m["maporl/rounds_played_mean"] = mean([float(d.rounds_played) for d in discussions])
        grids = [d.grid() for d in discussions]
        tol = self.cfg.discussion.tol
        changed = [float(not (x.answer == p.answer or answers_match(x.answer, p.answer, tol)))
                   for g in grids for t in range(1, len(g)) for x, p in zip(g[t], g[t - 1])]
        m["maporl/answer_changed_fraction"] = mean(changed)
        if self.cfg.verifier.kind != "numeric":  # accuracy above is the verifier's; this is the gold answers'
            m.update(gold_metrics(discussions, self.cfg.discussion.tol))
        return m

    @staticmethod
    def _write(discussions: list[Discussion], samples: list[Sample], path: Path) -> None:
        """One line per turn: the turn (its conversation, answer, score, reward terms and the ids of
        the answers it was shown) plus the question and gold answer."""
        per = len(discussions) // max(len(samples), 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for j, d in enumerate(discussions):
                s = samples[j // per]
                for x in d.turns:
                    line = x.to_json()
                    line.update(question=s.question, ground_truth=s.ground_truth, data_source=s.data_source,
                                stop_reason=d.stop_reason)
                    f.write(json.dumps(line) + "\n")


def gold_metrics(discussions: list[Discussion], tol) -> dict[str, float]:
    """With a learned or judging verifier: accuracy against the gold answers (final round, every turn) and
    how well the verifier's scores separate right from wrong answers (ROC AUC, when both occur)."""
    from megatron_matpo.maporl.answers import matches_any
    from megatron_matpo.verifier.answers import roc_auc

    right = {id(x): float(d.gold is not None and matches_any(x.answer, d.gold, tol))
             for d in discussions for x in d.turns}
    finals = [right[id(x)] for d in discussions for x in d.grid()[-1]]
    turns = [x for d in discussions for x in d.turns]
    labels = [int(right[id(x)]) for x in turns]
    m = {"maporl/gold_accuracy_final": statistics.fmean(finals) if finals else 0.0,
         "maporl/gold_accuracy": statistics.fmean(labels) if labels else 0.0}
    if 0 < sum(labels) < len(labels):
        m["verifier/auc"] = roc_auc([x.score for x in turns], labels)
    return m


def turn_advantages(discussions: list[Discussion], n_samples: int, eps: float = 1e-6,
                    norm_by_std: bool = True) -> list[tuple[int, DiscussionTurn, float]]:
    """(question index, turn, GRPO advantage) for every turn, GRPO-normalized within (question, agent,
    round); discussions come in consecutive runs of `n_samples` per question."""
    turns = [(j // n_samples, x) for j, d in enumerate(discussions) for x in d.turns]
    adv = grpo_advantages([x.reward for _, x in turns], [(q, x.agent, x.round) for q, x in turns],
                          eps=eps, norm_by_std=norm_by_std).tolist()
    return [(q, x, a) for (q, x), a in zip(turns, adv)]


def turn_rows(discussions: list[Discussion], n_samples: int, stacks: int, eps: float = 1e-6,
              norm_by_std: bool = True, merge_turns: bool = True) -> list[list[list[Row]]]:
    """Rewarded discussions → rows[stack][question]; agent i's rows go to stack i when there is one
    stack per agent, else all to stack 0.

    `merge_turns` (valid with the token-mean loss): one row per (discussion, agent), the agent's last
    conversation, which holds its earlier turns as a prefix; each turn's tokens carry that turn's
    advantage (and the row one reward per turn, for GAE). A causal model's logprob (and value) at a
    token depends only on its prefix, so the loss, its gradient and the critic's targets equal those
    of one row per turn (tests/test_maporl.py checks it against transformers) without re-encoding
    each round's prefix: ~T times fewer tokens through the actor. Otherwise one row per turn."""
    return rows_of_turns(turn_advantages(discussions, n_samples, eps, norm_by_std), len(discussions) // n_samples,
                         stacks, merge_turns)


def rows_of_turns(advantages: list[tuple[int, DiscussionTurn, float]], questions: int, stacks: int,
                  merge_turns: bool = True) -> list[list[list[Row]]]:
    """`turn_rows` from `turn_advantages`' output (computed once when the caller needs it too)."""
    out: list[list[list[Row]]] = [[[] for _ in range(questions)] for _ in range(stacks)]
    counts = [0] * stacks
    units: dict[tuple, list[tuple[DiscussionTurn, float]]] = {}  # (question, discussion or turn index, agent)
    for k, (q, x, a) in enumerate(advantages):
        key = (q, x.sample_uid, x.agent) if merge_turns else (q, k, x.agent)
        units.setdefault(key, []).append((x, a))
    for (q, _, agent), unit in units.items():
        k = agent if stacks > 1 else 0
        out[k][q].append(_unit_row(unit, counts[k]))
        counts[k] += 1
    return out


def _unit_row(unit: list[tuple[DiscussionTurn, float]], row_id: int) -> Row:
    """One agent's consecutive turns (one or more, in round order) as one row."""
    last = unit[-1][0]
    if len(unit) == 1:
        return Row(token_ids=list(last.token_ids), loss_mask=list(last.loss_mask), old_logprobs=list(last.logprobs),
                   advantage=float(unit[0][1]), row_id=row_id, role=last.role, parity_mask=parity_mask(last),
                   reward=float(last.reward))
    n = len(last.token_ids)
    mask, lp, adv, par = [0] * n, [0.0] * n, [0.0] * n, [0] * n
    for x, a in unit:
        if last.token_ids[:len(x.token_ids)] != list(x.token_ids):
            raise ValueError(f"turn {x.traj_id} is not a prefix of {last.traj_id}: the conversation was re-encoded")
        for t, (m, l, pm) in enumerate(zip(x.loss_mask, x.logprobs, parity_mask(x))):
            if m:
                mask[t], lp[t], adv[t] = 1, l, a
            par[t] |= pm
    return Row(token_ids=list(last.token_ids), loss_mask=mask, old_logprobs=lp, advantage=adv, row_id=row_id,
               role=last.role, parity_mask=par, reward=[float(x.reward) for x, _ in unit])
