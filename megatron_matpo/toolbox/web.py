"""Production web backend: a Serper-compatible search client and an httpx page scraper.

Safety rules that hold for both: HuggingFace dataset/space URLs are dropped (benchmark answers
leak through them), and the scraper refuses hosts that resolve to private/loopback/link-local
addresses (a model-chosen URL must not reach the cluster's internal services) unless
`allow_private` is set. Failures raise `WebError` with a short `kind` and a readable message.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

DEFAULT_SERPER_URL = "https://google.serper.dev"
DEFAULT_BLOCKED_URL_PATTERNS: tuple[str, ...] = ("huggingface.co/datasets", "huggingface.co/spaces")
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_REDIRECTS = 5
_T = TypeVar("_T")


class WebError(Exception):
    """A search/scrape failure. kind: blocked | private_address | bad_url | http_error | timeout |
    connection | unsupported_content | bad_response | config."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.kind, self.retryable = kind, retryable


@dataclass
class WebConfig:
    serper_base_url: str = DEFAULT_SERPER_URL
    api_key: str | None = None          # None: read SERPER_API_KEY at call time
    search_timeout_s: float = 20.0
    scrape_timeout_s: float = 30.0      # whole-request deadline per attempt (not per socket op)
    max_bytes: int = 2_000_000          # download cap; longer bodies are cut, not rejected
    max_retries: int = 2                # extra attempts on timeouts, connection errors, 429/5xx
    backoff_s: float = 0.5              # sleep backoff_s * 2**attempt between attempts
    blocked_url_patterns: tuple[str, ...] = DEFAULT_BLOCKED_URL_PATTERNS
    allow_private: bool = False
    user_agent: str = "Mozilla/5.0 (compatible; megatron-matpo-toolbox/0.1)"


# --- URL policy ----------------------------------------------------------------------------------
def is_blocked(url: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when the URL (scheme and leading 'www.' ignored, case-insensitive) contains a pattern."""
    u = url.strip().lower().split("://", 1)[-1]
    u = u.removeprefix("www.")
    return any(p.lower().removeprefix("www.") in u for p in patterns)


def drop_blocked(payload: Any, patterns: tuple[str, ...] | list[str]) -> Any:
    """Remove every dict with a blocked "link" from the lists of a Serper response (organic,
    peopleAlsoAsk, ...), and renumber organic positions so the model sees no gaps."""
    if isinstance(payload, dict):
        out = {k: drop_blocked(v, patterns) for k, v in payload.items()
               if not (isinstance(v, dict) and is_blocked(str(v.get("link", "")), patterns))}
        if isinstance(out.get("organic"), list):
            for i, r in enumerate(out["organic"], 1):
                if isinstance(r, dict) and "position" in r:
                    r["position"] = i
        return out
    if isinstance(payload, list):
        return [drop_blocked(v, patterns) for v in payload
                if not (isinstance(v, dict) and is_blocked(str(v.get("link", "")), patterns))]
    return payload


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global is False for private, loopback, link-local, shared (CGNAT), reserved, unspecified.
    return ip.is_global and not ip.is_multicast


async def ensure_public_host(url: str, allow_private: bool = False) -> None:
    """Refuse a URL whose host resolves to any non-public address. Checked before each request and
    redirect hop (a DNS answer could still change between check and connect; this stops the model
    from naming internal hosts, not a determined attacker controlling DNS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebError("bad_url", f"not an absolute http(s) URL: {url!r}")
    if allow_private:
        return
    host = parts.hostname
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443,
                                                                  type=socket.SOCK_STREAM)
        except OSError as e:
            raise WebError("connection", f"cannot resolve host {host!r}: {e}") from e
        addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    bad = [str(a) for a in addrs if not _is_public(a)]
    if bad:
        raise WebError("private_address", f"refused: {host!r} resolves to a non-public address "
                                          f"({', '.join(sorted(set(bad)))})")


# --- HTML -> text --------------------------------------------------------------------------------
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "head"})
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article",
                         "header", "footer", "nav", "aside", "h1", "h2", "h3", "h4", "h5", "h6",
                         "pre", "blockquote", "hr", "dt", "dd", "main", "form", "figure", "title"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP_TAGS:
            self._skip += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:  # <br/>, <hr/> must not bump the skip depth
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP_TAGS and self._skip:
            self._skip -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document (stdlib parser; script/style dropped), title first."""
    p = _TextExtractor()
    p.feed(html)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).splitlines())
    body = "\n".join(line for line in lines if line)
    title = " ".join("".join(p.title).split())
    return f"{title}\n\n{body}" if title and body else title or body


# --- retries -------------------------------------------------------------------------------------
async def _with_retries(attempt_fn: Callable[[], Awaitable[_T]], retries: int, backoff_s: float) -> _T:
    for attempt in range(retries + 1):
        try:
            return await attempt_fn()
        except WebError as e:
            if not e.retryable or attempt == retries:
                raise
        await asyncio.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def _transport_error(e: Exception, what: str, timeout_s: float) -> WebError:
    if isinstance(e, (TimeoutError, httpx.TimeoutException)):
        return WebError("timeout", f"{what} timed out after {timeout_s:g}s", retryable=True)
    return WebError("connection", f"{what} failed: {type(e).__name__}: {e}", retryable=True)


# --- clients -------------------------------------------------------------------------------------
class _HttpClientOwner:
    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # created lazily: must live on the loop that uses it
            self._client = httpx.AsyncClient(follow_redirects=False,
                                             headers={"User-Agent": self.cfg.user_agent})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> _HttpClientOwner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SerperClient(_HttpClientOwner):
    """POST {base_url}/search with X-API-KEY; returns Serper's JSON with blocked links dropped."""

    async def search(self, q: str, gl: str | None = None, hl: str | None = None,
                     location: str | None = None, num: int | None = None, tbs: str | None = None,
                     page: int | None = None) -> dict[str, Any]:
        key = self.cfg.api_key or os.environ.get("SERPER_API_KEY")
        if not key:
            raise WebError("config", "no Serper API key: set SERPER_API_KEY or WebConfig.api_key")
        body = {k: v for k, v in dict(q=q, gl=gl, hl=hl, location=location, num=num, tbs=tbs,
                                      page=page).items() if v is not None}
        url = self.cfg.serper_base_url.rstrip("/") + "/search"
        timeout = self.cfg.search_timeout_s

        async def attempt() -> dict[str, Any]:
            try:
                async with asyncio.timeout(timeout):
                    resp = await self.client.post(url, json=body, timeout=timeout,
                                                  headers={"X-API-KEY": key})
            except (TimeoutError, httpx.HTTPError) as e:
                raise _transport_error(e, "search request", timeout) from e
            if resp.status_code != 200:
                raise WebError("http_error", f"search API returned HTTP {resp.status_code}: "
                               f"{resp.text[:200]}", retryable=resp.status_code in _RETRYABLE_STATUS)
            try:
                data = resp.json()
            except ValueError as e:
                raise WebError("bad_response", "search API returned invalid JSON") from e
            if not isinstance(data, dict):
                raise WebError("bad_response", "search API returned a non-object JSON value")
            data.setdefault("organic", [])
            return drop_blocked(data, self.cfg.blocked_url_patterns)

        return await _with_retries(attempt, self.cfg.max_retries, self.cfg.backoff_s)


class WebScraper(_HttpClientOwner):
    """GET a page (manual redirects, each hop re-checked) and return its text."""

    async def scrape(self, url: str) -> str:
        self._check_policy(url)
        return await _with_retries(lambda: self._fetch(url), self.cfg.max_retries, self.cfg.backoff_s)

    def _check_policy(self, url: str) -> None:
        if is_blocked(url, self.cfg.blocked_url_patterns):
            raise WebError("blocked", f"access to {url!r} is blocked (HuggingFace datasets/spaces "
                                      "and other blocked sources are not allowed)")

    async def _fetch(self, url: str) -> str:
        timeout = self.cfg.scrape_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._fetch_following_redirects(url, timeout)
        except (TimeoutError, httpx.HTTPError) as e:
            raise _transport_error(e, f"fetching {url}", timeout) from e

    async def _fetch_following_redirects(self, url: str, timeout: float) -> str:
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_policy(current)
            await ensure_public_host(current, self.cfg.allow_private)
            async with self.client.stream("GET", current, timeout=timeout) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    current = urljoin(current, resp.headers["location"])
                    continue
                if resp.status_code >= 400:
                    raise WebError("http_error", f"HTTP {resp.status_code} for {current}",
                                   retryable=resp.status_code in _RETRYABLE_STATUS)
                body, cut = await self._read_capped(resp)
                return self._to_text(resp, body, cut)
        raise WebError("http_error", f"too many redirects for {url}")

    async def _read_capped(self, resp: httpx.Response) -> tuple[bytes, bool]:
        buf = bytearray()
        async for chunk in resp.aiter_bytes():  # decoded: the cap bounds what we parse
            buf.extend(chunk)
            if len(buf) > self.cfg.max_bytes:
                return bytes(buf[: self.cfg.max_bytes]), True
        return bytes(buf), False

    def _to_text(self, resp: httpx.Response, body: bytes, cut: bool) -> str:
        ctype = resp.headers.get("content-type", "text/html").split(";")[0].strip().lower()
        if not (ctype.startswith("text/") or ctype in ("application/xhtml+xml", "application/json",
                                                         "application/xml")):
            raise WebError("unsupported_content", f"cannot read content type {ctype!r}")
        try:
            raw = body.decode(resp.charset_encoding or "utf-8", errors="replace")
        except LookupError:  # unknown charset name in the header
            raw = body.decode("utf-8", errors="replace")
        text = html_to_text(raw) if ctype in ("text/html", "application/xhtml+xml") else raw
        if cut:
            text += f"\n\n[page truncated at {self.cfg.max_bytes} bytes]"
        return text
