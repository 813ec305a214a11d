"""Final-answer extraction (`\\boxed{}`) and SQuAD-style answer matching (EM, token F1)."""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str | None) -> str | None:
    """Content of the LAST well-formed `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x` up to the
    next whitespace or `$`), braces nested and `\\{`/`\\}` escapes honoured; stripped. A box that
    never closes (a truncated answer) is skipped in favour of the previous one. None if none."""
    if not text:
        return None
    for m in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, m.end())
        if content is not None:
            return content.strip()
    return None


def _box_content(text: str, pos: int) -> str | None:
    i, n = pos, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i < n and text[i] == "{":
        depth, j = 0, i
        while j < n:
            ch = text[j]
            if ch == "\\":
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
            j += 1
        return None
    if i == pos:  # `\boxed` glued to something that is neither a space nor a brace
        return None
    j = i
    while j < n and not text[j].isspace() and text[j] != "$":
        j += 1
    return text[i:j] if j > i else None


_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD normalization (lowercase, drop punctuation, drop articles a/an/the, collapse
    whitespace), plus two extensions for boxed answers: `\\text{X}`-like wrappers unwrap to X, and
    Unicode punctuation (curly quotes, dashes) is dropped like ASCII punctuation."""
    prev = None
    while prev != s:
        prev, s = s, _LATEX_TEXT.sub(r"\1", s)
    s = "".join(ch for ch in s.lower() if not _is_punct(ch))
    return " ".join(_ARTICLES.sub(" ", s).split())


def _aliases(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    return [str(g) for g in gold]  # also numpy arrays of strings, as parquet columns load


def exact_match(pred: str | None, gold: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold alias, else 0.0."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _aliases(gold)))


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)  # SQuAD convention: both empty -> 1, one empty -> 0
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, gold: str | Sequence[str]) -> float:
    """Token F1 of the normalized answers, max over gold aliases; 0.0 for no prediction."""
    if pred is None:
        return 0.0
    return max((_token_f1(pred, g) for g in _aliases(gold)), default=0.0)
