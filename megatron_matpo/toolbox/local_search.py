"""Offline search backend: BM25 full-text search over a local page corpus (SQLite FTS5).

The corpus is a `corpus.jsonl` file, one page per line: {"url", "title", "text"}. It is loaded
once into SQLite (a file that later runs reuse while the corpus is unchanged, or in-memory) and
ranked with FTS5's built-in `bm25()`. Results use Serper's organic-result shape so the model sees
the same format offline and in production.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Title matches count more than body matches (column weights for bm25(): url, title, text).
_BM25_WEIGHTS = (0.0, 3.0, 1.0)
_MAX_QUERY_TERMS = 32
_SNIPPET_TOKENS = 32
_SCHEMA_VERSION = "1"


class PageNotFound(LookupError):
    """The requested URL is not in the local corpus."""


@dataclass(frozen=True)
class Page:
    url: str
    title: str
    text: str


def read_corpus(path: str | os.PathLike[str]) -> Iterator[Page]:
    """Yield the pages of a corpus.jsonl file; a malformed line is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield Page(url=str(row["url"]), title=str(row.get("title", "")), text=str(row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad corpus line ({e!r}); expected "
                                 '{"url": str, "title": str, "text": str}') from e


def fts_query(q: str) -> str:
    """Turn free text into a safe FTS5 query: every word quoted (no operator injection), OR-ed so
    BM25 ranks by how many / how rare the matched terms are."""
    terms = re.findall(r"\w+", q.lower())[:_MAX_QUERY_TERMS]
    return " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))


def _normalize_url(url: str) -> str:
    url = url.strip().split("#", 1)[0]
    url = re.sub(r"^http://", "https://", url)
    return url.rstrip("/")


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{_SCHEMA_VERSION}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class LocalSearchIndex:
    """A read-mostly page store with BM25 search. Thread-safe (one connection behind a lock)."""

    def __init__(self, db_path: str | os.PathLike[str] = ":memory:") -> None:
        self.db_path = str(db_path)
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False)
        self._lock = threading.Lock()
        self._create_schema()

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_pages(cls, pages: Iterable[Page], db_path: str | os.PathLike[str] = ":memory:") -> LocalSearchIndex:
        index = cls(db_path)
        index.add_pages(pages)
        return index

    @classmethod
    def open(cls, corpus_path: str | os.PathLike[str],
             index_path: str | os.PathLike[str] | None = None) -> LocalSearchIndex:
        """Load `corpus_path`; with `index_path`, reuse that SQLite file when it was built from the
        same corpus file (path, size, mtime), else rebuild it atomically (write a temp file, rename)
        so concurrent servers never read a half-built index."""
        corpus = Path(corpus_path)
        if not corpus.is_file():
            raise FileNotFoundError(f"corpus file not found: {corpus}")
        if index_path is None:
            return cls.from_pages(read_corpus(corpus))
        index_file, fp = Path(index_path), _fingerprint(corpus)
        if index_file.is_file():
            index = cls(index_file)
            if index._meta("fingerprint") == fp:
                return index
            index.close()
        tmp = index_file.with_name(f"{index_file.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        index = cls.from_pages(read_corpus(corpus), tmp)
        index._set_meta("fingerprint", fp)
        index.close()
        os.replace(tmp, index_file)
        return cls(index_file)

    def _create_schema(self) -> None:
        with self._lock, self._conn:
            self._conn.executescript("""
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, url TEXT UNIQUE, title TEXT, text TEXT);
                CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(
                    url UNINDEXED, title, text, content='docs', content_rowid='id',
                    tokenize='porter unicode61');
            """)

    def add_pages(self, pages: Iterable[Page]) -> int:
        """Insert pages (a repeated URL keeps its first page) and refresh the full-text index."""
        added = dupes = 0
        with self._lock, self._conn:
            for p in pages:
                cur = self._conn.execute("INSERT OR IGNORE INTO docs(url, title, text) VALUES (?, ?, ?)",
                                         (_normalize_url(p.url), p.title, p.text))
                added += cur.rowcount
                dupes += 1 - cur.rowcount
            # External-content FTS table: one 'rebuild' after a bulk load beats per-row triggers.
            self._conn.execute("INSERT INTO docs_fts(docs_fts) VALUES ('rebuild')")
        if dupes:
            log.warning("local corpus: %d duplicate URL(s) ignored", dupes)
        return added

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- queries --------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def search(self, q: str, num: int = 10, page: int = 1) -> list[dict[str, Any]]:
        """BM25-ranked organic results {title, link, snippet, position}; positions are global
        (page 2 of size 10 starts at 11), like Serper's."""
        match = fts_query(q)
        num, page = max(1, min(int(num), 100)), max(1, int(page))
        if not match:
            return []
        offset = (page - 1) * num
        with self._lock:
            rows = self._conn.execute(
                f"SELECT d.url, d.title, snippet(docs_fts, 2, '', '', '...', {_SNIPPET_TOKENS}) "
                f"FROM docs_fts JOIN docs d ON d.id = docs_fts.rowid WHERE docs_fts MATCH ? "
                f"ORDER BY bm25(docs_fts, {', '.join(map(str, _BM25_WEIGHTS))}) LIMIT ? OFFSET ?",
                (match, num, offset)).fetchall()
        return [{"title": t, "link": u, "snippet": s, "position": offset + i + 1}
                for i, (u, t, s) in enumerate(rows)]

    def get_page(self, url: str) -> Page | None:
        with self._lock:
            row = self._conn.execute("SELECT url, title, text FROM docs WHERE url = ?",
                                     (_normalize_url(url),)).fetchone()
        return Page(*row) if row else None

    def scrape(self, url: str) -> str:
        """The page text (title first), or PageNotFound with a message the model can act on."""
        page = self.get_page(url)
        if page is None:
            raise PageNotFound(f"page not found: {url!r} is not in the local corpus; "
                               "use a link returned by google_search")
        return f"{page.title}\n\n{page.text}" if page.title else page.text

    def random_results(self, rng: random.Random, k: int, exclude: set[str] | None = None,
                       snippet_chars: int = 200) -> list[dict[str, Any]]:
        """Up to k random pages as organic results (no position): distractors for noise."""
        exclude = {_normalize_url(u) for u in exclude or ()}
        with self._lock:
            max_id = self._conn.execute("SELECT MAX(id) FROM docs").fetchone()[0] or 0
        out: list[dict[str, Any]] = []
        for _ in range(4 * k):  # ids may have gaps / excluded hits; bounded retries
            if len(out) >= k or max_id == 0:
                break
            with self._lock:
                row = self._conn.execute("SELECT url, title, text FROM docs WHERE id = ?",
                                         (rng.randint(1, max_id),)).fetchone()
            if row and row[0] not in exclude:
                exclude.add(row[0])
                out.append({"title": row[1], "link": row[0], "snippet": row[2][:snippet_chars]})
        return out
