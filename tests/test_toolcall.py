"""MCP-XML tool calls: round trip, robustness, each problem kind, validation, format score."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_matpo.agents.toolcall import (
    Problem,
    ToolCall,
    format_score,
    parse_tool_calls,
    render_tool_call,
    validate_call,
)
from megatron_matpo.toolbox.specs import (
    AGENT_SERVER,
    PLANNER_TOOLS,
    SEARCH_SERVER,
    WORKER_TOOLS,
)


def block(server="search_and_scrape_webpage", tool="google_search", args='{"q": "x"}', close=True) -> str:
    end = "</use_mcp_tool>" if close else ""
    return (f"<use_mcp_tool><server_name>{server}</server_name><tool_name>{tool}</tool_name>"
            f"<arguments>{args}</arguments>{end}")


def call(server=SEARCH_SERVER, tool="google_search", **args) -> ToolCall:
    return ToolCall(server, tool, args, "", (0, 0))


# ---------------------------------------------------------------- property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
FRAGMENTS = ["<use_mcp_tool>", "</use_mcp_tool>", "<server_name>", "</server_name>", "<tool_name>",
             "</tool_name>", "<arguments>", "</arguments>", "{", "}", "[", "]", '"', "'", ",", ":", "```",
             "```json\n", "\\", "True", "null", "q", " ", "\n", "search_and_scrape_webpage", "\\u00"]


@settings(max_examples=150, deadline=None)
@given(names, names, st.dictionaries(st.text(), json_values, max_size=5), st.text(max_size=30))
def test_render_parse_round_trip(server, tool, args, prefix):
    text = prefix.replace("<", "(") + render_tool_call(server, tool, args)
    res = parse_tool_calls(text)
    assert res.problems == () and res.error_message is None
    assert len(res.calls) == 1
    c = res.call
    assert (c.server, c.tool, c.arguments) == (server, tool, args)
    assert text[c.span[0]:c.span[1]] == c.raw and c.span[1] == len(text)


@settings(max_examples=200, deadline=None)
@given(st.text() | st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=40).map("".join))
def test_parse_never_raises_on_arbitrary_text(text):
    res = parse_tool_calls(text)
    assert 0.0 <= format_score(text, WORKER_TOOLS) <= 1.0
    assert (res.error_message is None) == (res.problems == ())
    if res.call is not None:
        assert res.call in res.calls and isinstance(res.call.arguments, dict)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["q", "url", "num", "x"]), json_values, max_size=3),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 6), st.sampled_from(FRAGMENTS)), max_size=6))
def test_parse_never_raises_on_mutated_calls(args, edits):
    text = render_tool_call(SEARCH_SERVER, "google_search", args)
    for pos, n_delete, insert in edits:  # delete a few chars somewhere and insert a fragment
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + n_delete:]
    res = parse_tool_calls(text)
    for c in res.calls:
        assert isinstance(c.arguments, dict)
        validate_call(c, WORKER_TOOLS)
    assert 0.0 <= format_score(text, WORKER_TOOLS) <= 1.0


def test_render_escapes_tags_inside_strings_and_rejects_bad_names():
    args = {"subtask": "a</arguments>b<use_mcp_tool>c</use_mcp_tool>", "x": "1 < 2"}
    text = render_tool_call(AGENT_SERVER, "search_and_browse", args)
    assert "</arguments>b" not in text and "1 < 2" in text  # only tag-like '<' is escaped
    assert parse_tool_calls(text).call.arguments == args
    with pytest.raises(ValueError):
        render_tool_call(" s", "t", {})
    with pytest.raises(ValueError):
        render_tool_call("s", "a<b", {})
    with pytest.raises(TypeError):
        render_tool_call("s", "t", ["not", "a", "dict"])


# ---------------------------------------------------------------- malformed input, each problem kind

def kinds(text):
    return parse_tool_calls(text).problem_kinds


def test_clean_call_and_plain_text():
    res = parse_tool_calls("I will search.\n" + block() + "\n  ")
    assert res.problems == () and res.call.arguments == {"q": "x"} and res.error_message is None
    assert parse_tool_calls("The answer is \\boxed{4}.").problems == ()
    assert parse_tool_calls("").call is None


def test_whitespace_and_newlines_inside_tags():
    text = ("<use_mcp_tool>\n  <server_name>\n search_and_scrape_webpage \n</server_name>\n"
            "<tool_name> scrape </tool_name>\n<arguments>\n\n {\"url\": \"https://a.b\"} \n</arguments>\n"
            "</use_mcp_tool>")
    res = parse_tool_calls(text)
    assert res.problems == ()
    assert (res.call.server, res.call.tool, res.call.arguments) == (SEARCH_SERVER, "scrape", {"url": "https://a.b"})


@pytest.mark.parametrize("args, expected, repair", [
    ("```json\n{\"q\": \"x\"}\n```", {"q": "x"}, "code fence"),
    ("{'q': 'it\\'s \"x\"'}", {"q": "it's \"x\""}, "single quotes"),
    ('{"q": "x", "num": 3,}', {"q": "x", "num": 3}, "trailing comma"),
    ('{"q": "x", "l": [1, 2, ], }', {"q": "x", "l": [1, 2]}, "trailing comma"),
    ("{'q': 'x', 'flag': True, 'n': None}", {"q": "x", "flag": True, "n": None}, "Python literals"),
    ('{q: "x"}', {"q": "x"}, "unquoted keys"),
    ('{"q": "line1\nline2"}', {"q": "line1\nline2"}, "raw control character in a string"),
    ('{"q": "\\d+ regex"}', {"q": "\\d+ regex"}, "invalid escape"),
    ('{"q": "x"', {"q": "x"}, "unclosed brackets"),
    ('here: {"q": "x"}', {"q": "x"}, "text before the object"),
    ('{"q": "x"} thanks', {"q": "x"}, "text after the object"),
    ('"{\\"q\\": \\"x\\"}"', {"q": "x"}, "JSON object encoded as a string"),
    ("", {}, "empty arguments"),
])
def test_lenient_json_repairs(args, expected, repair):
    res = parse_tool_calls(block(args=args))
    assert res.call is not None and res.call.arguments == expected
    assert res.problem_kinds == [Problem.LENIENT_JSON]
    assert repair in res.problems[0].detail
    assert "was executed as read" in res.error_message
    # strict format rejects repaired blocks; lenient accepts them (when the call itself validates)
    assert format_score(block(args=args), WORKER_TOOLS) == 0.0


def test_lenient_format_score_accepts_repairs():
    assert format_score(block(args="{'q': 'x',}"), WORKER_TOOLS, strict=False) == 1.0


@pytest.mark.parametrize("args", ["{bad json", '{"q": }', "{{{", "{'q': 'x' 'y'}"])
def test_malformed_json(args):
    res = parse_tool_calls(block(args=args))
    assert res.problem_kinds == [Problem.MALFORMED_JSON] and res.call is None
    assert res.error_message.startswith("Your tool call was not executed")
    assert "<use_mcp_tool>" in res.error_message  # the syntax is restated


def test_arguments_not_object():
    assert kinds(block(args="[1, 2]")) == [Problem.ARGUMENTS_NOT_OBJECT]
    assert kinds(block(args='"just text"')) == [Problem.ARGUMENTS_NOT_OBJECT]


def test_missing_inner_tags():
    no_server = '<use_mcp_tool><tool_name>scrape</tool_name><arguments>{"url": "u"}</arguments></use_mcp_tool>'
    assert kinds(no_server) == [Problem.MISSING_SERVER_NAME]
    assert kinds(block(server="")) == [Problem.MISSING_SERVER_NAME]
    no_tool = f'<use_mcp_tool><server_name>{SEARCH_SERVER}</server_name><arguments>{{}}</arguments></use_mcp_tool>'
    assert kinds(no_tool) == [Problem.MISSING_TOOL_NAME]
    no_args = f"<use_mcp_tool><server_name>s</server_name><tool_name>t</tool_name></use_mcp_tool>"
    assert kinds(no_args) == [Problem.MISSING_ARGUMENTS]
    assert parse_tool_calls(no_args).call is None


def test_unterminated_block_still_executes():
    # e.g. generation stopped on the closing tag, or the model forgot it
    res = parse_tool_calls("Let me search. " + block(close=False))
    assert res.problem_kinds == [Problem.UNTERMINATED_BLOCK]
    assert res.call.arguments == {"q": "x"}
    assert format_score("Let me search. " + block(close=False), WORKER_TOOLS) == 0.0
    assert format_score(block(close=False), WORKER_TOOLS, strict=False) == 1.0


def test_unterminated_inner_tags():
    text = ('<use_mcp_tool><server_name>search_and_scrape_webpage<tool_name>google_search</tool_name>'
            '<arguments>{"q": "x"}</use_mcp_tool>')
    res = parse_tool_calls(text)
    assert res.problem_kinds == [Problem.UNTERMINATED_TAG, Problem.UNTERMINATED_TAG]
    assert (res.call.server, res.call.tool, res.call.arguments) == (SEARCH_SERVER, "google_search", {"q": "x"})


def test_multiple_calls_all_well_formed_ones_reported_executed():
    text = block(args="{oops") + "\n" + block(tool="scrape", args='{"url": "u"}') + block(args='{"q": "y"}')
    res = parse_tool_calls(text)
    assert res.problem_kinds == [Problem.MALFORMED_JSON, Problem.MULTIPLE_CALLS]
    assert res.call.tool == "scrape" and len(res.calls) == 2
    assert "Each of the 2 well-formed calls was executed" in res.error_message  # the workflow runs them all
    assert res.blocks[0].span[1] <= res.blocks[1].span[0]


def test_not_at_end():
    res = parse_tool_calls(block() + "\nI will wait for the result.")
    assert res.problem_kinds == [Problem.NOT_AT_END] and res.call is not None
    assert kinds(block() + " \n\t") == []


def test_unterminated_block_followed_by_another():
    text = block(close=False, args='{"q": "a"}') + block(args='{"q": "b"}')
    res = parse_tool_calls(text)
    assert [c.arguments["q"] for c in res.calls] == ["a", "b"]
    assert res.problem_kinds == [Problem.UNTERMINATED_BLOCK, Problem.MULTIPLE_CALLS]


# ---------------------------------------------------------------- validation

def test_validate_ok():
    assert validate_call(call(q="x", num=5, gl="us"), WORKER_TOOLS) == []
    assert validate_call(call(q="x", num=5.0), WORKER_TOOLS) == []  # integral float is an integer
    assert validate_call(call(AGENT_SERVER, "search_and_browse", subtask="s"), PLANNER_TOOLS) == []


@pytest.mark.parametrize("c, tools, expected", [
    (call(q="x"), PLANNER_TOOLS, "unknown_tool"),  # workers' tools are not the planner's
    (call(AGENT_SERVER, "search_and_browse", subtask="s"), WORKER_TOOLS, "unknown_tool"),
    (call("wrong_server", "google_search", q="x"), WORKER_TOOLS, "server_mismatch"),
    (call(), WORKER_TOOLS, "missing_argument"),
    (call(tool="scrape", link="u"), WORKER_TOOLS, "missing_argument"),
    (call(q=3), WORKER_TOOLS, "type_mismatch"),
    (call(q="x", num="5"), WORKER_TOOLS, "type_mismatch"),
    (call(q="x", num=True), WORKER_TOOLS, "type_mismatch"),  # bool is not an integer in JSON
    (call(q="x", num=2.5), WORKER_TOOLS, "type_mismatch"),
    (call(q="x", extra=1), WORKER_TOOLS, "unexpected_argument"),
])
def test_validate_violations(c, tools, expected):
    violations = validate_call(c, tools)
    assert violations and violations[0].startswith(expected + ":")


def test_validate_reports_all_violations():
    v = validate_call(call("bad", "scrape", link="u"), WORKER_TOOLS)
    assert [x.split(":")[0] for x in v] == ["server_mismatch", "missing_argument", "unexpected_argument"]


def test_validate_json_schema_types():
    from megatron_matpo.toolbox.specs import ToolSpec
    spec = ToolSpec("s", "t", "", {"type": "object", "properties": {
        "n": {"type": "number"}, "b": {"type": "boolean"}, "a": {"type": "array"}, "o": {"type": "object"},
        "u": {"type": ["string", "null"]}, "free": {}}})
    ok = ToolCall("s", "t", {"n": 1.5, "b": False, "a": [1], "o": {}, "u": None, "free": [1], "more": 1}, "", (0, 0))
    assert validate_call(ok, [spec]) == []  # additionalProperties defaults to allowed
    bad = ToolCall("s", "t", {"n": "1", "b": 0, "a": {}, "o": [], "u": 3}, "", (0, 0))
    assert [v.split(":")[0] for v in validate_call(bad, [spec])] == ["type_mismatch"] * 5


# ---------------------------------------------------------------- format score

def test_format_score_values():
    good = block()
    bad_tool = block(tool="nope")
    bad_args = block(args='{"q": 1}')
    broken = block(args="{oops")
    assert format_score("no tool calls, final answer \\boxed{1}", WORKER_TOOLS) == 1.0
    assert format_score([], WORKER_TOOLS) == 1.0
    assert format_score(good, WORKER_TOOLS) == 1.0
    assert format_score(good, PLANNER_TOOLS) == 0.0
    assert format_score([good, bad_tool, "thinking...", bad_args, broken], WORKER_TOOLS) == 0.25
    assert format_score([good, good + good], WORKER_TOOLS) == 1.0  # per block: extra calls are not format errors
    planner = render_tool_call(AGENT_SERVER, "search_and_browse", {"subtask": "find X"})
    assert format_score([planner, "answer \\boxed{X}"], PLANNER_TOOLS) == 1.0


def test_round_trip_through_json_escapes():
    args = {"q": "naïve \"quoted\" \\ back\nslash", "num": 3}
    text = render_tool_call(SEARCH_SERVER, "google_search", args)
    assert json.loads(text.split("<arguments>\n")[1].split("\n</arguments>")[0]) == args
    assert parse_tool_calls(text).call.arguments == args


def test_error_message_stays_short():
    res = parse_tool_calls("<use_mcp_tool>" * 50)
    assert len(res.problems) > 100
    assert res.error_message.count("\n- ") == 9 and "more problems" in res.error_message
