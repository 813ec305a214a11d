"""MATPO and single-agent workflows on a real SGLang engine and a real MCP tool server (tiny model)."""
from __future__ import annotations

import asyncio
import re

import pytest
import torch

from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.agents.workflow import AgentLimits, Workflow, WorkflowConfig
from megatron_matpo.rollout.engine import EngineClient
from megatron_matpo.toolbox.specs import AGENT_SERVER, SEARCH_AND_BROWSE, SEARCH_SERVER

pytestmark = pytest.mark.slow
SUBTASKS = ["Find where Alpha was born.", "Find the river of Beta."]
QUESTION = "Which river flows through the city where Alpha was born?"


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    from megatron_matpo.data.multihop import MultihopConfig, write_multihop
    from megatron_matpo.toolbox.server import RunningServer, ToolboxConfig

    out = tmp_path_factory.mktemp("mh")
    write_multihop(out, MultihopConfig(n_entities=40, n_train=8, n_val=4))
    with RunningServer(ToolboxConfig(backend="local", corpus_path=str(out / "corpus.jsonl"), port=0)) as srv:
        yield srv.url


def _limits(per_turn: int = 24) -> AgentLimits:
    return AgentLimits(max_turns=3, max_context_tokens=3072, max_tokens_per_turn=per_turn, summary_reserve_tokens=48)


def _run(engine, toolbox, tiny_models, cfg: WorkflowConfig):
    from transformers import AutoTokenizer

    from megatron_matpo.toolbox.client import ToolClient

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen3"])

    async def go():
        client = EngineClient(engine.url)
        async with ToolClient({SEARCH_SERVER: toolbox}) as tools:
            wf = Workflow(cfg, client, tools, tok)
            try:
                return await wf.rollout(QUESTION, "s0#0", "s0")
            finally:
                await client.aclose()

    return asyncio.run(go()), tok


def _forced_delegation() -> str:
    text = "".join(render_tool_call(AGENT_SERVER, SEARCH_AND_BROWSE.name, {"subtask": s}) for s in SUBTASKS)
    return re.escape(text)


@pytest.fixture(scope="module")
def matpo_run(engine, toolbox, tiny_models):
    # the planner's first turn must fit the two forced calls (~150 tokens of the tiny tokenizer)
    cfg = WorkflowConfig(mode="matpo", planner=_limits(per_turn=256), worker=_limits(), temperature=1.0,
                         first_turn_sampling={"regex": _forced_delegation()})
    return _run(engine, toolbox, tiny_models, cfg)


def test_planner_spawns_isolated_workers(matpo_run):
    trajs, _ = matpo_run
    planner, workers = trajs[0], trajs[1:]
    assert planner.role == "planner" and len(workers) == 2, planner.messages[2:4]
    assert planner.children == [w.traj_id for w in workers]
    for w, sub in zip(workers, SUBTASKS):
        assert w.role == "worker" and w.parent_id == planner.traj_id and w.group_id == planner.group_id
        recap = w.messages[1]["content"]
        assert QUESTION in recap and sub in recap  # query recap: main task + subtask
        assert not any(m["content"] == planner.messages[1]["content"] for m in w.messages)  # isolated
        assert w.messages[-2]["role"] == "user" and "Conclusion" in w.messages[-2]["content"]  # summary turn
    # the planner receives every worker's (cleaned) summary as a user message
    obs = planner.messages[3]
    assert obs["role"] == "user"
    for w in workers:
        assert (w.final_text or "(the browsing agent returned no summary)") in obs["content"]


def test_rollout_records_the_timing_of_every_call(matpo_run):
    """Each trajectory's `timings` (benchmarks/rollout_overlap.py rebuilds critical paths from them):
    one "generate" per turn, the planner's delegations as "agent" spans that contain their worker."""
    trajs, _ = matpo_run
    planner, workers = trajs[0], trajs[1:]
    assert [(e["kind"], e["turn"]) for e in planner.timings[:3]] == [("generate", 0), ("agent", 0), ("agent", 0)]
    spans = [e for e in planner.timings if e["kind"] == "agent"]
    for t in trajs:
        assert sum(e["kind"] == "generate" for e in t.timings) == t.turns
        assert all(e["end"] >= e["start"] for e in t.timings) and "timings" in t.to_json()
    for w in workers:
        assert any(a["start"] <= w.timings[0]["start"] and w.timings[-1]["end"] <= a["end"] for a in spans)


def _check_tokens(traj, tok, hf):
    ids = traj.token_ids
    assert len(ids) == len(traj.loss_mask) == len(traj.logprobs)
    # decoding the ids reproduces the transcript as the chat template renders it
    rendered = tok.apply_chat_template(traj.messages, tokenize=False)
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert rendered.startswith(decoded) and rendered[len(decoded):] in ("", "<|im_end|>\n", "\n")
    # the loss mask covers exactly the generated assistant tokens
    n_gen = sum(traj.loss_mask)
    assert n_gen > 0 and traj.loss_mask[: traj.prompt_len] == [0] * traj.prompt_len
    # stored logprobs are the engine's sampling logprobs: check against transformers at T=1
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    pos = [i for i, m in enumerate(traj.loss_mask) if m]
    ref = torch.stack([logp[i - 1, ids[i]] for i in pos])
    got = torch.tensor([traj.logprobs[i] for i in pos])
    return (got - ref).abs()


def test_token_level_trajectories(matpo_run, tiny_models):
    from transformers import AutoModelForCausalLM

    trajs, tok = matpo_run
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()
    for t in trajs:
        diff = _check_tokens(t, tok, hf)
        if t.role == "worker":  # unconstrained sampling at T=1: engine logprobs == model logprobs
            assert diff.max().item() < 1e-3, diff.max()


def test_forced_calls_sample_only_their_arguments(engine, toolbox, tiny_models):
    """force_delegation / force_worker_search: the calls' markup is fixed tokens in its canonical
    tokenization (loss mask 0), only each free-text argument is sampled, constrained and trained; the
    calls parse and run, and the turn's end-of-turn token is not written twice."""
    from megatron_matpo.agents.workflow import ARG_REGEX, ForcedCall
    from megatron_matpo.toolbox.specs import GOOGLE_SEARCH

    cfg = WorkflowConfig(mode="matpo",
                         planner=AgentLimits(max_turns=1, max_context_tokens=3072, max_tokens_per_turn=256),
                         worker=AgentLimits(max_turns=1, max_context_tokens=3072, max_tokens_per_turn=128,
                                            summary_reserve_tokens=8),
                         force_delegation=2, force_worker_search=True)
    trajs, tok = _run(engine, toolbox, tiny_models, cfg)
    planner, workers = trajs[0], trajs[1:]
    assert len(workers) == 2 and planner.tool_errors == 0 and all(w.tool_calls == 1 and w.tool_errors == 0
                                                                    for w in workers)
    for t, call in [(planner, ForcedCall(AGENT_SERVER, SEARCH_AND_BROWSE.name, "subtask", 2))] + [
            (w, ForcedCall(SEARCH_SERVER, GOOGLE_SEARCH.name, "q")) for w in workers]:
        first = t.messages[2]["content"]
        assert re.fullmatch(call.regex(), first), first
        # the first turn's trained tokens are exactly its constrained spans: the arguments with their quotes
        spans = [i for s, e in t.constrained_spans for i in range(s, e)]
        trained = [i for i, m in enumerate(t.loss_mask) if m and i < t.constrained_spans[-1][1]]
        assert len(t.constrained_spans) == call.n and trained == spans
        for s, e in t.constrained_spans:
            assert re.fullmatch(ARG_REGEX + '"', tok.decode(t.token_ids[s:e])), tok.decode(t.token_ids[s:e])
        # the fixed markup is the canonical tokenization of the call's fixed text
        fixed = tok(call.fixed_texts()[0], add_special_tokens=False)["input_ids"]
        assert t.token_ids[t.prompt_len:t.prompt_len + len(fixed)] == fixed
        assert not any(t.loss_mask[t.prompt_len:t.prompt_len + len(fixed)])
        # the turn's tokens are its text and one end-of-turn token, then the template's next message
        end = t.token_ids.index(tok.eos_token_id, t.prompt_len)
        assert tok.decode(t.token_ids[t.prompt_len:end]) == first and t.token_ids[end + 1] != tok.eos_token_id
        assert not t.loss_mask[end]
        assert sum(e["kind"] == "generate" for e in t.timings) == t.turns  # one timing per turn, not per argument


def test_single_agent_baseline(engine, toolbox, tiny_models):
    cfg = WorkflowConfig(mode="single", planner=_limits(), temperature=1.0)
    (traj,), tok = _run(engine, toolbox, tiny_models, cfg)
    assert traj.role == "single" and traj.parent_id is None and traj.turns >= 1
    assert sum(traj.loss_mask) > 0


def test_concurrent_planners_and_workers_overlap(engine, toolbox, tiny_models):
    """4 planners × 2 workers, each worker's first turn a search with 1 s injected latency: run with
    everything concurrent vs one call at a time (planners in turn, workers in turn)."""
    import time

    from transformers import AutoTokenizer

    from megatron_matpo.toolbox.client import ToolClient
    from megatron_matpo.toolbox.specs import GOOGLE_SEARCH

    N = 4  # planners
    search = re.escape(render_tool_call(SEARCH_SERVER, GOOGLE_SEARCH.name, {"q": "river city"}))
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen3"])

    def cfg(concurrent: bool) -> WorkflowConfig:
        planner = AgentLimits(max_turns=1, max_context_tokens=3072, max_tokens_per_turn=256)
        worker = AgentLimits(max_turns=1, max_context_tokens=3072, max_tokens_per_turn=128, summary_reserve_tokens=8)
        return WorkflowConfig(mode="matpo", planner=planner, worker=worker, concurrent_calls=concurrent,
                              first_turn_sampling={"regex": _forced_delegation()},
                              worker_first_turn_sampling={"regex": search})

    async def go(concurrent: bool):
        client = EngineClient(engine.url)
        async with ToolClient({SEARCH_SERVER: toolbox}, injected_latency_s=1.0) as tools:
            wf = Workflow(cfg(concurrent), client, tools, tok)
            t0 = time.perf_counter()
            if concurrent:
                runs = await asyncio.gather(*(wf.rollout(QUESTION, f"s{i}#0", f"s{i}") for i in range(N)))
            else:
                runs = [await wf.rollout(QUESTION, f"s{i}#0", f"s{i}") for i in range(N)]
            wall = time.perf_counter() - t0
        await client.aclose()
        return runs, wall

    (runs, wall_conc), (_, wall_seq) = asyncio.run(go(True)), asyncio.run(go(False))
    workers = [t for r in runs for t in r if t.role == "worker"]
    assert len(workers) == 2 * N and all(w.tool_calls == 1 and w.tool_errors == 0 for w in workers)
    ratio = wall_conc / wall_seq
    print(f"\n{N} planners x 2 workers, 1 s tool latency: concurrent {wall_conc:.1f}s, "
          f"sequential {wall_seq:.1f}s, ratio {ratio:.3f}")
    assert wall_seq >= 2 * N * 1.0  # the sequential run really waited on every tool call
    assert ratio < 0.5


def test_worker_agent_call_is_refused(engine, toolbox, tiny_models):
    """Nested agent calls: a worker that calls the agent tool gets a refusal as its tool result."""
    from megatron_matpo.agents import prompts

    nested = re.escape(render_tool_call(AGENT_SERVER, SEARCH_AND_BROWSE.name, {"subtask": "go deeper"}))
    one = re.escape(render_tool_call(AGENT_SERVER, SEARCH_AND_BROWSE.name, {"subtask": SUBTASKS[0]}))
    cfg = WorkflowConfig(mode="matpo", planner=AgentLimits(max_turns=1, max_context_tokens=3072,
                                                           max_tokens_per_turn=256),
                         worker=AgentLimits(max_turns=1, max_context_tokens=3072, max_tokens_per_turn=128,
                                            summary_reserve_tokens=8),
                         first_turn_sampling={"regex": one}, worker_first_turn_sampling={"regex": nested})
    trajs, _ = _run(engine, toolbox, tiny_models, cfg)
    (worker,) = trajs[1:]
    assert worker.tool_errors == 1 and worker.messages[3]["role"] == "user"
    assert worker.messages[3]["content"] == prompts.nested_agent_refusal()
