"""Prompt text for the planner, the worker (browsing agent) and the single-agent baseline.

The tool list inside the system prompt is generated from `toolbox.specs`, so the prompt, the
tool-call validator and the MCP servers can never disagree about names or argument schemas.
Prompts are kept short on purpose: tiny CPU test models see them too, and every token of the
system prompt is paid for on every turn of every rollout.

Two styles (`workflow.prompt_style`): "full", the MATPO prompts for real models, and "compact", the
same roles, tool-call format, tool list and report headings in a few lines, for the tiny models of the
embedded default: a model of ~2M parameters learns to copy an entity across a ~650-token worker
conversation in minutes (configs/tiny_sft_cpu.yaml), not across the ~1.7k of a full-style one. Both styles keep the markers a
transcript or the SFT oracle reads: "# Your role: <role>", `<subtask>` tags, the summary request's
first line.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Literal

from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.toolbox.specs import AGENT_SERVER, ToolSpec

Role = Literal["planner", "worker", "single"]
ROLES: tuple[str, ...] = ("planner", "worker", "single")
STYLES: tuple[str, ...] = ("full", "compact")

TOOL_OPEN, TOOL_CLOSE = "<use_mcp_tool>", "</use_mcp_tool>"
THINK_CLOSE = "</think>"
DEFAULT_SUMMARY_CHARS = 20_000


_FORMAT_BLOCK = """# How to call a tool
Put the call at the very end of your message, written exactly like this:

{example}

Rules:
- At most one tool call per message, and nothing may follow it.
- The arguments are one JSON object matching the tool's input schema: give every required argument and no unknown ones.
- The tool's result comes back to you in the next user message. Wait for it; never invent a result.
- If a call fails, read the error, fix the call or try another approach.
- A message without a tool call means you need no more tools."""

_OBJECTIVE_BLOCK = """# Objective
Complete the task accurately. Work step by step: split it into small steps, use one tool per step and base every claim on what the tools returned. Do not guess a fact that a tool can check; if sources disagree, look for another source."""


def _tools_block(tools: Sequence[ToolSpec]) -> str:
    if not tools:
        return "# Available tools\n(none: answer from what you already know)"
    by_server: dict[str, list[ToolSpec]] = {}
    for t in tools:  # keep first-seen order of servers and tools: stable prompt text
        by_server.setdefault(t.server, []).append(t)
    parts = ["# Available tools"]
    for server, specs in by_server.items():
        parts.append(f"## Server: {server}")
        for t in specs:
            parts.append(f"### Tool: {t.name}\n{t.description}\n"
                         f"Input JSON schema: {json.dumps(t.input_schema, ensure_ascii=False)}")
    return "\n\n".join(parts)


def _example_call(tools: Sequence[ToolSpec]) -> str:
    if not tools:
        return render_tool_call("SERVER_NAME", "TOOL_NAME", {"argument": "value"})
    t = tools[0]
    props = t.input_schema.get("properties", {})
    args = {n: f"<{props.get(n, {}).get('description', n)}>" for n in t.required} or {"argument": "value"}
    return render_tool_call(t.server, t.name, args)


def _tool_refs(tools: Sequence[ToolSpec]) -> str:
    return " or ".join(f"`{t.name}` (server `{t.server}`)" for t in tools)


def _role_block(role: str, tools: Sequence[ToolSpec]) -> str:
    if role == "planner":
        agents = [t for t in tools if t.server == AGENT_SERVER] or list(tools)
        via = _tool_refs(agents) if agents else "the agent tool"
        return (
            "# Your role: planner\n"
            "You solve the user's task by delegating the research to a browsing agent.\n"
            f"- Split the task into subtasks and send them one at a time with {via}.\n"
            "- The agent does not see this conversation: make each subtask self-contained and name "
            "every entity explicitly.\n"
            "- Read each report, then decide the next subtask. If a report is incomplete or contradicts "
            "another, send a follow-up subtask.\n"
            "- When you know the answer, end with a short final answer in \\boxed{}, e.g. "
            "\\boxed{Paris}, in a message without a tool call.")
    if role == "worker":
        return (
            "# Your role: browsing agent\n"
            "A planner agent assigned you a subtask. Find the facts it needs:\n"
            "- Search with focused queries, open promising pages and read them; snippets alone can "
            "mislead.\n"
            "- Cross-check important facts in a second source when you can.\n"
            "- Report factual content only, with the URL of every source, and say clearly what you "
            "could not find.\n"
            "- You cannot delegate to other agents.")
    return (
        "# Your role: solver\n"
        "Solve the user's task yourself: search the web, open and read the relevant pages, and verify "
        "the facts you rely on.\n"
        "When you know the answer, end with a short final answer in \\boxed{}, e.g. \\boxed{Paris}, "
        "in a message without a tool call.")


_COMPACT_ROLE = {
    "planner": ("planner", "Send one self-contained subtask at a time to the browsing agent, naming its entity. "
                           "When you know the answer, write it in \\boxed{} without a tool call."),
    "worker": ("browsing agent", "Search the subtask's entity, scrape its page, then say what you found."),
    "single": ("solver", "Search each entity, scrape its page; when you know the answer, write it in \\boxed{} "
                         "without a tool call."),
}


def _style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")
    return style


def system_prompt(role: Role, tools: Sequence[ToolSpec], style: str = "full") -> str:
    """Tool-use format and rules, the generated tool list, objective, then the role block (compact: the
    role marker, its task in one line, each tool as `server/tool {required arguments}`, the call's tags)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if _style(style) == "compact":
        name, task = _COMPACT_ROLE[role]
        listed = "; ".join(f"{t.server}/{t.name} {{{', '.join(repr(a) for a in t.required)}}}" for t in tools)
        return (f"# Your role: {name}\n{task}\nTools (server/tool {{arguments}}): {listed or 'none'}. "
                f"Call one at the end of a message as {TOOL_OPEN}<server_name>, <tool_name>, <arguments> as "
                f"JSON{TOOL_CLOSE}.")
    intro = "You are a capable assistant that can use tools to complete tasks."
    return "\n\n".join([
        intro,
        _FORMAT_BLOCK.format(example=_example_call(tools)),
        _tools_block(tools),
        _OBJECTIVE_BLOCK,
        _role_block(role, tools),
    ])


def _need(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


_BOXED_INSTRUCTION = ("Think step by step and use the tools as needed. Put your final answer, as short as "
                      "possible, in \\boxed{} at the end of your last message.")


def planner_user_prompt(question: str, style: str = "full") -> str:
    if _style(style) == "compact":
        return _need("question", question)
    return f"{_need('question', question)}\n\n{_BOXED_INSTRUCTION}"


def single_user_prompt(question: str, style: str = "full") -> str:
    return planner_user_prompt(question, style)


def worker_user_prompt(main_task: str, subtask: str, style: str = "full") -> str:
    """Query recap: the worker sees the planner's original question next to its own subtask."""
    main_task, subtask = _need("main_task", main_task), _need("subtask", subtask)
    if _style(style) == "compact":
        return f"Main task: {main_task}\n<subtask>\n{subtask}\n</subtask>"
    return (
        "You are helping a planner agent that is working on this main task:\n"
        f"<main_task>\n{main_task}\n</main_task>\n\n"
        "The planner assigned you this subtask:\n"
        f"<subtask>\n{subtask}\n</subtask>\n\n"
        "Solve the subtask with your tools. Your final answer is returned to the planner, so keep it "
        "factual, cite source URLs and mention anything else you found that helps the main task.")


# the worker report's sections (heading, what goes there), in order
SUMMARY_SECTIONS: tuple[tuple[str, str], ...] = (
    ("## Conclusion", "The direct answer to the subtask, or a clear statement that it was not found."),
    ("## Supporting Information", "The facts behind the conclusion, each with its source URL."),
    ("## Observations", "Uncertainties, conflicting sources, and what remains unverified."),
    ("## Contribution to Main Task", "How this result helps answer the main task, and what the planner could "
                                     "check next."),
)


SUMMARY_REQUEST = "Stop working now. Do NOT call any tool: a tool call in this message will be ignored."


def worker_summary_prompt(main_task: str, subtask: str, style: str = "full") -> str:
    """Last worker turn: no tools, a structured report the planner can rely on (compact: the headings
    only; the worker's context already holds the task)."""
    main_task, subtask = _need("main_task", main_task), _need("subtask", subtask)
    if _style(style) == "compact":
        return f"{SUMMARY_REQUEST}\nReport under: " + ", ".join(h for h, _ in SUMMARY_SECTIONS)
    return (
        f"{SUMMARY_REQUEST}\n"
        "Write your final report for the planner.\n\n"
        f"Main task: {main_task}\n"
        f"Your subtask: {subtask}\n\n"
        "Use exactly these sections:\n"
        + "\n".join(f"{heading}\n{what}" for heading, what in SUMMARY_SECTIONS))


# Tolerant of case and inner spaces, like the tool-call parser: a sloppy block must not leak through.
_TOOL_OPEN_RE = re.compile(r"<\s*use_mcp_tool\s*>", re.IGNORECASE)
_TOOL_BLOCK_RE = re.compile(_TOOL_OPEN_RE.pattern + r".*?<\s*/\s*use_mcp_tool\s*>", re.IGNORECASE | re.DOTALL)


def clean_worker_summary(text: str, max_chars: int = DEFAULT_SUMMARY_CHARS) -> str:
    """Worker summary as the planner sees it: no reasoning, no tool calls, bounded length."""
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    cut = text.rfind(THINK_CLOSE)
    if cut >= 0:
        text = text[cut + len(THINK_CLOSE):]
    text = _TOOL_BLOCK_RE.sub("", text)
    unterminated = _TOOL_OPEN_RE.search(text)  # a call cut off by the length limit
    if unterminated:
        text = text[:unterminated.start()]
    return text.strip()[:max_chars]


def nested_agent_refusal() -> str:
    return ("Error: browsing agents cannot call other agents. Use your own search and scrape tools "
            "to finish the subtask, or write your answer.")


def tool_error_message(server: str, tool: str, error: str | BaseException) -> str:
    return (f"Error: the call to tool `{tool}` on server `{server}` failed: {error}\n"
            "Check the server name, tool name and arguments, then retry or try another approach.")
