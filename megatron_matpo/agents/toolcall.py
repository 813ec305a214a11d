"""MCP-XML tool calls: render, parse (robustly), validate against ToolSpecs, and score format.

Syntax (MATPO), one call per assistant message, at the end of it:

    <use_mcp_tool>
    <server_name>S</server_name>
    <tool_name>T</tool_name>
    <arguments>
    {json}
    </arguments>
    </use_mcp_tool>

Rollout policy (what `ParseResult` tells the rollout to do):
- `ParseResult.call` is the call to execute: the FIRST block that yields a server, a tool and an
  argument object, even when other problems exist (extra calls, trailing text, repaired JSON,
  missing closing tag). Executing it keeps the episode going; the problems are still reported.
- `ParseResult.error_message` is text for the model (to put next to the tool result, or alone when
  `call` is None) that names every problem and restates the syntax; None when the message is clean.
- A message without any `<use_mcp_tool>` block has no problems: it is a final answer.
- Whether the call's tool/arguments are allowed is `validate_call`'s job, not the parser's.

Format reward (`format_score`): the fraction of blocks that are valid. A block is valid when it
parsed with no block-level problem (strict JSON, every tag closed) and `validate_call` finds no
violation. Message-level problems (`multiple_calls`, `not_at_end`) do not lower it: MATPO defines
format per block. `strict=False` also accepts blocks that needed lenient repairs.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from megatron_matpo.toolbox.specs import ToolSpec


class Problem(StrEnum):
    # block level: the block did not parse into a call
    MALFORMED_JSON = "malformed_json"
    ARGUMENTS_NOT_OBJECT = "arguments_not_object"
    MISSING_SERVER_NAME = "missing_server_name"
    MISSING_TOOL_NAME = "missing_tool_name"
    MISSING_ARGUMENTS = "missing_arguments"
    # block level: the block parsed, but only leniently
    UNTERMINATED_BLOCK = "unterminated_block"
    UNTERMINATED_TAG = "unterminated_tag"
    LENIENT_JSON = "lenient_json"
    # message level
    MULTIPLE_CALLS = "multiple_calls"
    NOT_AT_END = "not_at_end"


@dataclass(frozen=True)
class Issue:
    kind: Problem
    detail: str
    block: int | None = None  # index of the block, None for message-level problems


@dataclass(frozen=True)
class ToolCall:
    server: str
    tool: str
    arguments: dict[str, Any]
    raw: str                 # the block's text, tags included
    span: tuple[int, int]    # [start, end) of `raw` in the parsed text


@dataclass(frozen=True)
class Block:
    span: tuple[int, int]
    raw: str
    call: ToolCall | None
    issues: tuple[Issue, ...]


@dataclass(frozen=True)
class ParseResult:
    blocks: tuple[Block, ...]
    message_issues: tuple[Issue, ...] = ()
    problems: tuple[Issue, ...] = field(init=False)  # every issue: blocks' in order, then message's

    def __post_init__(self) -> None:
        object.__setattr__(self, "problems",
                           tuple(i for b in self.blocks for i in b.issues) + self.message_issues)

    @property
    def calls(self) -> list[ToolCall]:
        return [b.call for b in self.blocks if b.call is not None]

    @property
    def call(self) -> ToolCall | None:
        return next((b.call for b in self.blocks if b.call is not None), None)

    @property
    def problem_kinds(self) -> list[Problem]:
        return [p.kind for p in self.problems]

    @property
    def error_message(self) -> str | None:
        if not self.problems:
            return None
        lines = [f"- {p.detail}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:  # keep the feedback short in the model's context
            lines.append(f"- ... and {len(self.problems) - _MAX_LISTED} more problems")
        call = self.call
        if call is None:
            head = "Your tool call was not executed because it could not be parsed:"
            tail = "Write exactly one tool call, at the end of your message, in this format:\n" + SYNTAX_HINT
        else:
            head = "Problems with the tool-call format in your message:"
            which = (f"Each of the {len(self.calls)} well-formed calls was" if len(self.calls) > 1
                     else f"The call ({call.server} / {call.tool}) was")
            tail = (f"{which} executed as read. "
                    "Write exactly one tool call, at the end of your message, in this format:\n" + SYNTAX_HINT)
        return "\n".join([head, *lines, tail])


_MAX_LISTED = 8
SYNTAX_HINT = ("<use_mcp_tool>\n<server_name>server name</server_name>\n<tool_name>tool name</tool_name>\n"
               "<arguments>\n{\"argument\": \"value\"}\n</arguments>\n</use_mcp_tool>")

_OPEN = re.compile(r"<\s*use_mcp_tool\s*>", re.I)
_CLOSE = re.compile(r"<\s*/\s*use_mcp_tool\s*>", re.I)
# `<` starting anything the parser looks for; escaped in rendered JSON so any string round-trips
_TAGLIKE_LT = re.compile(r"<(?=\s*/|\s*use_mcp_tool)", re.I)


def render_tool_call(server: str, tool: str, arguments: dict[str, Any]) -> str:
    """The canonical text of one call; `parse_tool_calls` reads it back exactly."""
    for what, name in (("server", server), ("tool", tool)):
        if not isinstance(name, str) or not name or name != name.strip() or "<" in name or ">" in name:
            raise ValueError(f"{what} name must be a non-empty string without '<', '>' or surrounding "
                             f"whitespace, got {name!r}")
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be a dict, got {type(arguments).__name__}")
    body = _TAGLIKE_LT.sub(r"\\u003c", json.dumps(arguments, ensure_ascii=False))
    return (f"<use_mcp_tool>\n<server_name>{server}</server_name>\n<tool_name>{tool}</tool_name>\n"
            f"<arguments>\n{body}\n</arguments>\n</use_mcp_tool>")


def parse_tool_calls(text: str) -> ParseResult:
    """Every `<use_mcp_tool>` block of `text`, parsed as leniently as is safe. Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    opens = list(_OPEN.finditer(text))
    blocks: list[Block] = []
    for i, m in enumerate(opens):
        limit = opens[i + 1].start() if i + 1 < len(opens) else len(text)
        close = _CLOSE.search(text, m.end(), limit)
        end = close.end() if close else limit
        body = text[m.end():close.start() if close else limit]
        blocks.append(_parse_block(i, body, (m.start(), end), text[m.start():end], terminated=close is not None))

    message: list[Issue] = []
    if len(blocks) > 1:
        message.append(Issue(Problem.MULTIPLE_CALLS,
                             f"found {len(blocks)} tool calls; only one call per message is allowed"))
    if blocks and text[blocks[-1].span[1]:].strip():
        message.append(Issue(Problem.NOT_AT_END,
                             "there is text after the tool call; the call must end the message"))
    return ParseResult(tuple(blocks), tuple(message))


def _parse_block(idx: int, body: str, span: tuple[int, int], raw: str, terminated: bool) -> Block:
    issues: list[Issue] = []
    if not terminated:
        issues.append(Issue(Problem.UNTERMINATED_BLOCK, "the tool call is missing </use_mcp_tool>", idx))

    fields: dict[str, str | None] = {}
    for name, missing in (("server_name", Problem.MISSING_SERVER_NAME), ("tool_name", Problem.MISSING_TOOL_NAME),
                          ("arguments", Problem.MISSING_ARGUMENTS)):
        value, closed = _field(body, name)
        if value is not None and not closed:
            issues.append(Issue(Problem.UNTERMINATED_TAG, f"<{name}> is missing </{name}>", idx))
        if value is None or (name != "arguments" and not value):
            issues.append(Issue(missing, f"<{name}>...</{name}> is missing or empty", idx))
            value = None
        fields[name] = value

    args: dict[str, Any] | None = None
    if fields["arguments"] is not None:
        obj, repairs, ok = _loads_lenient(fields["arguments"])
        if not ok:
            issues.append(Issue(Problem.MALFORMED_JSON, "the arguments are not valid JSON", idx))
        elif not isinstance(obj, dict):
            issues.append(Issue(Problem.ARGUMENTS_NOT_OBJECT,
                                f"the arguments must be a JSON object, got {_json_type(obj)}", idx))
        else:
            args = obj
            if repairs:
                issues.append(Issue(Problem.LENIENT_JSON, "the arguments are not strict JSON ("
                                    + ", ".join(repairs) + "); they were read leniently", idx))

    call = None
    if args is not None and fields["server_name"] and fields["tool_name"]:
        call = ToolCall(fields["server_name"], fields["tool_name"], args, raw, span)
    return Block(span, raw, call, tuple(issues))


def _field(body: str, name: str) -> tuple[str | None, bool]:
    """(stripped content of <name>...</name>, whether it was closed); (None, False) if absent.
    An unclosed name tag runs to the next '<'; unclosed arguments run to the end of the block."""
    o = re.search(rf"<\s*{name}\s*>", body, re.I)
    if o is None:
        return None, False
    c = re.search(rf"<\s*/\s*{name}\s*>", body[o.end():], re.I)
    if c is not None:
        return body[o.end():o.end() + c.start()].strip(), True
    rest = body[o.end():]
    if name != "arguments":
        rest = rest.split("<", 1)[0]
    return rest.strip(), False


# ---------------------------------------------------------------- lenient JSON

_FENCE = re.compile(r"^```[A-Za-z]*[ \t]*\n?(.*?)(?:\n?```)?$", re.S)
_JSON_ESCAPES = set('"\\/bfnrtu')
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CTRL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _loads_lenient(s: str) -> tuple[Any, list[str], bool]:
    """(value, repairs applied, ok). Strict JSON first; then code fences, surrounding text, single
    quotes, trailing commas, Python literals, bare keys, raw control characters, bad escapes,
    unclosed brackets and double-encoded objects are repaired. Never raises."""
    try:
        obj, repairs = _decode(s)
    except Exception:  # RecursionError on absurd nesting included: the contract is to never raise
        return None, [], False
    if isinstance(obj, str) and obj.strip().startswith("{"):
        inner, inner_repairs, ok = _loads_lenient(obj)
        if ok and isinstance(inner, dict):
            obj, repairs = inner, [*repairs, "JSON object encoded as a string", *inner_repairs]
    return obj, list(dict.fromkeys(repairs)), True


def _decode(s: str) -> tuple[Any, list[str]]:
    try:
        return json.loads(s), []
    except Exception:
        pass
    repairs: list[str] = []
    t = s.strip()
    if not t:
        return {}, ["empty arguments"]
    if t.startswith("```"):
        fm = _FENCE.match(t)
        if fm:
            t = fm.group(1).strip()
            repairs.append("code fence")
    if t and t[0] not in "{[\"'":
        brace = t.find("{")
        if brace > 0:
            t = t[brace:]
            repairs.append("text before the object")
    t = _normalize_json_like(t, repairs)
    obj, end = json.JSONDecoder().raw_decode(t)
    if t[end:].strip():
        repairs.append("text after the object")
    return obj, repairs


def _normalize_json_like(s: str, repairs: list[str]) -> str:
    """One pass over JSON-ish text, rewriting it into strict JSON where the intent is clear."""
    out: list[str] = []
    stack: list[str] = []
    quote: str | None = None  # the quote char of the string we are in
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if quote is not None:
            if ch == "\\" and i + 1 < n:
                nxt = s[i + 1]
                if nxt == "'":
                    out.append("'")
                elif nxt in _JSON_ESCAPES:
                    out.append(ch + nxt)
                else:
                    out.append("\\\\" + nxt)
                    repairs.append("invalid escape")
                i += 2
                continue
            if ch == quote:
                out.append('"')
                quote = None
            elif ch == '"':
                out.append('\\"')
            elif ch in _CTRL or ord(ch) < 0x20:
                out.append(_CTRL.get(ch, f"\\u{ord(ch):04x}"))
                repairs.append("raw control character in a string")
            else:
                out.append(ch)
            i += 1
            continue
        if ch in "\"'":
            if ch == "'":
                repairs.append("single quotes")
            quote = ch
            out.append('"')
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            out.append(ch)
        elif ch in "}]":
            if stack and stack[-1] == ch:
                stack.pop()
            out.append(ch)
        elif ch == ",":
            j = i + 1
            while j < n and s[j].isspace():
                j += 1
            if j >= n or s[j] in "}]":
                repairs.append("trailing comma")
            else:
                out.append(ch)
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (s[j].isalnum() or s[j] == "_"):
                j += 1
            word = s[i:j]
            k = j
            while k < n and s[k].isspace():
                k += 1
            if word in _PY_LITERALS:
                out.append(_PY_LITERALS[word])
                repairs.append("Python literals")
            elif k < n and s[k] == ":" and stack and stack[-1] == "}":
                out.append(json.dumps(word))
                repairs.append("unquoted keys")
            else:
                out.append(word)
            i = j
            continue
        else:
            out.append(ch)
        i += 1
    if quote is not None:
        out.append('"')
        repairs.append("unterminated string")
    if stack:
        out.extend(reversed(stack))
        repairs.append("unclosed brackets")
    return "".join(out)


# ---------------------------------------------------------------- validation and format

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),),
}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _matches(value: Any, typ: str) -> bool:
    if typ == "integer" and isinstance(value, float):
        return value.is_integer()  # JSON Schema: 3.0 is an integer
    if typ in ("integer", "number") and isinstance(value, bool):
        return False  # bool is an int subclass in Python, not in JSON
    return isinstance(value, _JSON_TYPES.get(typ, object))


def validate_call(call: ToolCall, tools: Sequence[ToolSpec]) -> list[str]:
    """Violations of `call` against the allowed `tools`, each 'kind: detail'. Kinds: unknown_tool,
    server_mismatch, missing_argument, type_mismatch, unexpected_argument. Only top-level
    properties are checked (our schemas are flat)."""
    spec = next((t for t in tools if t.server == call.server and t.name == call.tool), None)
    out: list[str] = []
    if spec is None:
        spec = next((t for t in tools if t.name == call.tool), None)
        if spec is None:
            known = ", ".join(f"{t.server}/{t.name}" for t in tools) or "none"
            return [f"unknown_tool: no tool named {call.tool!r} (available: {known})"]
        out.append(f"server_mismatch: tool {call.tool!r} is on server {spec.server!r}, not {call.server!r}")
    schema = spec.input_schema
    props: dict[str, Any] = schema.get("properties", {})
    for name in spec.required:
        if name not in call.arguments:
            out.append(f"missing_argument: {name!r} is required")
    for name, value in call.arguments.items():
        if name not in props:
            if schema.get("additionalProperties", True) is False:
                out.append(f"unexpected_argument: {name!r} is not accepted (allowed: {', '.join(props)})")
            continue
        typ = props[name].get("type")
        if typ is None:
            continue
        types = [typ] if isinstance(typ, str) else list(typ)
        if not any(_matches(value, t) for t in types):
            out.append(f"type_mismatch: {name!r} must be {' or '.join(types)}, got {_json_type(value)}")
    return out


def block_is_valid(block: Block, tools: Sequence[ToolSpec], strict: bool = True) -> bool:
    if block.call is None or (strict and block.issues):
        return False
    return not validate_call(block.call, tools)


def format_score(text_or_turns: str | Sequence[str], tools: Sequence[ToolSpec], *, strict: bool = True) -> float:
    """MATPO format reward for one agent: valid blocks / all blocks over all its assistant turns;
    1.0 when it wrote no block."""
    turns = [text_or_turns] if isinstance(text_or_turns, str) else list(text_or_turns)
    blocks = [b for t in turns for b in parse_tool_calls(t).blocks]
    if not blocks:
        return 1.0
    return sum(block_is_valid(b, tools, strict) for b in blocks) / len(blocks)
