"""Rollout-side MCP client: call tools on one or more MCP servers over streamable HTTP.

`ToolClient.call` never raises for a tool failure: timeouts, refused connections, protocol
errors, tool errors and empty/garbage output all become `ToolResult(ok=False, error_kind=...)`
whose text is shown to the model. Only cancellation of the calling task propagates.

Each server connection is owned by a background task, because the MCP SDK's client holds anyio
task groups that must be entered and exited by the same task, while calls come from many tasks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
from mcp import Client
from mcp.shared.exceptions import MCPError

from megatron_matpo.toolbox.specs import GOOGLE_SEARCH, ToolSpec

log = logging.getLogger(__name__)

# error kinds, in ToolResult.error_kind and metrics
TIMEOUT, CONNECTION, SERVER_ERROR, TOOL_ERROR = "timeout", "connection", "server_error", "tool_error"
EMPTY, GARBAGE, UNKNOWN_SERVER, BAD_ARGUMENTS, CLIENT_ERROR = (
    "empty", "garbage", "unknown_server", "bad_arguments", "client_error")

# tool name -> check(text) returning a problem description or None
OutputCheck = Callable[[str], "str | None"]


def _check_search_json(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return "search output is not valid JSON"
    if not isinstance(data, dict) or not isinstance(data.get("organic"), list):
        return "search output has no 'organic' result list"
    return None


DEFAULT_OUTPUT_CHECKS: dict[str, OutputCheck] = {GOOGLE_SEARCH.name: _check_search_json}


def looks_like_garbage(text: str) -> bool:
    """Binary junk decoded as text: many control or replacement characters."""
    sample = text[:4000]
    bad = sum(1 for c in sample if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t"))
    return bad > max(8, len(sample) // 10)


@dataclass
class ToolResult:
    text: str
    ok: bool
    error_kind: str | None = None
    latency_s: float = 0.0
    server: str = ""
    tool: str = ""


@dataclass
class ToolCallStats:
    calls: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    calls_by_tool: Counter[str] = field(default_factory=Counter)
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0

    def record(self, r: ToolResult) -> None:
        self.calls += 1
        self.calls_by_tool[f"{r.server}/{r.tool}"] += 1
        self.latency_sum_s += r.latency_s
        self.latency_max_s = max(self.latency_max_s, r.latency_s)
        if r.ok:
            self.ok += 1
        else:
            self.errors[r.error_kind or CLIENT_ERROR] += 1

    def as_metrics(self, prefix: str = "tools/") -> dict[str, float]:
        m = {f"{prefix}calls": float(self.calls), f"{prefix}ok": float(self.ok),
             f"{prefix}errors": float(sum(self.errors.values())),
             f"{prefix}error_rate": sum(self.errors.values()) / self.calls if self.calls else 0.0,
             f"{prefix}latency_mean_s": self.latency_sum_s / self.calls if self.calls else 0.0,
             f"{prefix}latency_max_s": self.latency_max_s}
        m.update({f"{prefix}errors/{k}": float(v) for k, v in self.errors.items()})
        return m


class _ConnectError(Exception):
    pass


class _Connection:
    """One MCP client session, entered and exited by its own task."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.client: Client | None = None
        self.tools: dict[str, ToolSpec] = {}
        self._ready, self._close = asyncio.Event(), asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.client is not None and self._task is not None and not self._task.done()

    async def open(self, server_name: str) -> None:
        self._task = asyncio.create_task(self._run(server_name), name=f"mcp-conn:{server_name}")
        try:
            await asyncio.wait_for(self._ready.wait(), self.timeout_s)
        except TimeoutError:
            self._abort()
            raise _ConnectError(f"connecting to {self.url} timed out after {self.timeout_s:g}s") from None
        except BaseException:  # caller cancelled (e.g. its call deadline): don't leak the session
            self._abort()
            raise
        if self.client is None:
            raise _ConnectError(f"cannot connect to {self.url}: {_describe(self._error)}")

    async def _run(self, server_name: str) -> None:
        try:
            async with Client(self.url, client_info=types.Implementation(
                    name="megatron_matpo", version="0.1")) as client:
                listing = await client.list_tools()  # also primes the SDK's per-tool schema cache
                self.tools = {t.name: ToolSpec(server=server_name, name=t.name, description=t.description or "",
                                               input_schema=dict(t.input_schema)) for t in listing.tools}
                self.client = client
                self._ready.set()
                await self._close.wait()
        except Exception as e:  # noqa: BLE001 - reported through open() / the next call
            self._error = e
        finally:
            self.client = None
            self._ready.set()

    def _abort(self) -> None:
        self._close.set()
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        self._close.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    if isinstance(e, BaseExceptionGroup):  # anyio task groups wrap the real cause
        return "; ".join(_describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, BaseExceptionGroup):
        return any(_is_connection_error(x) for x in e.exceptions)
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "RemoteProtocolError", "ReadError",
                         "ClosedResourceError", "BrokenResourceError", "EndOfStream"}) or isinstance(
        e, (ConnectionError, OSError))


class ToolClient:
    """Calls MCP tools by (server name, tool name). Use as `async with ToolClient({...}) as tc`.

    servers: server name -> streamable-HTTP URL (e.g. http://127.0.0.1:8931/mcp).
    timeout_s: per-call deadline (connecting included). injected_latency_s: extra delay added to
    every call, to emulate slow tools in overlap tests and benchmarks.
    """

    def __init__(self, servers: Mapping[str, str], *, timeout_s: float = 120.0,
                 connect_timeout_s: float = 15.0, injected_latency_s: float = 0.0,
                 output_checks: Mapping[str, OutputCheck] | None = None) -> None:
        self.servers = dict(servers)
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.injected_latency_s = injected_latency_s
        self.output_checks = dict(DEFAULT_OUTPUT_CHECKS if output_checks is None else output_checks)
        self.stats = ToolCallStats()
        self._conns: dict[str, _Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def __aenter__(self) -> ToolClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def _connection(self, server: str) -> _Connection:
        conn = self._conns.get(server)
        if conn is not None and conn.alive:
            return conn
        async with self._locks.setdefault(server, asyncio.Lock()):  # one connect per server at a time
            conn = self._conns.get(server)
            if conn is not None and conn.alive:
                return conn
            if conn is not None:
                await conn.close()
            conn = _Connection(self.servers[server], self.connect_timeout_s)
            await conn.open(server)
            self._conns[server] = conn
            return conn

    async def _drop(self, server: str, conn: _Connection) -> None:
        if self._conns.get(server) is conn:
            del self._conns[server]
            await conn.close()

    async def connect(self) -> None:
        """Connect to every server now (else lazily on first call). Raises on failure."""
        for name in self.servers:
            try:
                await self._connection(name)
            except _ConnectError as e:
                raise ConnectionError(str(e)) from None

    async def list_tools(self, server: str) -> list[ToolSpec]:
        """Tools of one server as ToolSpecs (raises ConnectionError / KeyError)."""
        if server not in self.servers:
            raise KeyError(f"unknown MCP server {server!r}; known: {sorted(self.servers)}")
        try:
            return list((await self._connection(server)).tools.values())
        except _ConnectError as e:
            raise ConnectionError(str(e)) from None

    def metrics(self, prefix: str = "tools/") -> dict[str, float]:
        return self.stats.as_metrics(prefix)

    def reset_metrics(self) -> None:
        self.stats = ToolCallStats()

    async def call(self, server: str, tool: str, arguments: Mapping[str, Any] | None = None,
                   timeout_s: float | None = None) -> ToolResult:
        t0 = time.perf_counter()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        text, kind = await self._call(server, tool, arguments, timeout)
        result = ToolResult(text=text, ok=kind is None, error_kind=kind,
                            latency_s=time.perf_counter() - t0, server=server, tool=tool)
        self.stats.record(result)
        return result

    async def _call(self, server: str, tool: str, arguments: Mapping[str, Any] | None,
                    timeout: float) -> tuple[str, str | None]:
        where = f"{server}/{tool}"
        if server not in self.servers:
            return (f"Error: unknown MCP server {server!r}. Available servers: "
                    f"{', '.join(sorted(self.servers))}.", UNKNOWN_SERVER)
        if arguments is not None and not isinstance(arguments, Mapping):
            return f"Error: arguments for {where} must be a JSON object.", BAD_ARGUMENTS
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                if self.injected_latency_s > 0:
                    await asyncio.sleep(self.injected_latency_s)
                conn = await self._connection(server)
                if conn.client is None:  # the session ended between lookup and use
                    raise _ConnectError("the connection closed")
                res = await conn.client.call_tool(tool, dict(arguments or {}), read_timeout_seconds=timeout)
        except TimeoutError:
            return f"Error: tool call {where} timed out after {timeout:g}s.", TIMEOUT
        except _ConnectError as e:
            return f"Error: tool server {server!r} is unreachable ({e}).", CONNECTION
        except MCPError as e:
            if e.code == types.REQUEST_TIMEOUT:
                return f"Error: tool call {where} timed out after {timeout:g}s.", TIMEOUT
            if e.code == types.CONNECTION_CLOSED and conn is not None:
                await self._drop(server, conn)
                return f"Error: connection to tool server {server!r} was lost ({e.message}).", CONNECTION
            return f"Error: tool server {server!r} rejected {tool!r}: {e.message}", SERVER_ERROR
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the contract: never raise out of call()
            if _is_connection_error(e):
                if conn is not None:
                    await self._drop(server, conn)  # reconnect on the next call
                return f"Error: tool server {server!r} is unreachable ({_describe(e)}).", CONNECTION
            log.warning("tool call %s failed: %s", where, _describe(e))
            return f"Error: tool call {where} failed ({_describe(e)}).", CLIENT_ERROR
        return self._interpret(where, tool, res)

    def _interpret(self, where: str, tool: str, res: types.CallToolResult) -> tuple[str, str | None]:
        texts = [c.text for c in res.content if isinstance(c, types.TextContent)]
        text = "\n".join(texts)
        if res.is_error:
            return text.strip() or f"Error: tool {where} failed without a message.", TOOL_ERROR
        if not texts and res.content:
            kinds = sorted({c.type for c in res.content})
            return f"Error: tool {where} returned non-text content ({', '.join(kinds)}).", GARBAGE
        if not text.strip():
            return f"Error: tool {where} returned empty output.", EMPTY
        if looks_like_garbage(text):
            return f"Error: tool {where} returned unreadable (binary) output.", GARBAGE
        check = self.output_checks.get(tool)
        problem = check(text) if check is not None else None
        if problem:
            return f"Error: tool {where} returned malformed output: {problem}.", GARBAGE
        return text, None
