"""Transcript rendering of hand-built traces: grouping, worker placement, HTML structure and
escaping, terminal text, CLI and JSONL errors."""
from __future__ import annotations

import io
import json
from html.parser import HTMLParser

import pytest
from rich.console import Console

from megatron_matpo.agents import prompts
from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.agents.transcript import (group_rollouts, load_traces, main, place_workers, render_html,
                                              render_terminal, summarize)
from megatron_matpo.agents.workflow import Trajectory
from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS, WORKER_TOOLS

Q = "Which city hosts the tallest tower built by the company of founder X?"
XSS = "<script>alert(1)</script>"


def _call(subtask: str, **extra) -> str:
    return render_tool_call("browsing_agent", "search_and_browse", {"subtask": subtask, **extra})


def _traj(traj_id: str, role: str, messages: list[dict], parent_id: str | None = None, **kw) -> dict:
    n_gen = sum(m["role"] == "assistant" for m in messages) * 3
    base = dict(traj_id=traj_id, role=role, group_id="g0", sample_uid="s0", parent_id=parent_id,
                token_ids=[987654321] * 10 + [1] * n_gen, loss_mask=[0] * 10 + [1] * n_gen,
                logprobs=[-0.123456] * (10 + n_gen), prompt_len=10, messages=messages, final_text="",
                turns=sum(m["role"] == "assistant" for m in messages), tool_calls=0, tool_errors=0,
                format_score=1.0, finish="answer", children=[], reward=None, reward_components={})
    base.update(kw)
    return base


def _worker(traj_id: str, parent: str, subtask: str, marker: str) -> dict:
    msgs = [{"role": "system", "content": prompts.system_prompt("worker", WORKER_TOOLS)},
            {"role": "user", "content": prompts.worker_user_prompt(Q, subtask)},
            {"role": "assistant", "content": f"{marker} searching\n"
             + render_tool_call("search", "google_search", {"query": subtask})},
            {"role": "user", "content": f"{marker} search results"},
            {"role": "user", "content": prompts.worker_summary_prompt(Q, subtask)},
            {"role": "assistant", "content": f"## Conclusion\n{marker} summary"}]
    return _traj(traj_id, "worker", msgs, parent, final_text=f"## Conclusion\n{marker} summary", tool_calls=1,
                 finish="summary", reward=1.0)


@pytest.fixture
def traces() -> list[dict]:
    planner_msgs = [
        {"role": "system", "content": prompts.system_prompt("planner", PLANNER_TOOLS)},
        {"role": "user", "content": prompts.planner_user_prompt(Q)},
        {"role": "assistant", "content": "<think>plan</think>PLANNER_TURN_1 " + _call("Find founder X's company")},
        {"role": "user", "content": "RESULT_A report"},
        {"role": "assistant", "content": "PLANNER_TURN_2 " + _call("Find the tallest tower of Acme")},
        {"role": "user", "content": "RESULT_B report"},
        {"role": "assistant", "content": f"PLANNER_FINAL {XSS} [bold]not markup[/bold] \\boxed{{Paris}}"},
    ]
    planner = _traj("p1", "planner", planner_msgs, children=["w1", "w2"], reward=1.0, tool_calls=2,
                    reward_components={"accuracy": 1.0, "format": 1.0}, question=Q, ground_truth="Paris",
                    data_source="multihop", accuracy=1.0, some_unknown_key=[1, 2])
    single_msgs = [
        {"role": "system", "content": prompts.system_prompt("single", SINGLE_AGENT_TOOLS)},
        {"role": "user", "content": prompts.single_user_prompt("Capital of France?")},
        {"role": "assistant", "content": "SINGLE_TURN " + render_tool_call("search", "google_search",
                                                                            {"query": "capital of France"})},
        {"role": "user", "content": "SINGLE_RESULT"},
        {"role": "assistant", "content": "\\boxed{Paris}"},
    ]
    single = _traj("s1", "single", single_msgs, reward=0.0, tool_calls=1, tool_errors=1, question="Capital of France?",
                   accuracy=0.0)
    # workers are written before / after their planner in any order; one worker's planner is gone
    return [_worker("w2", "p1", "Find the tallest tower of Acme", "WORKER_B"), planner, single,
            _worker("w1", "p1", "Find founder X's company", "WORKER_A"),
            _worker("w9", "gone", "Orphan subtask", "WORKER_ORPHAN")]


class _Tree(HTMLParser):
    """Records, for each text marker, the classes of the open elements around it; checks nesting."""
    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.texts: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append((tag, dict(attrs).get("class") or ""))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.texts.append((data, [c for _, c in self.stack]))

    def classes_around(self, marker: str, last: bool = False) -> list[str]:
        hits = [cls for text, cls in self.texts if marker in text]
        return hits[-1] if last else hits[0]


def test_group_rollouts(traces):
    rollouts = group_rollouts(traces)
    assert [r.root["traj_id"] if r.root else None for r in rollouts] == ["p1", "s1", None]
    assert [w["traj_id"] for w in rollouts[0].workers] == ["w1", "w2"]  # children order, not file order
    assert rollouts[1].workers == [] and rollouts[2].orphan and rollouts[2].parent_id == "gone"
    assert [w["traj_id"] for w in rollouts[2].workers] == ["w9"]
    # a named child that is absent is reported; a worker missing from `children` is kept
    traces[1]["children"] = ["w1", "w_lost"]
    r = group_rollouts(traces)[0]
    assert r.missing_children == ["w_lost"] and [w["traj_id"] for w in r.workers] == ["w1", "w2"]
    stats = summarize(group_rollouts(traces))
    assert stats["rollouts"] == 2 and stats["orphan_workers"] == 1 and stats["mean_workers_per_planner"] == 2
    assert stats["mean_reward"] == 0.5 and stats["accuracy"] == 0.5
    assert stats["tool_calls"] == 2 + 1 + 3 and stats["tool_errors"] == 1


def test_place_workers_skips_calls_that_spawned_no_worker(traces):
    w = _worker("w1", "p1", "Find A", "WA")
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": _call("Find A", bogus=1)},  # rejected by validation
            {"role": "user", "content": "error"},
            {"role": "assistant", "content": _call("Other") + _call("Find A")}]  # two calls, one worker
    placed, stray = place_workers({"messages": msgs}, [w])
    assert placed == {3: [w]} and stray == []
    # no recap to compare against: call order decides; surplus workers are strays, not dropped
    bare = [_traj(f"x{i}", "worker", [{"role": "user", "content": "plain"}], "p") for i in range(3)]
    placed, stray = place_workers({"messages": msgs}, bare)
    assert placed == {3: bare[:2]} and stray == bare[2:]


def test_render_html(traces, tmp_path):
    out = render_html(traces, tmp_path / "sub" / "t.html", title="Run <7>")
    doc = out.read_text(encoding="utf-8")
    # escaping: model output and title are text, no script anywhere, no external resources
    assert "<script" not in doc.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "<title>Run &lt;7&gt;</title>" in doc and "http" not in doc.split("<main>")[0].split("<style>")[0]
    assert "src=" not in doc and "<link" not in doc
    # header counts
    for key, value in [("rollouts", "2"), ("orphan_workers", "1"), ("mean_reward", "0.500"), ("accuracy", "0.500"),
                       ("mean_workers_per_planner", "2.000"), ("tool_calls", "6"), ("tool_errors", "1")]:
        assert f'id="stat-{key}">{value}</td>' in doc
    # token ids / logprobs never shown, only counts
    assert "987654321" not in doc and "0.123456" not in doc and "9 / 19" in doc
    # worker sections sit between the delegating planner turn and its tool result
    order = ["PLANNER_TURN_1", "WORKER_A searching", "WORKER_A summary", "RESULT_A", "PLANNER_TURN_2",
             "WORKER_B searching", "RESULT_B", "PLANNER_FINAL", "SINGLE_TURN", "WORKER_ORPHAN"]
    pos = [doc.index(m) for m in order]
    assert pos == sorted(pos)
    tree = _Tree()
    tree.feed(doc)
    tree.close()
    assert tree.stack == []  # every element closed, properly nested
    planner_turn = tree.classes_around("PLANNER_TURN_1")
    assert "rollout" in planner_turn and "msg assistant" in planner_turn and "worker" not in planner_turn
    worker_turn = tree.classes_around("WORKER_A searching")
    assert worker_turn[worker_turn.index("rollout"):][:4] == ["rollout", "workers", "worker", "msg assistant"]
    assert "rollout orphan" in tree.classes_around("WORKER_ORPHAN")
    assert "final" in tree.classes_around("WORKER_B summary", last=True)
    assert "msg tool" in tree.classes_around("RESULT_A")
    # tool calls highlighted; system prompt collapsed (no `open`); question / ground truth shown
    assert '<span class="toolcall">&lt;use_mcp_tool&gt;' in doc and '<span class="think">' in doc
    assert '<details class="msg system"><summary' in doc and doc.count('class="worker"') == 3
    assert "<td>ground truth</td><td>Paris</td>" in doc and "accuracy=1.000, format=1.000" in doc


def test_render_terminal(traces):
    long = "L" * 5000 + " TAIL_END"
    traces[1]["messages"][3]["content"] = long
    console = Console(record=True, width=120, file=io.StringIO())
    render_terminal(traces, console=console, max_chars=300)
    text = console.export_text()
    assert XSS in text and "[bold]not markup[/bold]" in text  # literal, not interpreted as markup
    assert "chars omitted" in text and "TAIL_END" in text and "L" * 400 not in text
    assert "system prompt (" in text and "You are a capable assistant" not in text
    order = ["PLANNER_TURN_1", "worker: Find founder X's company", "WORKER_A summary", "TAIL_END", "PLANNER_TURN_2",
             "WORKER_B searching", "RESULT_B", "SINGLE_TURN", "orphan workers (1) of missing planner gone"]
    pos = [text.index(m) for m in order]
    assert pos == sorted(pos)
    assert "rollouts: 2" in text and "mean workers per planner: 2.000" in text and "ground truth: Paris" in text
    assert "987654321" not in text


def test_trajectory_objects_are_accepted(tmp_path):
    t = Trajectory(traj_id="t", role="single", group_id="g", sample_uid="s", parent_id=None, token_ids=[1, 2],
                   loss_mask=[0, 1], logprobs=[0.0, -1.0], prompt_len=1,
                   messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   final_text="yo", reward=1.0)
    doc = render_html([t], tmp_path / "t.html").read_text()
    assert 'id="stat-rollouts">1<' in doc and "accuracy" not in doc.split("</header>")[0]


def test_load_traces_and_cli(traces, tmp_path, capsys):
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in traces) + "\n\n", encoding="utf-8")
    assert load_traces(path) == traces
    assert main([str(path), "--html", str(tmp_path / "o.html"), "--terminal", "--max-chars", "200"]) == 0
    assert "PLANNER_TURN_1" in capsys.readouterr().out and "WORKER_A" in (tmp_path / "o.html").read_text()
    assert main([str(path), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "PLANNER_TURN_1" in out and "SINGLE_TURN" not in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(traces[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_traces(bad)
    bad.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: expected a JSON object"):
        load_traces(bad)
    with pytest.raises(SystemExit):
        main([str(bad), "--terminal"])
    assert "expected a JSON object" in capsys.readouterr().err
