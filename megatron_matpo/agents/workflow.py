"""Agent workflows on the rollout engines: MATPO planner/worker, and the single-agent baseline.

One planner rollout yields one planner trajectory plus one trajectory per worker it spawned; each
is a separate training row (token ids, loss mask over exactly the engine-generated tokens, the
engine's logprobs), linked to its planner by `parent_id` and sharing the prompt's `group_id`.
Workers run with isolated contexts (system prompt + query recap only), and several worker calls of
one planner turn run concurrently.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from megatron_matpo.agents import prompts
from megatron_matpo.agents.conversation import ChatTemplate, Conversation
from megatron_matpo.agents.toolcall import Problem, format_score, parse_tool_calls, render_tool_call, validate_call
from megatron_matpo.toolbox.specs import (AGENT_SERVER, GOOGLE_SEARCH, PLANNER_TOOLS, SEARCH_AND_BROWSE, SEARCH_SERVER,
                                          SINGLE_AGENT_TOOLS, WORKER_TOOLS, ToolSpec)


@dataclass
class AgentLimits:
    max_turns: int = 20
    max_context_tokens: int = 40960  # prompt + every turn of one agent
    max_tokens_per_turn: int = 8192
    summary_reserve_tokens: int = 4096  # a worker stops tool use when only this much room is left
    max_calls_per_turn: int = 8  # tool calls executed from one message (MATPO: one is the rule)


@dataclass
class WorkflowConfig:
    mode: str = "matpo"  # "matpo" | "single"
    planner: AgentLimits = field(default_factory=AgentLimits)
    worker: AgentLimits = field(default_factory=AgentLimits)
    # "full": the MATPO prompts | "compact": the same roles and formats in a few lines, for tiny models
    # (agents/prompts.py)
    prompt_style: str = "full"
    temperature: float = 1.0
    top_p: float = 1.0
    summary_max_chars: int = prompts.DEFAULT_SUMMARY_CHARS
    enable_thinking: bool | None = None
    # extra sampling params for an agent's first turn, e.g. {"regex": ...} to constrain it
    first_turn_sampling: dict[str, Any] | None = None  # planner / single agent
    worker_first_turn_sampling: dict[str, Any] | None = None
    # extra sampling params for the planner's / single agent's turns after the first (e.g. a regex
    # that forces a `\\boxed{}` answer in the learnable toy task)
    later_turn_sampling: dict[str, Any] | None = None
    # per-request sampling seeds derived from (rollout seed, agent, turn): rollouts become a pure
    # function of the weights and the seed, whatever the batching (needs top_p = 1 on SGLang)
    seeded: bool = False
    # warm start for base models that never call tools: the planner's first turn delegates this many
    # subtasks / the worker's first turn makes one search (`ForcedCall`): the calls' markup is written
    # for the model (not trained), the model writes each free-text argument (trained; parity skips it)
    force_delegation: int = 0
    force_worker_search: bool = False
    # run the calls of one message (several workers, several searches) concurrently; MATPO's
    # reference code runs workers one after another (False reproduces that)
    concurrent_calls: bool = True


@dataclass
class Trajectory:
    traj_id: str
    role: str  # planner | worker | single
    group_id: str
    sample_uid: str
    parent_id: str | None
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    prompt_len: int
    messages: list[dict]
    final_text: str
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    format_score: float = 1.0
    finish: str = "answer"  # answer | max_turns | context | summary
    children: list[str] = field(default_factory=list)
    constrained_spans: list[tuple[int, int]] = field(default_factory=list)
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    # every engine call ("generate"), tool call ("tool") and delegation ("agent") of this agent:
    # {"kind", "turn", "start", "end"} on the rollout process's time.perf_counter clock; with the
    # workers' own timings this rebuilds a rollout's critical path (benchmarks/rollout_overlap.py)
    timings: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


ARG_REGEX = "[A-Za-z0-9][A-Za-z0-9 ,.?'-]{0,29}"  # a forced call's argument: starts with a letter or digit
ARG_MAX_TOKENS = 32  # the argument (<= 30 characters), its closing quote and the end-of-sequence token


@dataclass(frozen=True)
class ForcedCall:
    """n canonical calls of `tool` in one turn, whose string argument `arg` the model writes (1-30 plain
    characters, starting with a letter or digit: a blank one would be refused and waste the turn).

    Only the arguments are sampled (each under ARG_REGEX and its closing quote) and trained. The markup
    around them is appended as fixed tokens in its canonical tokenization: the model has no choice over
    it, so it carries no policy gradient. (Constraining the whole call with one regex let the model pick
    among the markup's many tokenizations, e.g. `us`+`e` or `u`+`se`: ~90% of a toy step's trained tokens
    were such choices, pure noise on the advantage that the update fitted anyway.)"""
    server: str
    tool: str
    arg: str
    n: int = 1

    def fixed_texts(self) -> list[str]:
        """The n + 1 texts around the n arguments; each argument is generated with its closing quote."""
        marker = "ARGUMENT_PLACEHOLDER"
        before, after = render_tool_call(self.server, self.tool, {self.arg: marker}).split(marker)
        assert after.startswith('"'), after  # the JSON string's closing quote, generated with the argument
        return [before] + [after[1:] + before] * (self.n - 1) + [after[1:]]

    def regex(self) -> str:
        """The whole turn as one regex: what the model's text must match (tests)."""
        t = [re.escape(x) for x in self.fixed_texts()]
        return t[0] + "".join(ARG_REGEX + '"' + x for x in t[1:])


def derive_seed(seed: int | None, *path: object) -> int | None:
    """A 63-bit seed for one sub-stream (agent, turn) of a rollout seed; None stays None."""
    if seed is None:
        return None
    h = hashlib.blake2b(repr((seed, *path)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class Generator(Protocol):
    async def generate(self, input_ids: list[int], sampling: dict): ...


class ToolCaller(Protocol):
    async def call(self, server: str, tool: str, arguments: dict): ...


class Workflow:
    def __init__(self, cfg: WorkflowConfig, engine: Generator, tools: ToolCaller, tokenizer):
        self.cfg = cfg
        self.engine = engine
        self.tools = tools
        self.tok = tokenizer
        self.template = ChatTemplate(tokenizer, cfg.enable_thinking)
        self.first_sampling = cfg.first_turn_sampling
        self.worker_first_sampling = cfg.worker_first_turn_sampling
        if cfg.force_delegation and self.first_sampling is None:
            self.first_sampling = ForcedCall(AGENT_SERVER, SEARCH_AND_BROWSE.name, "subtask", cfg.force_delegation)
        if cfg.force_worker_search and self.worker_first_sampling is None:
            self.worker_first_sampling = ForcedCall(SEARCH_SERVER, GOOGLE_SEARCH.name, "q")
        # summed durations of every engine and tool call: what a fully sequential rollout would take
        self.busy_s: Counter[str] = Counter()
        self._fixed_ids: dict[ForcedCall, list[list[int]]] = {}  # a forced call's markup tokens, encoded once

    # ---- entry point ------------------------------------------------------------------------------
    async def rollout(self, question: str, sample_uid: str, group_id: str, seed: int | None = None) -> list[
            Trajectory]:
        """One rollout. `sample_uid` must be unique within a batch: trajectory ids derive from it.
        `seed` (with `cfg.seeded`) fixes every sampling decision of this rollout."""
        if self.cfg.seeded and seed is None:
            raise ValueError("workflow.seeded needs a seed per rollout")
        seed = seed if self.cfg.seeded else None
        if self.cfg.mode == "matpo":
            return await self._planner(question, sample_uid, group_id, seed)
        if self.cfg.mode == "single":
            return [await self._single(question, sample_uid, group_id, seed)]
        raise ValueError(f"workflow mode {self.cfg.mode!r}: expected 'matpo' or 'single'")

    # ---- shared turn machinery --------------------------------------------------------------------
    def _sampling(self, max_new: int, extra: dict | None) -> dict:
        s = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_new_tokens": max_new}
        return {**s, **(extra or {})}

    def _room(self, conv: Conversation, limits: AgentLimits, reserve: int = 0) -> int:
        return min(limits.max_tokens_per_turn, limits.max_context_tokens - len(conv.ids) - reserve)

    async def _generate(self, ids: list[int], max_new: int, extra: dict | None, seed: int | None):
        sampling = self._sampling(max_new, extra)
        if seed is not None:
            sampling["sampling_seed"] = seed
        return await self.engine.generate(ids, sampling)

    async def _turn(self, conv: Conversation, max_new: int, extra: dict | ForcedCall | None = None,
                    seed: int | None = None, traj: Trajectory | None = None) -> tuple[str, str]:
        """One assistant turn (one "generate" timing, whatever engine calls it takes)."""
        t0 = time.perf_counter()
        if isinstance(extra, ForcedCall):
            text, finish = await self._forced_turn(conv, max_new, extra, seed)
        else:
            gen = await self._generate(conv.ids, max_new, extra, seed)
            ids = gen.output_ids
            body = ids[:-1] if ids and ids[-1] == self.template.eos_id else ids
            text, finish = self.tok.decode(body, skip_special_tokens=False), gen.finish_reason
            constrained = bool(extra and any(k in extra for k in ("regex", "json_schema", "ebnf")))
            conv.add_generated(ids, gen.logprobs, text, constrained=constrained)
        t1 = time.perf_counter()
        self.busy_s["generate"] += t1 - t0
        if traj is not None:
            traj.timings.append({"kind": "generate", "turn": traj.turns, "start": t0, "end": t1})
        return text, finish

    async def _forced_turn(self, conv: Conversation, max_new: int, call: ForcedCall,
                           seed: int | None) -> tuple[str, str]:
        """The turn of `call`: its markup as fixed tokens, each argument sampled (ForcedCall)."""
        if call not in self._fixed_ids:
            self._fixed_ids[call] = [self.template.encode(t) for t in call.fixed_texts()]
        start, fixed = len(conv.ids), self._fixed_ids[call]
        budget = max_new - sum(map(len, fixed)) - 1  # the turn's room less its fixed tokens and end of turn
        for k in range(call.n):
            conv.extend_turn(fixed[k])
            gen = await self._generate(conv.ids, max(1, min(ARG_MAX_TOKENS, budget)), {"regex": ARG_REGEX + '"'},
                                       derive_seed(seed, "argument", k))
            ids, logprobs = gen.output_ids, gen.logprobs
            if ids and ids[-1] == self.template.eos_id:  # the grammar's end: the turn goes on with fixed text
                ids, logprobs = ids[:-1], logprobs[:-1]
            conv.extend_turn(ids, logprobs, constrained=True)
            budget -= len(ids)
        conv.extend_turn(fixed[-1] + [self.template.eos_id])
        text = self.tok.decode(conv.ids[start:-1], skip_special_tokens=False)
        conv.close_turn(text)
        return text, "stop"

    async def _run_tools(self, text: str, allowed: tuple[ToolSpec, ...], traj: Trajectory, limits: AgentLimits,
                         agent_call) -> str | None:
        """Execute the tool calls of one message; returns the observation message text (None if the
        message called no tool, i.e. the agent is done)."""
        parsed = parse_tool_calls(text)
        if not parsed.calls and parsed.error_message is None:
            return None
        # several calls in one message are executed together (concurrent workers), so that alone
        # earns no complaint; any other format problem is explained to the model
        complain = any(k != Problem.MULTIPLE_CALLS for k in parsed.problem_kinds)
        notes = [parsed.error_message] if complain else []
        calls = parsed.calls[: limits.max_calls_per_turn]
        traj.tool_calls += len(calls)

        async def one(call) -> str:
            if call.server == AGENT_SERVER and agent_call is None:
                traj.tool_errors += 1
                return prompts.nested_agent_refusal()
            problems = validate_call(call, allowed)
            if problems:
                traj.tool_errors += 1
                return prompts.tool_error_message(call.server, call.tool, "; ".join(problems))
            if call.server == AGENT_SERVER:
                if not str(call.arguments["subtask"]).strip():  # schema-valid, but nothing to delegate
                    traj.tool_errors += 1
                    return prompts.tool_error_message(call.server, call.tool, "subtask must not be empty")
                t0 = time.perf_counter()
                summary = await agent_call(call.arguments["subtask"])
                traj.timings.append({"kind": "agent", "turn": traj.turns - 1, "start": t0, "end": time.perf_counter()})
                return summary
            t0 = time.perf_counter()
            res = await self.tools.call(call.server, call.tool, call.arguments)
            t1 = time.perf_counter()
            self.busy_s["tools"] += t1 - t0
            traj.timings.append({"kind": "tool", "turn": traj.turns - 1, "start": t0, "end": t1})
            if not res.ok:
                traj.tool_errors += 1
            return res.text

        if self.cfg.concurrent_calls:
            results = await asyncio.gather(*(one(c) for c in calls))
        else:
            results = [await one(c) for c in calls]
        if not calls:
            traj.tool_errors += 1
        return "\n\n".join(notes + list(results))

    def _trajectory(self, traj_id: str, role: str, conv: Conversation, sample_uid: str, group_id: str,
                    parent_id: str | None) -> Trajectory:
        return Trajectory(traj_id=traj_id, role=role, group_id=group_id, sample_uid=sample_uid,
                          parent_id=parent_id, token_ids=conv.ids, loss_mask=conv.loss_mask,
                          logprobs=conv.logprobs, prompt_len=conv.prompt_len, messages=conv.messages,
                          final_text="")

    async def _loop(self, conv: Conversation, traj: Trajectory, limits: AgentLimits, allowed, agent_call,
                    reserve: int, first_sampling: dict | ForcedCall | None, later_sampling: dict | None,
                    seed: int | None) -> str:
        """Generate/act until the agent stops calling tools or runs out of turns or room."""
        text = ""
        for turn in range(limits.max_turns):
            room = self._room(conv, limits, reserve)
            if room <= 0:
                traj.finish = "context"
                return text
            text, _ = await self._turn(conv, room, first_sampling if turn == 0 else later_sampling,
                                       derive_seed(seed, turn), traj=traj)
            traj.turns += 1
            observation = await self._run_tools(text, allowed, traj, limits, agent_call)
            if observation is None:
                traj.finish = "answer"
                return text
            conv.add_messages([{"role": "user", "content": observation}])
        traj.finish = "max_turns"
        return text

    def _finish(self, traj: Trajectory, conv: Conversation, allowed) -> None:
        traj.token_ids, traj.loss_mask, traj.logprobs = conv.ids, conv.loss_mask, conv.logprobs
        traj.constrained_spans = list(conv.constrained_spans)
        turns = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        traj.format_score = format_score(turns, allowed)

    # ---- roles ------------------------------------------------------------------------------------
    async def _worker(self, main_task: str, subtask: str, sample_uid: str, group_id: str, parent_id: str,
                      out: list[Trajectory], seed: int | None) -> str:
        lim = self.cfg.worker
        conv = Conversation(self.template, [
            {"role": "system", "content": prompts.system_prompt("worker", WORKER_TOOLS, self.cfg.prompt_style)},
            {"role": "user", "content": prompts.worker_user_prompt(main_task, subtask, self.cfg.prompt_style)}])
        # ids and seeds by spawn order, which is deterministic (calls start in message order)
        index = len(out)
        traj = self._trajectory(f"{parent_id}/w{index}", "worker", conv, sample_uid, group_id, parent_id)
        out.append(traj)
        seed = derive_seed(seed, "worker", index)
        summary_msg = {"role": "user",
                       "content": prompts.worker_summary_prompt(main_task, subtask, self.cfg.prompt_style)}
        # keep room for the summary instruction itself plus the summary
        reserve = lim.summary_reserve_tokens + len(self.template.continuation_ids([summary_msg], False))
        await self._loop(conv, traj, lim, WORKER_TOOLS, None, reserve, self.worker_first_sampling, None,
                         seed)
        # forced final summary: no tools, structured, returned to the planner
        conv.add_messages([summary_msg])
        room = min(lim.summary_reserve_tokens, lim.max_context_tokens - len(conv.ids))
        summary = ""
        if room > 0:
            summary, _ = await self._turn(conv, room, seed=derive_seed(seed, "summary"), traj=traj)
            traj.turns += 1
        traj.final_text = prompts.clean_worker_summary(summary, self.cfg.summary_max_chars)
        self._finish(traj, conv, WORKER_TOOLS)
        return traj.final_text or "(the browsing agent returned no summary)"

    async def _planner(self, question: str, sample_uid: str, group_id: str, seed: int | None) -> list[Trajectory]:
        conv = Conversation(self.template, [
            {"role": "system", "content": prompts.system_prompt("planner", PLANNER_TOOLS, self.cfg.prompt_style)},
            {"role": "user", "content": prompts.planner_user_prompt(question, self.cfg.prompt_style)}])
        planner = self._trajectory(f"{sample_uid}/p", "planner", conv, sample_uid, group_id, None)
        workers: list[Trajectory] = []

        async def delegate(subtask: str) -> str:
            return await self._worker(question, subtask, sample_uid, group_id, planner.traj_id, workers, seed)

        planner.final_text = await self._loop(conv, planner, self.cfg.planner, PLANNER_TOOLS, delegate, 0,
                                             self.first_sampling, self.cfg.later_turn_sampling, seed)
        self._finish(planner, conv, PLANNER_TOOLS)
        planner.children = [w.traj_id for w in workers]
        return [planner, *workers]

    async def _single(self, question: str, sample_uid: str, group_id: str, seed: int | None) -> Trajectory:
        conv = Conversation(self.template, [
            {"role": "system", "content": prompts.system_prompt("single", SINGLE_AGENT_TOOLS, self.cfg.prompt_style)},
            {"role": "user", "content": prompts.single_user_prompt(question, self.cfg.prompt_style)}])
        traj = self._trajectory(f"{sample_uid}/s", "single", conv, sample_uid, group_id, None)
        traj.final_text = await self._loop(conv, traj, self.cfg.planner, SINGLE_AGENT_TOOLS, None, 0,
                                          self.first_sampling, self.cfg.later_turn_sampling, seed)
        self._finish(traj, conv, SINGLE_AGENT_TOOLS)
        return traj


__all__ = ["AgentLimits", "WorkflowConfig", "Trajectory", "Workflow", "ForcedCall", "SEARCH_AND_BROWSE"]
