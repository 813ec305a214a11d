"""Toolbox end to end with real components: SQLite FTS5 index, MCP servers over streamable HTTP
(a subprocess through the CLI, and background threads), and a local HTTP server that speaks
Serper's API and serves HTML pages."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from megatron_matpo.toolbox.client import ToolClient, ToolResult, looks_like_garbage
from megatron_matpo.toolbox.local_search import LocalSearchIndex, Page, PageNotFound
from megatron_matpo.toolbox.noise import NoiseConfig, NoiseInjector
from megatron_matpo.toolbox.server import RunningServer, ToolboxConfig, validate_arguments
from megatron_matpo.toolbox.specs import GOOGLE_SEARCH, SCRAPE, SEARCH_SERVER
from megatron_matpo.toolbox.web import (SerperClient, WebConfig, WebError, WebScraper, html_to_text,
                                        is_blocked)

PAGES = [
    Page("https://wiki.local/aurora_borealis", "Aurora borealis",
         "The aurora borealis is a natural light display in polar skies caused by solar wind "
         "particles hitting the magnetosphere."),
    Page("https://wiki.local/basalt", "Basalt",
         "Basalt is a fine-grained volcanic rock formed from the rapid cooling of lava rich in "
         "magnesium and iron."),
    Page("https://wiki.local/quokka", "Quokka",
         "The quokka is a small marsupial found on Rottnest Island near Perth, Western Australia."),
    Page("https://wiki.local/zeppelin", "Zeppelin",
         "A zeppelin is a rigid airship named after Count Ferdinand von Zeppelin, who pioneered "
         "rigid airship development."),
] + [Page(f"https://wiki.local/filler_{i}", f"Filler {i}",
          f"Filler page number {i} about rocks, skies, islands and airships in general.")
     for i in range(12)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"url": p.url, "title": p.title, "text": p.text}) + "\n"
                            for p in PAGES))
    return path


@pytest.fixture(scope="module")
def local_server(corpus):
    with RunningServer(ToolboxConfig(corpus_path=str(corpus), port=0)) as srv:
        yield srv


# --- local BM25 ----------------------------------------------------------------------------------
def test_bm25_ranks_distinctive_page_first_and_scrapes(corpus, tmp_path):
    index = LocalSearchIndex.open(corpus)
    assert len(index) == len(PAGES)
    for query, url in [("marsupial Rottnest", "https://wiki.local/quokka"),
                       ("volcanic lava cooling", "https://wiki.local/basalt"),
                       ("Count Ferdinand rigid airship", "https://wiki.local/zeppelin"),
                       ("solar wind magnetosphere!? (polar)", "https://wiki.local/aurora_borealis")]:
        res = index.search(query, num=5)
        assert res[0]["link"] == url, (query, res)
        assert set(res[0]) == {"title", "link", "snippet", "position"} and res[0]["position"] == 1
    assert "Rottnest" in index.search("marsupial", num=1)[0]["snippet"]
    # paging: positions are global, pages disjoint
    p1, p2 = index.search("filler", num=5, page=1), index.search("filler", num=5, page=2)
    assert [r["position"] for r in p2] == [6, 7, 8, 9, 10]
    assert not {r["link"] for r in p1} & {r["link"] for r in p2}
    assert index.search("   ") == [] and index.search("xyzzyplugh") == []
    # FTS5 operators in user text are quoted, not interpreted
    assert index.search('NEAR(" AND OR * quokka')[0]["link"] == "https://wiki.local/quokka"

    text = index.scrape("https://wiki.local/quokka")
    assert text.startswith("Quokka") and "Rottnest Island" in text
    assert index.scrape("http://wiki.local/quokka/") == text  # scheme / trailing slash normalized
    with pytest.raises(PageNotFound, match="not in the local corpus"):
        index.scrape("https://wiki.local/nope")


def test_index_file_built_once_and_reused(corpus, tmp_path):
    db = tmp_path / "index.sqlite"
    LocalSearchIndex.open(corpus, db).close()
    mtime = db.stat().st_mtime_ns
    index = LocalSearchIndex.open(corpus, db)  # same corpus: reused, not rebuilt
    assert db.stat().st_mtime_ns == mtime and len(index) == len(PAGES)
    assert index.search("marsupial")[0]["link"].endswith("quokka")
    index.close()


# --- MCP end to end ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"server did not listen on {port}")


def test_mcp_server_subprocess_end_to_end(corpus, tmp_path):
    port = _free_port()
    cfg = tmp_path / "toolbox.json"
    cfg.write_text(json.dumps({"backend": "local", "corpus_path": str(corpus),
                               "index_path": str(tmp_path / "idx.sqlite")}))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_matpo.toolbox.server", "--config", str(cfg),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)

        async def main() -> None:
            async with ToolClient({SEARCH_SERVER: f"http://127.0.0.1:{port}/mcp"}, timeout_s=20) as tc:
                tools = {t.name: t for t in await tc.list_tools(SEARCH_SERVER)}
                assert set(tools) == {"google_search", "scrape"}
                for spec in (GOOGLE_SEARCH, SCRAPE):
                    assert tools[spec.name].input_schema == spec.input_schema
                    assert tools[spec.name].server == SEARCH_SERVER
                r = await tc.call(SEARCH_SERVER, "google_search", {"q": "small marsupial island", "num": 3})
                assert r.ok, r.text
                data = json.loads(r.text)
                assert data["searchParameters"]["q"] == "small marsupial island"
                assert len(data["organic"]) == 3 and data["organic"][0]["link"] == "https://wiki.local/quokka"
                r = await tc.call(SEARCH_SERVER, "scrape", {"url": data["organic"][0]["link"]})
                assert r.ok and "Rottnest Island" in r.text and r.latency_s > 0
                r = await tc.call(SEARCH_SERVER, "scrape", {"url": "https://wiki.local/missing"})
                assert not r.ok and r.error_kind == "tool_error" and "not in the local corpus" in r.text
                r = await tc.call(SEARCH_SERVER, "google_search", {"q": "x", "num": "5", "extra": 1})
                assert r.error_kind == "tool_error"
                assert "'num' must be of type integer" in r.text and "unexpected argument 'extra'" in r.text

        run(main())
    finally:
        proc.terminate()
        proc.wait(10)


def test_mcp_server_stdio(corpus):
    from mcp import Client, StdioServerParameters

    async def main() -> None:
        params = StdioServerParameters(command=sys.executable, args=[
            "-m", "megatron_matpo.toolbox.server", "--transport", "stdio", "--corpus", str(corpus)])
        async with Client(params) as c:
            assert sorted(t.name for t in (await c.list_tools()).tools) == ["google_search", "scrape"]
            res = await c.call_tool("scrape", {"url": "https://wiki.local/basalt"})
            assert not res.is_error and "volcanic rock" in res.content[0].text

    run(main())


def test_config_file_and_flags(tmp_path):
    from megatron_matpo.toolbox.server import _parse_args

    path = tmp_path / "toolbox.yaml"
    path.write_text("toolbox:\n  backend: web\n  serper_base_url: http://127.0.0.1:1\n"
                    "  blocked_url_patterns: [huggingface.co/datasets]\n  noise: {seed: 3, shuffle_prob: 0.5}\n")
    cfg = _parse_args(["--config", str(path), "--port", "9001", "--truncate-prob", "0.25"])
    assert (cfg.backend, cfg.port, cfg.serper_base_url) == ("web", 9001, "http://127.0.0.1:1")
    assert cfg.blocked_url_patterns == ("huggingface.co/datasets",)
    assert (cfg.noise.seed, cfg.noise.shuffle_prob, cfg.noise.truncate_prob) == (3, 0.5, 0.25)
    with pytest.raises(ValueError, match="unknown ToolboxConfig keys"):
        ToolboxConfig.from_dict({"backend": "local", "corpus": "x"})
    with pytest.raises(ValueError, match="needs corpus_path"):
        RunningServer(ToolboxConfig(port=0))


def test_validate_arguments():
    assert validate_arguments(GOOGLE_SEARCH, {"q": "a", "num": 3, "gl": "us"}) == []
    assert validate_arguments(GOOGLE_SEARCH, {"q": "a", "num": True})  # bool is not an integer
    assert validate_arguments(SCRAPE, {}) == ["missing required argument 'url'"]
    assert validate_arguments(SCRAPE, ["x"])


# --- web backend against a local Serper-like server ------------------------------------------------
class _FakeWeb(BaseHTTPRequestHandler):
    searches: list[tuple[dict[str, str], dict[str, Any]]] = []
    flaky_hits = 0

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "text/html; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).searches.append((dict(self.headers), body))
        if self.path != "/search" or self.headers.get("X-API-KEY") != "test-key":
            return self._send(403, b'{"message": "Unauthorized."}', "application/json")
        organic = [
            {"title": "Quokka facts", "link": "https://example.org/quokka", "snippet": "A marsupial", "position": 1},
            {"title": "Leak", "link": "https://huggingface.co/datasets/x/gaia", "snippet": "answers", "position": 2},
            {"title": "Space", "link": "https://www.huggingface.co/spaces/x/y", "snippet": "demo", "position": 3},
            {"title": "More", "link": "https://example.org/more", "snippet": "more text", "position": 4},
        ]
        out = {"searchParameters": {"q": body["q"], "type": "search"}, "organic": organic, "credits": 1}
        self._send(200, json.dumps(out).encode(), "application/json")

    def do_GET(self) -> None:
        cls = type(self)
        if self.path == "/page.html":
            html = ("<html><head><title>Test &amp; Page</title><style>body{color:red}</style>"
                    "<script>var secret = 'hidden';</script></head><body><h1>Heading</h1>"
                    "<p>First   paragraph &lt;ok&gt;.</p><br/><div>Second <b>bold</b> line</div>"
                    "<noscript>no js</noscript></body></html>")
            return self._send(200, html.encode())
        if self.path == "/big":
            return self._send(200, b"<p>" + b"x" * 50_000 + b"</p>")
        if self.path == "/slow":
            time.sleep(1.5)
            return self._send(200, b"<p>late</p>")
        if self.path == "/flaky":
            cls.flaky_hits += 1
            if cls.flaky_hits <= 2:
                return self._send(503, b"busy")
            return self._send(200, b"<p>finally up</p>")
        if self.path == "/to-hf":
            return self._send(302, b"", headers={"Location": "https://huggingface.co/datasets/x/y"})
        if self.path == "/binary":
            return self._send(200, b"\x00\x01PK", "application/zip")
        if self.path == "/missing":
            return self._send(404, b"not found")
        self._send(500, b"?")


@pytest.fixture(scope="module")
def fake_web():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeWeb)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_serper_client_request_and_hf_filter(fake_web):
    async def main() -> None:
        _FakeWeb.searches.clear()
        async with SerperClient(WebConfig(serper_base_url=fake_web, api_key="test-key")) as c:
            data = await c.search("quokka habitat", gl="au", hl="en", num=4, tbs="qdr:y", page=2)
        headers, body = _FakeWeb.searches[-1]
        assert headers["X-API-KEY"] == "test-key" and "application/json" in headers["Content-Type"]
        assert body == {"q": "quokka habitat", "gl": "au", "hl": "en", "num": 4, "tbs": "qdr:y", "page": 2}
        assert [r["link"] for r in data["organic"]] == ["https://example.org/quokka", "https://example.org/more"]
        assert [r["position"] for r in data["organic"]] == [1, 2]
        async with SerperClient(WebConfig(serper_base_url=fake_web, api_key="wrong", max_retries=0)) as c:
            with pytest.raises(WebError, match="HTTP 403") as ei:
                await c.search("q")
            assert ei.value.kind == "http_error"

    run(main())


def test_serper_key_from_env(fake_web, monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "test-key")

    async def main() -> None:
        async with SerperClient(WebConfig(serper_base_url=fake_web)) as c:
            assert len((await c.search("anything"))["organic"]) == 2
        monkeypatch.delenv("SERPER_API_KEY")
        async with SerperClient(WebConfig(serper_base_url=fake_web)) as c:
            with pytest.raises(WebError, match="SERPER_API_KEY"):
                await c.search("anything")

    run(main())


def test_scraper_html_cap_timeout_retries_and_policy(fake_web):
    cfg = WebConfig(allow_private=True, max_bytes=10_000, scrape_timeout_s=0.3, max_retries=2, backoff_s=0.01)

    async def main() -> None:
        async with WebScraper(cfg) as s:
            text = await s.scrape(f"{fake_web}/page.html")
            assert text.splitlines()[0] == "Test & Page"
            assert "Heading" in text and "First paragraph <ok>." in text and "Second bold line" in text
            assert "secret" not in text and "color:red" not in text and "no js" not in text

            big = await s.scrape(f"{fake_web}/big")
            assert big.count("x") == 10_000 - len("<p>") and "truncated at 10000 bytes" in big

            t0 = time.perf_counter()
            with pytest.raises(WebError) as ei:
                await WebScraper(WebConfig(allow_private=True, scrape_timeout_s=0.3, max_retries=0)).scrape(
                    f"{fake_web}/slow")
            assert ei.value.kind == "timeout" and time.perf_counter() - t0 < 1.2

            _FakeWeb.flaky_hits = 0
            assert "finally up" in await s.scrape(f"{fake_web}/flaky")  # 503, 503, then 200
            assert _FakeWeb.flaky_hits == 3

            for url, kind in [("https://huggingface.co/datasets/gaia-benchmark/GAIA", "blocked"),
                              ("https://www.HuggingFace.co/spaces/a/b", "blocked"),
                              (f"{fake_web}/to-hf", "blocked"),          # blocked on the redirect hop
                              (f"{fake_web}/binary", "unsupported_content"),
                              (f"{fake_web}/missing", "http_error"),
                              ("ftp://example.org/x", "bad_url")]:
                with pytest.raises(WebError) as ei:
                    await s.scrape(url)
                assert ei.value.kind == kind, (url, ei.value)

        async with WebScraper(WebConfig()) as strict:  # default: private addresses refused
            for url in (f"{fake_web}/page.html", "http://localhost:9/x", "http://169.254.169.254/latest",
                        "http://10.1.2.3/", "http://[::1]:8080/"):
                with pytest.raises(WebError) as ei:
                    await strict.scrape(url)
                assert ei.value.kind == "private_address", url

    run(main())


def test_url_policy_helpers():
    pats = ("huggingface.co/datasets", "huggingface.co/spaces")
    assert is_blocked("https://huggingface.co/datasets/x", pats)
    assert not is_blocked("https://huggingface.co/Qwen/Qwen3-8B", pats)
    assert html_to_text("<p>a</p><script>x</script><p>b &amp; c</p>") == "a\nb & c"


def test_web_backend_through_mcp(fake_web, monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "test-key")
    cfg = ToolboxConfig(backend="web", serper_base_url=fake_web, allow_private=True, port=0,
                        max_output_chars=2_000)

    async def main() -> None:
        async with ToolClient({SEARCH_SERVER: srv.url}, timeout_s=10) as tc:
            r = await tc.call(SEARCH_SERVER, "google_search", {"q": "quokka"})
            data = json.loads(r.text)
            assert r.ok and all("huggingface" not in o["link"] for o in data["organic"])
            assert "credits" not in data and data["searchParameters"]["q"] == "quokka"
            r = await tc.call(SEARCH_SERVER, "scrape", {"url": f"{fake_web}/page.html"})
            assert r.ok and "First paragraph" in r.text
            r = await tc.call(SEARCH_SERVER, "scrape", {"url": f"{fake_web}/big"})
            assert r.ok and len(r.text) < 2_100 and "output truncated at 2000 characters" in r.text
            r = await tc.call(SEARCH_SERVER, "scrape", {"url": "https://huggingface.co/datasets/x"})
            assert r.error_kind == "tool_error" and "blocked" in r.text

    with RunningServer(cfg) as srv:
        run(main())


# --- failure injection ---------------------------------------------------------------------------
class _FaultyBackend:
    async def search(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["q"] == "boom":
            raise RuntimeError("backend exploded")
        return {"unexpected": "shape"}

    async def scrape(self, url: str) -> str:
        if "slow" in url:
            await asyncio.sleep(3)
        if "binary" in url:
            return "\x00\x01\x02\x03\x1b\x7f\ufffd" * 40
        return "fine"

    async def aclose(self) -> None:
        pass


def _serve_lowlevel(server: Any) -> tuple[str, Any]:
    """Serve an arbitrary MCP lowlevel Server over streamable HTTP on a thread."""
    import uvicorn

    from megatron_matpo.toolbox.server import _bind, run_loop

    sock = _bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), log_level="error"))
    t = threading.Thread(target=run_loop, args=(uv.serve(sockets=[sock]),), daemon=True)
    t.start()
    while not uv.started:
        time.sleep(0.02)

    def stop() -> None:
        uv.should_exit = True
        t.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", stop


def _raw_server() -> Any:
    import mcp_types as types
    from mcp.server.lowlevel import Server

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name=n, input_schema={"type": "object"})
                                            for n in ("crash", "image", "blank", "google_search")])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == "crash":
            raise RuntimeError("handler crashed")
        if params.name == "image":
            return types.CallToolResult(content=[types.ImageContent(data="AAAA", mime_type="image/png")])
        if params.name == "blank":
            return types.CallToolResult(content=[types.TextContent(text="  \n")])
        return types.CallToolResult(content=[types.TextContent(text="<html>not json</html>")])

    return Server("raw", on_list_tools=list_tools, on_call_tool=call_tool)


def test_failures_become_tool_results():
    cfg = ToolboxConfig(port=0, tool_timeout_s=30)
    raw_url, stop_raw = _serve_lowlevel(_raw_server())
    try:
        with RunningServer(cfg, backend=_FaultyBackend()) as srv:
            async def main() -> list[ToolResult]:
                servers = {SEARCH_SERVER: srv.url, "raw": raw_url, "down": f"http://127.0.0.1:{_free_port()}/mcp"}
                async with ToolClient(servers, timeout_s=0.5) as tc:
                    cases = [
                        (SEARCH_SERVER, "google_search", {"q": "boom"}, "tool_error", "backend exploded"),
                        (SEARCH_SERVER, "google_search", {"q": "ok"}, "tool_error", "malformed"),
                        (SEARCH_SERVER, "scrape", {"url": "https://x/slow"}, "timeout", "timed out"),
                        (SEARCH_SERVER, "scrape", {"url": "https://x/binary"}, "garbage", "unreadable"),
                        (SEARCH_SERVER, "no_such_tool", {}, "server_error", "unknown tool"),
                        ("raw", "crash", {}, "server_error", "rejected"),
                        ("raw", "image", {}, "garbage", "non-text"),
                        ("raw", "blank", {}, "empty", "empty output"),
                        ("raw", "google_search", {"q": "x"}, "garbage", "not valid JSON"),
                        ("down", "scrape", {"url": "https://x"}, "connection", "unreachable"),
                        ("nowhere", "scrape", {"url": "https://x"}, "unknown_server", "Available servers"),
                        (SEARCH_SERVER, "scrape", "not a dict", "bad_arguments", "JSON object"),
                    ]
                    results = [await tc.call(s, t, a) for s, t, a, _, _ in cases]  # type: ignore[arg-type]
                    for (s, t, _, kind, needle), r in zip(cases, results):
                        assert isinstance(r, ToolResult) and not r.ok, (s, t, r)
                        assert r.error_kind == kind and needle in r.text, (s, t, r)
                    # the session survives all of that
                    ok = await tc.call(SEARCH_SERVER, "scrape", {"url": "https://x/fine"})
                    assert ok.ok and ok.text == "fine"
                    m = tc.metrics()
                    assert m["tools/calls"] == len(cases) + 1 and m["tools/ok"] == 1
                    assert m["tools/errors/garbage"] == 3 and m["tools/errors/tool_error"] == 2
                    assert m["tools/errors/timeout"] == 1 and m["tools/errors/connection"] == 1
                    assert m["tools/errors/server_error"] == 2 and m["tools/errors/empty"] == 1
                    return results

            run(main())
    finally:
        stop_raw()


def test_reconnects_after_server_restart(corpus):
    port = _free_port()
    cfg = ToolboxConfig(corpus_path=str(corpus), port=port)
    args = {"url": "https://wiki.local/quokka"}

    async def main() -> None:
        async with ToolClient({SEARCH_SERVER: f"http://127.0.0.1:{port}/mcp"}, timeout_s=10) as tc:
            with RunningServer(cfg):
                assert (await tc.call(SEARCH_SERVER, "scrape", args)).ok
            down = await tc.call(SEARCH_SERVER, "scrape", args)
            assert not down.ok and down.error_kind == "connection"
            with RunningServer(cfg):
                assert (await tc.call(SEARCH_SERVER, "scrape", args)).ok  # reconnected on its own

    run(main())


def test_looks_like_garbage():
    assert looks_like_garbage("\x00\x01\x02" * 20) and not looks_like_garbage("plain text\twith tabs\n")


# --- noise ---------------------------------------------------------------------------------------
def _results(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"title": f"{prefix}{i}", "link": f"https://wiki.local/{prefix}{i}", "snippet": "s", "position": i + 1}
            for i in range(n)]


def test_noise_deterministic_and_effects(corpus):
    text = "word " * 200
    cfg = NoiseConfig(seed=7, truncate_prob=1.0, shuffle_prob=1.0, distractor_prob=1.0, num_distractors=3)
    index = LocalSearchIndex.open(corpus)
    a = NoiseInjector(cfg, index.random_results)
    b = NoiseInjector(cfg, index.random_results)
    res = _results(5)
    out_a, out_b = a.perturb_results(res, key="q1"), b.perturb_results(res, key="q1")
    assert out_a == out_b  # same seed, same key: identical
    assert res == _results(5)  # input untouched
    assert len(out_a) == 8 and [r["position"] for r in out_a] == list(range(1, 9))
    extra = {r["link"] for r in out_a} - {r["link"] for r in res}
    assert len(extra) == 3 and all(u.startswith("https://wiki.local/") for u in extra)
    assert {r["link"] for r in res} <= {r["link"] for r in out_a}
    seeds = {tuple(r["link"] for r in NoiseInjector(NoiseConfig(seed=s, shuffle_prob=1.0)).perturb_results(res, "q"))
             for s in range(6)}
    assert len(seeds) > 1  # different seeds, different orders

    t_a, t_b = a.perturb_text(text, key="u"), b.perturb_text(text, key="u")
    assert t_a == t_b and t_a.endswith("[... content truncated]")
    kept = len(t_a) - len("\n[... content truncated]")
    assert 0.2 * len(text) <= kept <= 0.8 * len(text) and text.startswith(t_a[:kept])

    off = NoiseInjector(NoiseConfig(seed=7))
    assert off.perturb_text(text, "u") == text and off.perturb_results(res, "q") == res

    only_shuffle = NoiseInjector(NoiseConfig(seed=1, shuffle_prob=1.0)).perturb_results(_results(6), "k")
    assert sorted(r["link"] for r in only_shuffle) == sorted(r["link"] for r in _results(6))
    assert [r["position"] for r in only_shuffle] == list(range(1, 7))

    # without a corpus, distractors come from results seen for other queries
    pooled = NoiseInjector(NoiseConfig(seed=3, distractor_prob=1.0, num_distractors=2))
    assert len(pooled.perturb_results(_results(3, "old"), key="first")) == 3  # empty pool yet
    out = pooled.perturb_results(_results(2, "new"), key="second")
    assert len(out) == 4 and sum(r["link"].startswith("https://wiki.local/old") for r in out) == 2

    # partial probabilities: applied to some calls, not all; still deterministic per key
    half = NoiseInjector(NoiseConfig(seed=0, truncate_prob=0.5))
    cut = [half.perturb_text(text, key=str(k)) != text for k in range(200)]
    assert 60 < sum(cut) < 140
    assert cut == [half.perturb_text(text, key=str(k)) != text for k in range(200)]
    with pytest.raises(ValueError):
        NoiseConfig(truncate_prob=1.5)


def test_noise_in_local_server(corpus):
    cfg = ToolboxConfig(corpus_path=str(corpus), port=0,
                        noise=NoiseConfig(seed=5, truncate_prob=1.0, distractor_prob=1.0, num_distractors=2))

    async def main() -> None:
        async with ToolClient({SEARCH_SERVER: srv.url}) as tc:
            r1 = await tc.call(SEARCH_SERVER, "google_search", {"q": "quokka marsupial", "num": 1})
            r2 = await tc.call(SEARCH_SERVER, "google_search", {"q": "quokka marsupial", "num": 1})
            assert r1.text == r2.text and len(json.loads(r1.text)["organic"]) == 3
            s = await tc.call(SEARCH_SERVER, "scrape", {"url": "https://wiki.local/quokka"})
            assert s.ok and s.text.endswith("[... content truncated]")

    with RunningServer(cfg) as srv:
        run(main())


# --- concurrency ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["server", "client"])
def test_concurrent_calls_overlap(corpus, local_server, where):
    n, latency = 32, 0.3

    async def main(url: str, client_latency: float) -> float:
        async with ToolClient({SEARCH_SERVER: url}, injected_latency_s=client_latency) as tc:
            await tc.connect()
            t0 = time.perf_counter()
            rs = await asyncio.gather(*(tc.call(SEARCH_SERVER, "google_search", {"q": f"airship {i}"})
                                        for i in range(n)))
            elapsed = time.perf_counter() - t0
            assert all(r.ok for r in rs) and all(r.latency_s >= latency * 0.95 for r in rs)
            assert tc.metrics()["tools/calls"] == n
            return elapsed

    if where == "server":
        with RunningServer(ToolboxConfig(corpus_path=str(corpus), port=0, injected_latency_s=latency)) as srv:
            elapsed = run(main(srv.url, 0.0))
    else:
        elapsed = run(main(local_server.url, latency))
    ratio = elapsed / (n * latency)
    print(f"\n{n} concurrent calls, {latency}s injected ({where}): {elapsed:.2f}s, "
          f"ratio to sequential {ratio:.3f}")
    assert ratio < 0.5
