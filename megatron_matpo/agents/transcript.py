"""Readable transcripts of rollout traces: one static HTML page, or a `rich` tree in the terminal.

Input: a traces JSONL file, one `Trajectory.to_json()` per line, optionally with the extra keys
`question`, `ground_truth`, `data_source` and `accuracy` (unknown keys are ignored). Trajectories
are regrouped into rollouts (a planner or single-agent root plus its workers) and every worker is
shown right after the planner turn that delegated to it. Token ids and logprobs are never shown,
only counts (generated tokens = sum(loss_mask)).

    python -m megatron_matpo.agents.transcript traces.jsonl --html out.html
    python -m megatron_matpo.agents.transcript traces.jsonl --terminal
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text
from rich.tree import Tree

from megatron_matpo.agents.toolcall import parse_tool_calls, validate_call
from megatron_matpo.toolbox.specs import AGENT_SERVER, PLANNER_TOOLS

Trace = dict[str, Any]

# Tool calls (tolerant like the parser; an unterminated one runs to the end) and reasoning blocks.
_HIGHLIGHT_RE = re.compile(r"(?P<tool><\s*use_mcp_tool\s*>.*?(?:<\s*/\s*use_mcp_tool\s*>|\Z))"
                           r"|(?P<think><think>.*?</think>)", re.I | re.S)
_TOOL_OPEN_RE = re.compile(r"<\s*use_mcp_tool\s*>", re.I)
_SUBTASK_RE = re.compile(r"<subtask>\s*(.*?)\s*</subtask>", re.S)


# ---------------------------------------------------------------- loading and grouping

def load_traces(path: str | os.PathLike[str]) -> list[Trace]:
    """Every trajectory of a traces JSONL file; a malformed line is an error naming the line."""
    out: list[Trace] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            out.append(row)
    return out


@dataclass
class Rollout:
    root: Trace | None  # the planner / single trajectory; None for a group of orphan workers
    workers: list[Trace] = field(default_factory=list)  # the root's `children` order, then strays
    missing_children: list[str] = field(default_factory=list)  # named by the root, absent from traces
    parent_id: str | None = None  # orphans: the (missing) planner they name

    @property
    def orphan(self) -> bool:
        return self.root is None

    @property
    def trajectories(self) -> list[Trace]:
        return ([self.root] if self.root is not None else []) + self.workers


def _as_dict(t: Any) -> Trace:
    return t.to_json() if hasattr(t, "to_json") else dict(t)


def group_rollouts(traces: Iterable[Mapping | Any]) -> list[Rollout]:
    """Roots in file order with their workers attached; workers whose parent is absent come last,
    grouped by the parent id they name (listed as orphans, never dropped)."""
    traces = [_as_dict(t) for t in traces]
    roots: dict[str, Rollout] = {}
    order: list[Rollout] = []
    for i, t in enumerate(traces):
        if t.get("role") != "worker":
            r = Rollout(root=t)
            order.append(r)
            roots.setdefault(str(t.get("traj_id", f"#{i}")), r)
    kids: dict[str, list[Trace]] = {}
    for t in traces:
        if t.get("role") == "worker":
            kids.setdefault(str(t.get("parent_id")), []).append(t)
    for pid, r in roots.items():
        mine = kids.pop(pid, [])
        by_id = {str(w.get("traj_id")): w for w in mine}
        named = [str(c) for c in r.root.get("children") or []]
        r.workers = [by_id[c] for c in named if c in by_id]
        r.missing_children = [c for c in named if c not in by_id]
        r.workers += [w for w in mine if str(w.get("traj_id")) not in named]  # not in `children`: keep
    orphans = [Rollout(root=None, workers=ws, parent_id=None if pid == "None" else pid) for pid, ws in kids.items()]
    return order + orphans


def worker_subtask(worker: Mapping) -> str | None:
    """The subtask from the worker's query recap (first user message), if it has the recap format."""
    for m in worker.get("messages") or []:
        if m.get("role") == "user":
            hit = _SUBTASK_RE.search(str(m.get("content", "")))
            return hit.group(1) if hit else None
    return None


def _delegations(text: str) -> list[str]:
    """Subtasks of the valid browsing-agent calls of one planner message (those spawn a worker)."""
    calls = parse_tool_calls(text).calls
    return [str(c.arguments["subtask"]).strip() for c in calls
            if c.server == AGENT_SERVER and not validate_call(c, PLANNER_TOOLS)]


def place_workers(root: Mapping, workers: Sequence[Trace]) -> tuple[dict[int, list[Trace]], list[Trace]]:
    """({message index of a delegating assistant turn: its workers}, workers matched to no turn).
    Calls and workers are matched in order; a worker whose recap names a different subtask than the
    call is skipped for that call (the call spawned no worker, e.g. it was cut by a per-turn limit)."""
    queue = list(workers)
    placed: dict[int, list[Trace]] = {}
    for i, m in enumerate(root.get("messages") or []):
        if m.get("role") != "assistant" or not queue:
            continue
        for sub in _delegations(str(m.get("content", ""))):
            j = next((k for k, w in enumerate(queue) if worker_subtask(w) == sub), None)
            if j is None and queue and worker_subtask(queue[0]) is None:
                j = 0  # no recap to compare: trust call order
            if j is not None:
                placed.setdefault(i, []).append(queue.pop(j))
            if not queue:
                break
    return placed, queue


# ---------------------------------------------------------------- statistics

def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) else None  # bools count as 0/1


def generated_tokens(t: Mapping) -> int:
    return int(sum(t.get("loss_mask") or []))


def summarize(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """Header numbers: counts, means over rollouts (roots), totals over every trajectory."""
    roots = [r.root for r in rollouts if r.root is not None]
    planners = [r for r in rollouts if r.root is not None and r.root.get("role") == "planner"]
    every = [t for r in rollouts for t in r.trajectories]
    rewards = [x for x in (_num(t.get("reward")) for t in roots) if x is not None]
    acc = [x for x in (_num(t.get("accuracy")) for t in roots) if x is not None]
    return {
        "rollouts": len(roots),
        "planners": len(planners),
        "single": sum(t.get("role") == "single" for t in roots),
        "workers": sum(t.get("role") == "worker" for t in every),
        "orphan_workers": sum(len(r.workers) for r in rollouts if r.orphan),
        "mean_reward": _mean(rewards),
        "accuracy": _mean(acc),
        "mean_workers_per_planner": _mean([len(r.workers) for r in planners]),
        "tool_calls": sum(int(t.get("tool_calls") or 0) for t in every),
        "tool_errors": sum(int(t.get("tool_errors") or 0) for t in every),
        "generated_tokens": sum(generated_tokens(t) for t in every),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _components(t: Mapping) -> str:
    comp = t.get("reward_components") or {}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in comp.items()) if isinstance(comp, Mapping) else str(comp)


def _question(t: Mapping) -> str:
    q = t.get("question")
    if q is None:  # fall back to the first user message
        q = next((m.get("content") for m in t.get("messages") or [] if m.get("role") == "user"), "")
    return str(q or "")


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _msg_label(msgs: Sequence[Mapping], i: int) -> str:
    """user messages after a tool-calling assistant turn are tool results."""
    role = str(msgs[i].get("role", "?"))
    prev = msgs[i - 1] if i > 0 else {}
    if role == "user" and prev.get("role") == "assistant" and _TOOL_OPEN_RE.search(str(prev.get("content", ""))):
        return "tool result"
    return role


# ---------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}table.stats td,table.meta td{padding:2px 10px 2px 0;vertical-align:top}
table.stats td:first-child,table.meta td:first-child{color:#666;white-space:nowrap}
details.rollout{border:1px solid #ccc;border-radius:6px;margin:.8em 0;padding:.3em .8em}
details.rollout>summary{cursor:pointer;font-weight:600}
details.orphan{border-color:#c55}
pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font:12.5px/1.4 ui-monospace,monospace}
.msg{margin:.5em 0;padding:.3em .6em;border-radius:4px;border-left:4px solid #bbb;background:#f7f7f7}
.msg .who{font-size:.8em;color:#555;text-transform:uppercase;letter-spacing:.04em}
.msg.assistant{border-left-color:#2a6fdb;background:#eef4ff}
.msg.tool{border-left-color:#999;background:#fafafa}
.msg.system{border-left-color:#777;background:#f0f0f0}
.toolcall{background:#fff3c4;outline:1px solid #e0b400;border-radius:3px}
.think{color:#777;font-style:italic}
.workers{margin:.4em 0 .8em 2.2em}
details.worker{border:1px solid #e3a15a;border-left:4px solid #e3a15a;border-radius:4px;margin:.5em 0;
 padding:.3em .7em;background:#fffaf4}
details.worker>summary{cursor:pointer;font-weight:600;color:#8a4b00}
.final{border:1px dashed #3a3;background:#f3fbf3;padding:.3em .6em;margin:.5em 0;border-radius:4px}
.note{color:#a33}
"""

_e = html.escape


def _html_text(text: str) -> str:
    """Escaped text, tool-call blocks and reasoning wrapped in highlight spans."""
    out, pos = [], 0
    for m in _HIGHLIGHT_RE.finditer(text):
        out.append(_e(text[pos:m.start()]))
        out.append(f'<span class="{"toolcall" if m.group("tool") else "think"}">{_e(m.group(0))}</span>')
        pos = m.end()
    out.append(_e(text[pos:]))
    return "".join(out)


def _html_meta(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in rows if v not in (None, ""))
    return f'<table class="meta">{body}</table>'


def _traj_rows(t: Mapping) -> list[tuple[str, Any]]:
    return [("reward", _num(t.get("reward"))), ("reward components", _components(t)),
            ("finish", t.get("finish")), ("turns", t.get("turns")),
            ("tool calls / errors", f"{t.get('tool_calls', 0)} / {t.get('tool_errors', 0)}"),
            ("format score", _num(t.get("format_score"))),
            ("tokens (generated / total)", f"{generated_tokens(t)} / {len(t.get('token_ids') or [])}"),
            ("traj id", t.get("traj_id")), ("group / sample", f"{t.get('group_id')} / {t.get('sample_uid')}")]


def _html_conv(t: Mapping, placed: Mapping[int, Sequence[Trace]], out: list[str]) -> None:
    msgs = t.get("messages") or []
    turn = 0
    for i, m in enumerate(msgs):
        label, text = _msg_label(msgs, i), str(m.get("content", ""))
        if label == "system":
            out.append(f'<details class="msg system"><summary class="who">system prompt ({len(text)} chars)'
                       f"</summary><pre>{_e(text)}</pre></details>")
            continue
        if label == "assistant":
            turn += 1
            label = f"assistant · turn {turn}"
        cls = "tool" if label == "tool result" else "assistant" if m.get("role") == "assistant" else "user"
        out.append(f'<div class="msg {cls}"><div class="who">{_e(label)}</div><pre>{_html_text(text)}</pre></div>')
        if placed.get(i):
            out.append('<div class="workers">')
            for w in placed[i]:
                _html_worker(w, out)
            out.append("</div>")


def _html_worker(w: Mapping, out: list[str]) -> None:
    sub = worker_subtask(w) or _question(w)
    out.append(f'<details class="worker" open><summary>worker · {_e(_short(sub, 110))} · {_e(_fmt(w.get("turns")))} '
               f'turns · {_e(_fmt(w.get("tool_calls")))} calls · finish {_e(_fmt(w.get("finish")))}</summary>')
    out.append(_html_meta([("subtask", sub), *_traj_rows(w)]))
    _html_conv(w, {}, out)
    out.append(f'<div class="final"><div class="who">final summary (returned to the planner)</div>'
               f'<pre>{_e(str(w.get("final_text") or "(empty)"))}</pre></div></details>')


def _html_rollout(n: int, r: Rollout, out: list[str]) -> None:
    if r.root is None:
        out.append(f'<details class="rollout orphan"><summary>orphan workers ({len(r.workers)}) of missing '
                   f'planner {_e(str(r.parent_id))}</summary><div class="workers">')
        for w in r.workers:
            _html_worker(w, out)
        out.append("</div></details>")
        return
    t = r.root
    role = str(t.get("role", "?"))
    head = [f"#{n} {role}", f"reward {_fmt(_num(t.get('reward')))}"]
    if t.get("accuracy") is not None:
        head.append(f"accuracy {_fmt(_num(t.get('accuracy')))}")
    head += [f"finish {_fmt(t.get('finish'))}"] + ([f"{len(r.workers)} workers"] if role == "planner" else [])
    out.append(f'<details class="rollout" id="rollout-{n}"><summary>{_e(" · ".join(head))} — '
               f"{_e(_short(_question(t), 120))}</summary>")
    out.append(_html_meta([("question", _question(t)), ("ground truth", t.get("ground_truth")),
                           ("data source", t.get("data_source")), ("accuracy", _num(t.get("accuracy"))),
                           *_traj_rows(t)]))
    placed, stray = place_workers(t, r.workers)
    _html_conv(t, placed, out)
    if stray:
        out.append('<p class="note">workers matched to no planner turn:</p><div class="workers">')
        for w in stray:
            _html_worker(w, out)
        out.append("</div>")
    if r.missing_children:
        out.append(f'<p class="note">children absent from the traces: {_e(", ".join(r.missing_children))}</p>')
    out.append("</details>")


_STAT_LABELS = (("rollouts", "rollouts"), ("planners", "planner rollouts"), ("single", "single-agent rollouts"),
                ("workers", "worker trajectories"), ("orphan_workers", "orphan workers"),
                ("mean_reward", "mean reward"), ("accuracy", "accuracy"),
                ("mean_workers_per_planner", "mean workers per planner"), ("tool_calls", "tool calls"),
                ("tool_errors", "tool errors"), ("generated_tokens", "generated tokens"))


def render_html(traces: Iterable[Mapping | Any], out_path: str | os.PathLike[str],
                title: str = "Rollout transcripts") -> Path:
    """Write one self-contained HTML file (inline CSS, no scripts); returns its path."""
    rollouts = group_rollouts(traces)
    stats = summarize(rollouts)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<header><h1>{_e(title)}</h1><table class=\"stats\">"]
    for key, label in _STAT_LABELS:
        if stats[key] is not None:
            out.append(f'<tr><td>{_e(label)}</td><td id="stat-{key}">{_e(_fmt(stats[key]))}</td></tr>')
    out.append("</table></header><main>")
    for n, r in enumerate(rollouts, 1):
        _html_rollout(n, r, out)
    out.append("</main></body></html>\n")
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out), encoding="utf-8")
    return path


# ---------------------------------------------------------------- terminal

def _term_text(text: str, max_chars: int) -> Text:
    """Head and tail of a long message (a final tool call stays visible), calls highlighted."""
    def styled(s: str) -> Text:
        t = Text(s)
        for m in _HIGHLIGHT_RE.finditer(s):
            t.stylize("bold yellow" if m.group("tool") else "dim italic", m.start(), m.end())
        return t
    if max_chars <= 0 or len(text) <= max_chars:
        return styled(text)
    head, tail = max_chars * 2 // 3, max_chars - max_chars * 2 // 3
    return Text.assemble(styled(text[:head]), (f" … [{len(text) - head - tail} chars omitted] … ", "dim"),
                         styled(text[len(text) - tail:] if tail else ""))


def _term_conv(node: Tree, t: Mapping, placed: Mapping[int, Sequence[Trace]], max_chars: int) -> None:
    msgs = t.get("messages") or []
    turn = 0
    for i, m in enumerate(msgs):
        label, text = _msg_label(msgs, i), str(m.get("content", ""))
        if label == "system":
            node.add(Text(f"system prompt ({len(text)} chars, hidden)", style="dim"))
            continue
        if label == "assistant":
            turn += 1
            head = Text(f"assistant · turn {turn}: ", style="bold cyan")
        else:
            head = Text(f"{label}: ", style="bold magenta" if label == "tool result" else "bold green")
        child = node.add(Text.assemble(head, _term_text(text, max_chars)))
        for w in placed.get(i, ()):
            _term_worker(child, w, max_chars)


def _term_worker(node: Tree, w: Mapping, max_chars: int) -> None:
    sub = worker_subtask(w) or _question(w)
    wn = node.add(Text.assemble(("worker: ", "bold dark_orange"), _short(sub, 100),
                                (f"  [{_fmt(w.get('turns'))} turns, {_fmt(w.get('tool_calls'))} calls, "
                                 f"{_fmt(w.get('tool_errors'))} errors, finish {_fmt(w.get('finish'))}, "
                                 f"{generated_tokens(w)} gen tokens]", "dim")))
    _term_conv(wn, w, {}, max_chars)
    wn.add(Text.assemble(("final summary: ", "bold green"), _term_text(str(w.get("final_text") or "(empty)"),
                                                                       max_chars)))


def render_terminal(traces: Iterable[Mapping | Any], console: Console | None = None,
                    max_chars: int = 1500) -> Console:
    """Print the header panel and one tree per rollout; messages cut to `max_chars` (0: no cut)."""
    console = console or Console()
    rollouts = group_rollouts(traces)
    stats = summarize(rollouts)
    console.print(Panel(Text("\n".join(f"{label}: {_fmt(stats[k])}" for k, label in _STAT_LABELS
                                       if stats[k] is not None)), title="rollout transcripts"))
    for n, r in enumerate(rollouts, 1):
        if r.root is None:
            tree = Tree(Text(f"orphan workers ({len(r.workers)}) of missing planner {r.parent_id}", style="bold red"))
            for w in r.workers:
                _term_worker(tree, w, max_chars)
            console.print(tree)
            continue
        t = r.root
        tree = Tree(Text(f"#{n} {t.get('role', '?')} · reward {_fmt(_num(t.get('reward')))} · "
                         f"finish {_fmt(t.get('finish'))}" + (f" · {len(r.workers)} workers"
                                                              if t.get("role") == "planner" else ""), style="bold"))
        for key, value in (("question", _question(t)), ("ground truth", t.get("ground_truth")),
                           ("accuracy", _num(t.get("accuracy"))), ("reward components", _components(t)),
                           ("tool calls / errors", f"{t.get('tool_calls', 0)} / {t.get('tool_errors', 0)}"),
                           ("generated tokens", generated_tokens(t))):
            if value not in (None, ""):
                tree.add(Text.assemble((f"{key}: ", "bold"), _short(_fmt(value), max(max_chars, 80))))
        placed, stray = place_workers(t, r.workers)
        _term_conv(tree, t, placed, max_chars)
        for w in stray:
            _term_worker(tree.add(Text("worker matched to no planner turn", style="red")), w, max_chars)
        if r.missing_children:
            tree.add(Text(f"children absent from the traces: {', '.join(r.missing_children)}", style="red"))
        console.print(tree)
    return console


# ---------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_matpo.agents.transcript",
                                description="Render rollout traces (JSONL) as HTML or in the terminal.")
    p.add_argument("traces", help="traces JSONL file, one trajectory per line")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML file")
    p.add_argument("--terminal", action="store_true", help="print to the terminal (default without --html)")
    p.add_argument("--title", default=None, help="HTML page title")
    p.add_argument("--max-chars", type=int, default=1500, help="terminal: cut messages longer than this")
    p.add_argument("--limit", type=int, default=None, help="only the first N rollouts")
    args = p.parse_args(argv)
    try:
        traces = load_traces(args.traces)
    except (OSError, ValueError) as err:
        p.error(str(err))
    if args.limit is not None:
        traces = [t for r in group_rollouts(traces)[: args.limit] for t in r.trajectories]
    if args.html:
        path = render_html(traces, args.html, title=args.title or f"Rollout transcripts: {Path(args.traces).name}")
        print(f"wrote {path}", file=sys.stderr)
    if args.terminal or not args.html:
        render_terminal(traces, max_chars=args.max_chars)
    return 0


if __name__ == "__main__":
    sys.exit(main())
