"""MCP server `search_and_scrape_webpage` with tools `google_search` and `scrape`.

The tool names and input schemas come from specs.py, verbatim. The backend is either the offline
BM25 corpus (local_search.py) or the real web (web.py), chosen by `ToolboxConfig.backend`; optional
noise (noise.py) perturbs outputs. Search results are returned as JSON text, scrape as page text;
tool failures come back as `isError` results with a message the model can read.

    python -m megatron_matpo.toolbox.server --backend local --corpus corpus.jsonl --port 8931
    python -m megatron_matpo.toolbox.server --config toolbox.yaml            # JSON or YAML
    python -m megatron_matpo.toolbox.server --config toolbox.yaml --transport stdio
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from megatron_matpo.toolbox.local_search import LocalSearchIndex, PageNotFound
from megatron_matpo.toolbox.noise import DistractorSource, NoiseConfig, NoiseInjector
from megatron_matpo.toolbox.specs import GOOGLE_SEARCH, SCRAPE, SEARCH_SERVER, ToolSpec
from megatron_matpo.toolbox.web import (
    DEFAULT_BLOCKED_URL_PATTERNS, DEFAULT_SERPER_URL, SerperClient, WebConfig, WebError,
    WebScraper, drop_blocked)

log = logging.getLogger(__name__)

TOOLS: tuple[ToolSpec, ...] = (GOOGLE_SEARCH, SCRAPE)
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,), "object": (dict,), "array": (list,)}


@dataclass
class ToolboxConfig:
    backend: str = "local"                       # "local" | "web"
    corpus_path: str | None = None               # local: corpus.jsonl
    index_path: str | None = None                # local: SQLite index file (None: in memory)
    serper_base_url: str = DEFAULT_SERPER_URL    # web: API key from SERPER_API_KEY
    search_timeout_s: float = 20.0
    scrape_timeout_s: float = 30.0
    tool_timeout_s: float = 90.0                 # whole tool call, retries included
    max_bytes: int = 2_000_000                   # web: download cap per page
    max_retries: int = 2
    backoff_s: float = 0.5
    blocked_url_patterns: tuple[str, ...] = DEFAULT_BLOCKED_URL_PATTERNS
    allow_private: bool = False
    max_output_chars: int = 50_000               # cap on the text handed back to the model
    default_num_results: int = 10
    injected_latency_s: float = 0.0              # server-side delay per call (benchmarks)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    host: str = "127.0.0.1"
    port: int = 8931
    path: str = "/mcp"
    transport: str = "http"                      # "http" (streamable HTTP) | "stdio"

    def __post_init__(self) -> None:
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        self.blocked_url_patterns = tuple(self.blocked_url_patterns)
        if self.backend not in ("local", "web"):
            raise ValueError(f"ToolboxConfig.backend must be 'local' or 'web', got {self.backend!r}")
        if self.transport not in ("http", "stdio"):
            raise ValueError(f"ToolboxConfig.transport must be 'http' or 'stdio', got {self.transport!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolboxConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ToolboxConfig keys: {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ToolboxConfig:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data.get("toolbox", data))

    def web_config(self) -> WebConfig:
        return WebConfig(serper_base_url=self.serper_base_url, search_timeout_s=self.search_timeout_s,
                         scrape_timeout_s=self.scrape_timeout_s, max_bytes=self.max_bytes,
                         max_retries=self.max_retries, backoff_s=self.backoff_s,
                         blocked_url_patterns=self.blocked_url_patterns, allow_private=self.allow_private)


class ToolError(Exception):
    """A failure to report to the model as an error result (not a protocol error)."""


# --- backends ------------------------------------------------------------------------------------
class SearchBackend(Protocol):
    async def search(self, args: dict[str, Any]) -> dict[str, Any]: ...
    async def scrape(self, url: str) -> str: ...
    async def aclose(self) -> None: ...


class LocalBackend:
    def __init__(self, index: LocalSearchIndex) -> None:
        self.index = index
        self.distractor_source: DistractorSource = index.random_results

    async def search(self, args: dict[str, Any]) -> dict[str, Any]:
        # to_thread: a large corpus query takes milliseconds; keep the event loop free meanwhile.
        organic = await asyncio.to_thread(self.index.search, args["q"], args["num"], args.get("page", 1))
        return {"organic": organic}

    async def scrape(self, url: str) -> str:
        try:
            return await asyncio.to_thread(self.index.scrape, url)
        except PageNotFound as e:
            raise ToolError(str(e)) from e

    async def aclose(self) -> None:
        self.index.close()


class WebBackend:
    def __init__(self, cfg: WebConfig) -> None:
        self.serper, self.scraper = SerperClient(cfg), WebScraper(cfg)

    async def search(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.serper.search(**args)
        except WebError as e:
            raise ToolError(f"search failed ({e.kind}): {e}") from e

    async def scrape(self, url: str) -> str:
        try:
            return await self.scraper.scrape(url)
        except WebError as e:
            raise ToolError(f"scrape failed ({e.kind}): {e}") from e

    async def aclose(self) -> None:
        await self.serper.aclose()
        await self.scraper.aclose()


def make_backend(cfg: ToolboxConfig) -> SearchBackend:
    if cfg.backend == "local":
        if not cfg.corpus_path:
            raise ValueError("backend 'local' needs corpus_path (a corpus.jsonl file)")
        return LocalBackend(LocalSearchIndex.open(cfg.corpus_path, cfg.index_path))
    return WebBackend(cfg.web_config())


# --- the transport-independent tool layer ---------------------------------------------------------
def validate_arguments(spec: ToolSpec, args: Any) -> list[str]:
    """Problems with `args` against the spec's (flat) JSON schema; empty when valid."""
    if not isinstance(args, dict):
        return [f"arguments must be a JSON object, got {type(args).__name__}"]
    props: dict[str, Any] = spec.input_schema.get("properties", {})
    problems = [f"missing required argument {k!r}" for k in spec.required if k not in args]
    for k, v in args.items():
        if k not in props:
            problems.append(f"unexpected argument {k!r} (allowed: {', '.join(props)})")
            continue
        allowed = _JSON_TYPES.get(props[k].get("type", ""), (object,))
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            problems.append(f"argument {k!r} must be of type {props[k].get('type')}, "
                            f"got {type(v).__name__}")
    return problems


class Toolbox:
    """Runs the two tools against a backend: validation, timeouts, noise, output caps."""

    def __init__(self, cfg: ToolboxConfig, backend: SearchBackend | None = None) -> None:
        self.cfg = cfg
        self.backend = backend if backend is not None else make_backend(cfg)
        self.noise = (NoiseInjector(cfg.noise, getattr(self.backend, "distractor_source", None))
                      if cfg.noise.enabled else None)

    async def call(self, name: str, arguments: dict[str, Any] | None) -> str:
        spec = next((t for t in TOOLS if t.name == name), None)
        if spec is None:
            raise KeyError(name)
        args = {} if arguments is None else arguments
        problems = validate_arguments(spec, args)
        if problems:
            raise ToolError(f"invalid arguments for {name}: " + "; ".join(problems))
        if self.cfg.injected_latency_s > 0:
            await asyncio.sleep(self.cfg.injected_latency_s)
        try:
            async with asyncio.timeout(self.cfg.tool_timeout_s):
                text = await (self._search(args) if name == GOOGLE_SEARCH.name else self._scrape(args["url"]))
        except TimeoutError as e:
            raise ToolError(f"{name} timed out after {self.cfg.tool_timeout_s:g}s") from e
        return self._cap(text)

    async def _search(self, args: dict[str, Any]) -> str:
        if not args["q"].strip():
            raise ToolError("the search query 'q' is empty")
        args = {"num": self.cfg.default_num_results, **args}
        result = await self.backend.search(args)
        if not isinstance(result, dict) or not isinstance(result.get("organic"), list):
            raise ToolError("search backend returned a malformed response (no 'organic' list)")
        result = drop_blocked(result, self.cfg.blocked_url_patterns)
        result.pop("credits", None)
        if self.noise is not None:
            result["organic"] = self.noise.perturb_results(result["organic"],
                                                           key=json.dumps(args, sort_keys=True))
        return json.dumps({"searchParameters": args, **{k: v for k, v in result.items()
                                                         if k != "searchParameters"}},
                          ensure_ascii=False)

    async def _scrape(self, url: str) -> str:
        text = await self.backend.scrape(url)
        if not isinstance(text, str):
            raise ToolError("scrape backend returned no text")
        if not text.strip():
            raise ToolError(f"the page at {url} has no readable text")
        return self.noise.perturb_text(text, key=url) if self.noise is not None else text

    def _cap(self, text: str) -> str:
        n = self.cfg.max_output_chars
        return text if len(text) <= n else text[:n] + f"\n[output truncated at {n} characters]"

    async def aclose(self) -> None:
        await self.backend.aclose()


# --- MCP wiring ----------------------------------------------------------------------------------
def build_mcp_server(toolbox: Toolbox) -> Server[Any]:
    schemas = {t.name: t.input_schema for t in TOOLS}

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=copy.deepcopy(t.input_schema))
            for t in TOOLS])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in schemas:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {params.name!r} on server "
                                                 f"{SEARCH_SERVER!r}; tools: {', '.join(schemas)}")
        try:
            text, is_error = await toolbox.call(params.name, params.arguments), False
        except ToolError as e:
            text, is_error = f"Error: {e}", True
        except Exception as e:  # a backend bug must not kill the session; the model sees an error
            log.exception("tool %s failed", params.name)
            text, is_error = f"Error: internal tool failure ({type(e).__name__}: {e})", True
        return types.CallToolResult(content=[types.TextContent(text=text)], is_error=is_error)

    return Server(SEARCH_SERVER, version="0.1", on_list_tools=list_tools, on_call_tool=call_tool,
                  get_tool_input_schema=lambda name: schemas.get(name))


def run_loop(coro: Any) -> None:
    """Run a server coroutine on uvloop when installed (as uvicorn itself does): measured here, a
    tool call over streamable HTTP takes ~4 ms on uvloop vs ~45 ms on the stdlib loop."""
    try:
        import uvloop
        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve_http(cfg: ToolboxConfig, toolbox: Toolbox | None = None, sock: socket.socket | None = None,
                     started: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    import uvicorn

    toolbox = toolbox or Toolbox(cfg)
    app = build_mcp_server(toolbox).streamable_http_app(host=cfg.host, streamable_http_path=cfg.path)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    sock = sock or _bind(cfg.host, cfg.port)

    async def watch() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        if started is not None:
            started.set()
        while stop is not None and not stop.is_set():
            await asyncio.sleep(0.05)
        if stop is not None:
            server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        await toolbox.aclose()


async def serve_stdio(cfg: ToolboxConfig, toolbox: Toolbox | None = None) -> None:
    from mcp.server.stdio import stdio_server

    toolbox = toolbox or Toolbox(cfg)
    server = build_mcp_server(toolbox)
    try:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await toolbox.aclose()


class RunningServer:
    """A streamable-HTTP toolbox server on a background thread (tests, single-node rollouts)."""

    def __init__(self, cfg: ToolboxConfig, backend: SearchBackend | None = None,
                 startup_timeout_s: float = 30.0) -> None:
        toolbox = Toolbox(cfg, backend)  # built here so config/corpus errors raise in the caller
        self._sock = _bind(cfg.host, cfg.port)  # port 0: the OS picks a free one, no race
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{cfg.host}:{self.port}{cfg.path}"
        self._started, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            try:
                run_loop(serve_http(cfg, toolbox, self._sock, self._started, self._stop))
            except BaseException as e:  # surfaced by the startup wait below
                self._error = e
                self._started.set()

        self._thread = threading.Thread(target=run, name=f"toolbox-server:{self.port}", daemon=True)
        self._thread.start()
        if not self._started.wait(startup_timeout_s) or self._error is not None:
            raise RuntimeError(f"toolbox server failed to start on {self.url}") from self._error

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- CLI -----------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> ToolboxConfig:
    p = argparse.ArgumentParser(prog="python -m megatron_matpo.toolbox.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON/YAML file with ToolboxConfig fields (flags override it)")
    flags: dict[str, tuple[str, type]] = {
        "--backend": ("backend", str), "--corpus": ("corpus_path", str), "--index": ("index_path", str),
        "--serper-base-url": ("serper_base_url", str), "--host": ("host", str), "--port": ("port", int),
        "--path": ("path", str), "--transport": ("transport", str),
        "--search-timeout": ("search_timeout_s", float), "--scrape-timeout": ("scrape_timeout_s", float),
        "--tool-timeout": ("tool_timeout_s", float), "--max-bytes": ("max_bytes", int),
        "--max-retries": ("max_retries", int), "--max-output-chars": ("max_output_chars", int),
        "--injected-latency": ("injected_latency_s", float),
    }
    choices = {"--backend": ("local", "web"), "--transport": ("http", "stdio")}
    for flag, (dest, typ) in flags.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, choices=choices.get(flag))
    p.add_argument("--allow-private", dest="allow_private", action="store_true", default=None)
    noise_flags = {"--noise-seed": ("seed", int), "--truncate-prob": ("truncate_prob", float),
                   "--shuffle-prob": ("shuffle_prob", float), "--distractor-prob": ("distractor_prob", float),
                   "--num-distractors": ("num_distractors", int)}
    for flag, (dest, typ) in noise_flags.items():
        p.add_argument(flag, dest=f"noise.{dest}", type=typ, default=None)
    ns = vars(p.parse_args(argv))
    cfg = ToolboxConfig.load(ns.pop("config")) if ns.get("config") else ToolboxConfig()
    ns.pop("config", None)
    overrides = {k: v for k, v in ns.items() if v is not None and not k.startswith("noise.")}
    noise = {k.split(".", 1)[1]: v for k, v in ns.items() if v is not None and k.startswith("noise.")}
    cfg = dataclasses.replace(cfg, **overrides)
    if noise:
        cfg.noise = dataclasses.replace(cfg.noise, **noise)
    return cfg


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,  # stdout is the stdio transport
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _parse_args(argv)
    t0 = time.perf_counter()
    toolbox = Toolbox(cfg)
    log.info("toolbox %s backend ready in %.1fs", cfg.backend, time.perf_counter() - t0)
    if cfg.transport == "stdio":
        run_loop(serve_stdio(cfg, toolbox))
    else:
        log.info("serving MCP %r on http://%s:%d%s", SEARCH_SERVER, cfg.host, cfg.port, cfg.path)
        run_loop(serve_http(cfg, toolbox))


if __name__ == "__main__":
    main()
