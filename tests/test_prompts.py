import json

import pytest

from megatron_matpo.agents.toolcall import render_tool_call
from megatron_matpo.agents.prompts import (
    SUMMARY_REQUEST, SUMMARY_SECTIONS, clean_worker_summary, nested_agent_refusal, planner_user_prompt,
    single_user_prompt,
    system_prompt, tool_error_message, worker_summary_prompt, worker_user_prompt,
)
from megatron_matpo.toolbox.specs import (
    AGENT_SERVER, PLANNER_TOOLS, SEARCH_SERVER, SINGLE_AGENT_TOOLS, WORKER_TOOLS,
)

ROLE_TOOLS = {"planner": PLANNER_TOOLS, "worker": WORKER_TOOLS, "single": SINGLE_AGENT_TOOLS}


@pytest.mark.parametrize("role", list(ROLE_TOOLS))
def test_system_prompt_lists_every_tool_with_schema(role):
    tools = ROLE_TOOLS[role]
    text = system_prompt(role, tools)
    for tag in ("<use_mcp_tool>", "<server_name>", "<tool_name>", "<arguments>", "</use_mcp_tool>"):
        assert tag in text
    assert "one tool call per message" in text and "end of your message" in text
    assert "next user message" in text
    for t in tools:
        assert f"## Server: {t.server}" in text
        assert f"### Tool: {t.name}" in text
        assert t.description in text
        assert json.dumps(t.input_schema) in text
    # tools of other roles are not offered
    others = {t.name for ts in ROLE_TOOLS.values() for t in ts} - {t.name for t in tools}
    for name in others:
        assert f"### Tool: {name}" not in text


def test_role_blocks():
    planner = system_prompt("planner", PLANNER_TOOLS)
    worker = system_prompt("worker", WORKER_TOOLS)
    single = system_prompt("single", SINGLE_AGENT_TOOLS)
    assert "\\boxed{}" in planner and "\\boxed{}" in single and "\\boxed" not in worker
    assert "`search_and_browse` (server `browsing_agent`)" in planner
    assert "URL" in worker and "Cross-check" in worker and "cannot delegate" in worker
    assert planner.index("# Available tools") < planner.index("# Objective") < planner.index("# Your role")


def test_tools_grouped_by_server():
    text = system_prompt("planner", (*WORKER_TOOLS, *PLANNER_TOOLS))
    assert text.count(f"## Server: {SEARCH_SERVER}") == 1 and text.count(f"## Server: {AGENT_SERVER}") == 1
    search = text.index(f"## Server: {SEARCH_SERVER}")
    agent = text.index(f"## Server: {AGENT_SERVER}")
    assert search < text.index("### Tool: google_search") < text.index("### Tool: scrape") < agent
    assert agent < text.index("### Tool: search_and_browse")


def test_system_prompt_bad_role():
    with pytest.raises(ValueError, match="unknown role"):
        system_prompt("critic", WORKER_TOOLS)


def test_format_tool_call_example_matches_syntax():
    call = render_tool_call("s", "t", {"q": "x"})
    assert call == ('<use_mcp_tool>\n<server_name>s</server_name>\n<tool_name>t</tool_name>\n'
                    '<arguments>\n{"q": "x"}\n</arguments>\n</use_mcp_tool>')
    assert render_tool_call(AGENT_SERVER, "search_and_browse", {"subtask": "<the subtask, self-contained>"}) in \
        system_prompt("planner", PLANNER_TOOLS)


def test_user_prompts():
    for fn in (planner_user_prompt, single_user_prompt):
        text = fn("  Who founded Acme?  ")
        assert text.startswith("Who founded Acme?\n") and "\\boxed{}" in text
        with pytest.raises(ValueError, match="question"):
            fn("   ")


def test_worker_recap_has_main_task_and_subtask():
    text = worker_user_prompt("Where was the founder of Acme born?", "Find the founder of Acme.")
    assert "Where was the founder of Acme born?" in text and "Find the founder of Acme." in text
    assert "main task" in text and "subtask" in text and "returned to the planner" in text
    with pytest.raises(ValueError, match="subtask"):
        worker_user_prompt("main", "")


def test_worker_summary_prompt():
    text = worker_summary_prompt("MAIN TASK TEXT", "SUBTASK TEXT")
    assert "MAIN TASK TEXT" in text and "SUBTASK TEXT" in text
    assert "Do NOT call any tool" in text
    sections = ["## Conclusion", "## Supporting Information", "## Observations", "## Contribution to Main Task"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)


@pytest.mark.parametrize("role", list(ROLE_TOOLS))
def test_compact_style_keeps_the_roles_tools_and_markers(role):
    """The tiny models' style: the role marker the oracle and transcripts read, every tool of the role
    (and none of another's) with its required arguments, the call's tags; a sixth of the full prompt."""
    tools = ROLE_TOOLS[role]
    text = system_prompt(role, tools, "compact")
    marker = {"planner": "# Your role: planner", "worker": "# Your role: browsing agent",
              "single": "# Your role: solver"}
    assert text.startswith(marker[role] + "\n") and marker[role] in system_prompt(role, tools)
    for t in tools:
        assert f"{t.server}/{t.name} {{{', '.join(repr(a) for a in t.required)}}}" in text
    others = {t.name for ts in ROLE_TOOLS.values() for t in ts} - {t.name for t in tools}
    assert not any(f"/{name} " in text for name in others)
    assert "<use_mcp_tool>" in text and "</use_mcp_tool>" in text and ("\\boxed{}" in text) == (role != "worker")
    assert len(text) * 5 < len(system_prompt(role, tools)), (len(text), len(system_prompt(role, tools)))


def test_compact_user_and_summary_prompts():
    assert planner_user_prompt(" Who founded Acme? ", "compact") == "Who founded Acme?"
    assert single_user_prompt("Who founded Acme?", "compact") == "Who founded Acme?"
    recap = worker_user_prompt("Where was the founder of Acme born?", "Who founded Acme?", "compact")
    assert recap == "Main task: Where was the founder of Acme born?\n<subtask>\nWho founded Acme?\n</subtask>"
    summary = worker_summary_prompt("M", "S", "compact")
    assert summary.startswith(SUMMARY_REQUEST + "\n") and worker_summary_prompt("M", "S").startswith(SUMMARY_REQUEST)
    positions = [summary.index(h) for h, _ in SUMMARY_SECTIONS]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="unknown prompt style 'tiny'"):
        system_prompt("worker", WORKER_TOOLS, "tiny")
    with pytest.raises(ValueError, match="subtask"):
        worker_user_prompt("main", " ", "compact")


CALL = render_tool_call("search_and_scrape_webpage", "scrape", {"url": "https://wiki.local/a"})


@pytest.mark.parametrize("raw, expected", [
    ("  plain answer \n", "plain answer"),
    ("<think>hmm</think>\n## Conclusion\nX", "## Conclusion\nX"),
    ("a</think>b</think> final", "final"),                     # everything up to the LAST </think>
    (f"Answer is X.\n{CALL}\n", "Answer is X."),
    (f"A {CALL} B {CALL} C", "A  B  C"),
    ("Answer is X.\n<use_mcp_tool>\n<server_name>search_and_scrape", "Answer is X."),  # cut off
    (f"<think>plan {CALL}</think>Result {CALL} then <use_mcp_tool><tool_name>scr", "Result  then"),
    ("<think>only thinking</think>", ""),
    ("X < Y <USE_MCP_TOOL >a</ use_mcp_tool> Z < use_mcp_tool>", "X < Y  Z"),  # sloppy tags
])
def test_clean_worker_summary(raw, expected):
    assert clean_worker_summary(raw) == expected


def test_clean_worker_summary_cut():
    assert clean_worker_summary("  " + "x" * 50, max_chars=10) == "x" * 10
    assert len(clean_worker_summary("y" * 30_000)) == 20_000
    with pytest.raises(ValueError):
        clean_worker_summary("x", max_chars=-1)


def test_error_messages():
    assert "agent" in nested_agent_refusal()
    msg = tool_error_message("search_and_scrape_webpage", "scrape", "timeout after 30s")
    assert "search_and_scrape_webpage" in msg and "scrape" in msg and "timeout after 30s" in msg
    assert "Error" in tool_error_message("s", "t", ValueError("bad url"))
