"""The MAPoRL discussion on the rollout engines: N agents x T rounds, each (agent, round) turn
rewarded on its own.

Round 0: every agent answers the question on its own. Round t > 0: every agent is shown the other
agents' round t-1 answers (optionally with their verifier scores) and may revise. With
`stop_on_consensus`, the discussion ends after the first round in which all final answers agree.
Agents run concurrently within a round. They share one model (one generator, persona prompts tell
them apart) or are distinct models (one generator, e.g. an `EngineRouter`, and tokenizer per agent).

Row granularity: each agent keeps ONE conversation across rounds (it sees its own earlier answers,
as in the reference code), and every (agent, round) turn is rewarded separately
(`rewards.maporl_rewards`). Each turn records the conversation up to the end of its answer with the
loss mask on its own tokens; `maporl.task.turn_rows` trains an agent's turns of one discussion as
one row (the last turn's conversation, per-token advantages), or one row per turn when the loss
aggregation is per sequence.

Token level as in `agents.workflow`: generated ids and logprobs come straight from the engine,
everything else is chat-template ids (`agents.conversation`), nothing generated is re-tokenized.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_matpo.agents.conversation import ChatTemplate, Conversation
from megatron_matpo.agents.workflow import Generator, Trajectory, derive_seed
from megatron_matpo.maporl import prompts
from megatron_matpo.maporl.answers import Tolerance, consensus, final_answer
from megatron_matpo.maporl.rewards import RewardBreakdown, RewardConfig, maporl_rewards
from megatron_matpo.reward.judge import AccuracyItem, AccuracyScorer

_GRAMMAR_KEYS = ("regex", "json_schema", "ebnf")


@dataclass
class DiscussionConfig:
    n_agents: int = 2
    rounds: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens_per_turn: int = 1024
    max_context_tokens: int = 8192      # per agent: its prompt and all its rounds
    stop_on_consensus: bool = False
    # show verifier scores (needs a verifier during the rollout): of the agent's own previous answer and
    # next to the others'; score_feedback "bucket" adds what the score means in words (MAPoRL's four
    # buckets, prompts.SCORE_BUCKETS), "number" shows the number only
    show_scores: bool = False
    score_feedback: str = "bucket"
    share: str = "response"             # "response": others' visible text; "answer": only their final answer
    max_shared_chars: int = 2000        # per shared answer
    personas: list[str] | None = None   # one extra system-prompt line per agent (shared-model roles)
    enable_thinking: bool | None = None
    # per-request seeds from (rollout seed, agent, round): a discussion is a pure function of the
    # weights and the seed, whatever the batching (needs top_p = 1 on SGLang)
    seeded: bool = False
    first_round_sampling: dict[str, Any] | None = None   # extra sampling params, e.g. {"regex": ...}
    later_round_sampling: dict[str, Any] | None = None
    rel_tol: float = 1e-6               # answer equality for consensus (numbers)
    abs_tol: float = 1e-6

    def __post_init__(self) -> None:
        if self.n_agents < 1 or self.rounds < 1:
            raise ValueError(f"a discussion needs n_agents >= 1 and rounds >= 1, got {self.n_agents}, {self.rounds}")
        if self.score_feedback not in ("bucket", "number"):
            raise ValueError(f"score_feedback must be 'bucket' or 'number', got {self.score_feedback!r}")
        if self.share not in ("response", "answer"):
            raise ValueError(f"share must be 'response' or 'answer', got {self.share!r}")
        if self.personas is not None and len(self.personas) != self.n_agents:
            raise ValueError(f"{len(self.personas)} personas for {self.n_agents} agents")

    @property
    def tol(self) -> Tolerance:
        return Tolerance(self.rel_tol, self.abs_tol)


@dataclass
class DiscussionTurn(Trajectory):
    """One (agent, round) answer: a `Trajectory` (role "agent<i>") plus its place in the discussion."""
    agent: int = 0
    round: int = 0
    answer: str | None = None          # the extracted final answer (last \boxed{}, else last number)
    score: float | None = None         # verifier score in [0, 1]
    seen: list[str] = field(default_factory=list)   # traj_ids of the answers shown in this turn's prompt


@dataclass
class Discussion:
    sample_uid: str
    group_id: str
    question: str
    n_agents: int
    rounds_planned: int
    turns: list[DiscussionTurn]         # round-major: round 0 agents 0..N-1, then round 1, ...
    stop_reason: str = "rounds"         # rounds | consensus | context
    gold: str | list[str] | None = None

    @property
    def rounds_played(self) -> int:
        return len(self.turns) // self.n_agents

    def grid(self) -> list[list[DiscussionTurn]]:
        """turns[t][i]."""
        n = self.n_agents
        return [self.turns[t * n:(t + 1) * n] for t in range(self.rounds_played)]

    def answers(self) -> list[list[str | None]]:
        return [[x.answer for x in row] for row in self.grid()]

    def scores(self) -> torch.Tensor:
        """[rounds played, N] verifier scores (run `verify` first)."""
        missing = [x.traj_id for x in self.turns if x.score is None]
        if missing:
            raise ValueError(f"turns without a verifier score: {missing[:4]} (call verify_discussions first)")
        return torch.tensor([[x.score for x in row] for row in self.grid()], dtype=torch.float32)

    def final_consensus(self, tol: Tolerance = Tolerance()) -> bool:
        return consensus(self.answers()[-1], tol)


class DiscussionWorkflow:
    def __init__(self, cfg: DiscussionConfig, generators: Generator | Sequence[Generator], tokenizers,
                 verifier: AccuracyScorer | None = None):
        """`generators` / `tokenizers`: one shared by all agents, or one per agent (distinct models).
        `verifier`: scores each round as soon as it ends (needed for `show_scores`); without it the
        caller scores the finished discussion (`verify_discussions`)."""
        n = cfg.n_agents
        gens = list(generators) if isinstance(generators, (list, tuple)) else [generators]
        toks = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        for what, xs in (("generators", gens), ("tokenizers", toks)):
            if len(xs) not in (1, n):
                raise ValueError(f"{len(xs)} {what} for {n} agents: give one shared or one per agent")
        if cfg.show_scores and verifier is None:
            raise ValueError("show_scores needs a verifier during the rollout")
        self.cfg = cfg
        self.generators = gens * n if len(gens) == 1 else gens
        self.tokenizers = toks * n if len(toks) == 1 else toks
        templates: dict[int, ChatTemplate] = {}  # one template per distinct tokenizer
        self.templates = [templates.setdefault(id(t), ChatTemplate(t, cfg.enable_thinking)) for t in self.tokenizers]
        self.verifier = verifier

    async def rollout(self, question: str, sample_uid: str, group_id: str, gold: str | list[str] | None = None,
                      seed: int | None = None) -> Discussion:
        """One discussion. `sample_uid` must be unique within a batch (turn ids derive from it);
        `gold` is needed when a verifier scores rounds during the rollout."""
        cfg = self.cfg
        if cfg.seeded and seed is None:
            raise ValueError("discussion.seeded needs a seed per rollout")
        if self.verifier is not None and gold is None:
            raise ValueError("a verifier during the rollout needs the gold answer")
        seed = seed if cfg.seeded else None
        n = cfg.n_agents
        convs = [Conversation(self.templates[i], [
            {"role": "system", "content": prompts.system_prompt(i, n, cfg.personas[i] if cfg.personas else None)},
            {"role": "user", "content": prompts.first_round_prompt(question)}]) for i in range(n)]
        d = Discussion(sample_uid=sample_uid, group_id=group_id, question=question, n_agents=n,
                       rounds_planned=cfg.rounds, turns=[], gold=gold)
        prev: list[DiscussionTurn] = []
        for t in range(cfg.rounds):
            if t > 0:
                for i, conv in enumerate(convs):
                    conv.add_messages([{"role": "user", "content": self._revision(question, prev, i)}])
            if any(self._room(c) <= 0 for c in convs):
                if t == 0:
                    raise ValueError(f"the round-0 prompt leaves no room under max_context_tokens="
                                     f"{cfg.max_context_tokens}")
                d.stop_reason = "context"
                break
            extra = cfg.first_round_sampling if t == 0 else cfg.later_round_sampling
            row = await asyncio.gather(*(self._turn(d, convs[i], i, t, prev, extra, seed) for i in range(n)))
            d.turns.extend(row)
            if self.verifier is not None:
                await verify_turns(row, question, gold, self.verifier)
            prev = list(row)
            if cfg.stop_on_consensus and t < cfg.rounds - 1 and consensus([x.answer for x in row], cfg.tol):
                d.stop_reason = "consensus"
                break
        return d

    # ---- one turn ---------------------------------------------------------------------------------
    def _room(self, conv: Conversation) -> int:
        return min(self.cfg.max_tokens_per_turn, self.cfg.max_context_tokens - len(conv.ids))

    def _revision(self, question: str, prev: list[DiscussionTurn], i: int) -> str:
        cfg = self.cfg
        others, own = [], None
        for x in prev:
            if x.agent == i:
                own = x.score if cfg.show_scores else None
                continue
            text = (x.answer or "") if cfg.share == "answer" else prompts.shareable(x.final_text, cfg.max_shared_chars)
            others.append(prompts.SharedAnswer(x.agent, text, x.score if cfg.show_scores else None))
        return prompts.revision_prompt(question, others, own, cfg.score_feedback)

    async def _turn(self, d: Discussion, conv: Conversation, i: int, t: int, prev: list[DiscussionTurn],
                    extra: dict | None, seed: int | None) -> DiscussionTurn:
        cfg = self.cfg
        start = len(conv.ids)
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": self._room(conv),
                    **(extra or {})}
        s = derive_seed(seed, "agent", i, "round", t)
        if s is not None:
            sampling["sampling_seed"] = s
        gen = await self.generators[i].generate(conv.ids, sampling)
        template = self.templates[i]
        ids = gen.output_ids
        body = ids[:-1] if ids and ids[-1] == template.eos_id else ids
        text = self.tokenizers[i].decode(body, skip_special_tokens=False)
        conv.add_generated(ids, gen.logprobs, text, constrained=bool(extra and any(k in extra for k in _GRAMMAR_KEYS)))
        # the row: the whole conversation so far, trained on this round's tokens only
        return DiscussionTurn(
            traj_id=f"{d.sample_uid}/a{i}/r{t}", role=f"agent{i}", group_id=d.group_id, sample_uid=d.sample_uid,
            parent_id=prev[i].traj_id if prev else None,  # the agent's previous turn
            token_ids=list(conv.ids), loss_mask=[0] * start + conv.loss_mask[start:],
            logprobs=[0.0] * start + conv.logprobs[start:], prompt_len=start,
            messages=[dict(m) for m in conv.messages], final_text=text, turns=1,
            finish="length" if gen.finish_reason == "length" else "answer",
            constrained_spans=[(a, b) for a, b in conv.constrained_spans if a >= start],
            agent=i, round=t, answer=final_answer(text), seen=[x.traj_id for x in prev if x.agent != i])


async def verify_turns(turns: Sequence[DiscussionTurn], question: str, gold: str | list[str],
                       verifier: AccuracyScorer) -> None:
    """Score turns in place (`turn.score`), one verifier call for all of them."""
    if not turns:
        return
    res = await verifier.score([AccuracyItem(question, gold, x.final_text) for x in turns])
    for x, r in zip(turns, res):
        x.score = float(r.score)


async def verify_discussions(discussions: Sequence[Discussion], verifier: AccuracyScorer,
                             golds: Sequence[str | list[str]] | None = None) -> None:
    """Score every unscored turn of a batch of discussions in one verifier call (gold from
    `golds` or each discussion's own)."""
    items, targets = [], []
    for k, d in enumerate(discussions):
        gold = golds[k] if golds is not None else d.gold
        if gold is None:
            raise ValueError(f"discussion {d.sample_uid!r} has no gold answer to verify against")
        for x in d.turns:
            if x.score is None:
                items.append(AccuracyItem(d.question, gold, x.final_text))
                targets.append(x)
    if items:
        for x, r in zip(targets, await verifier.score(items)):
            x.score = float(r.score)


def assign_rewards(d: Discussion, cfg: RewardConfig = RewardConfig()) -> RewardBreakdown:
    """MAPoRL reward of every turn (influence-aware + incentives) into `turn.reward` and
    `turn.reward_components`; the turns must be verified."""
    br = maporl_rewards(d.scores(), cfg, d.answers())
    total = br.total
    for x in d.turns:
        x.reward = float(total[x.round, x.agent])
        x.reward_components = {**br.components(x.round, x.agent), "score": float(x.score)}
    return br
