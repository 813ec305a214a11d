"""Final answers of discussion turns: extraction (`\\boxed{}` or the last number), numeric parsing,
and answer equality (numeric tolerance, else SQuAD-normalized text). Used by the exact-match
verifier, the consensus check and the persuasion incentive (did agent j adopt agent i's answer?).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_matpo.agents.prompts import THINK_CLOSE
from megatron_matpo.reward.answer import extract_boxed, normalize_answer

# a number as people and models write it: sign, thousands separators, decimals, optional exponent
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])"
                     r"|(?<![\w.])[-\u2212]?\.\d+(?![\w])")
_FRAC = re.compile(r"^\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}$")
_SLASH = re.compile(r"^([-\u2212]?[\d.,]+)\s*/\s*([-\u2212]?[\d.,]+)$")
# wrappers and units around a number that do not change its value
_STRIP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}|\\[,;! ]|\\%|[$%\u20ac\u00a3]|\\\$")


def _float(s: str) -> float | None:
    s = s.strip().replace("\u2212", "-").replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_number(text: str | None) -> float | None:
    """The value of an answer that is one number: `42`, `-3.5`, `1,234`, `$12.50`, `75%`, `3/4`,
    `\\frac{3}{4}`, `12 \\text{ apples}`, `1e3`. None when the answer is not exactly one number
    (a sentence with several numbers, a label such as `entailment`)."""
    if text is None:
        return None
    s = _STRIP.sub(" ", text).strip().rstrip(".").strip()
    if not s:
        return None
    m = _FRAC.match(s) or _SLASH.match(s)
    if m:
        num, den = _float(m.group(1)), _float(m.group(2))
        return num / den if num is not None and den not in (None, 0.0) else None
    nums = _NUMBER.findall(s)
    if len(nums) != 1:
        return None
    # the number plus at most a trailing unit word ("12 apples"), nothing that changes its meaning
    rest = s.replace(nums[0], " ", 1).strip()
    if rest and not re.fullmatch(r"[A-Za-z][A-Za-z ]{0,30}", rest):
        return None
    return _float(nums[0])


def final_answer(text: str | None) -> str | None:
    """The answer a turn commits to: the content of its last `\\boxed{}`, else the last number
    written after any reasoning block (`</think>`); None when there is neither."""
    if not text:
        return None
    cut = text.rfind(THINK_CLOSE)
    visible = text[cut + len(THINK_CLOSE):] if cut >= 0 else text
    boxed = extract_boxed(visible)
    if boxed is not None:
        return boxed
    nums = _NUMBER.findall(visible)
    return nums[-1].replace("\u2212", "-") if nums else None


@dataclass(frozen=True)
class Tolerance:
    rel: float = 1e-6
    abs: float = 1e-6


def answers_match(a: str | None, b: str | None, tol: Tolerance = Tolerance()) -> bool:
    """Numeric equality within `tol` when both parse as one number; otherwise equality of the
    SQuAD-normalized text (so `Entailment.` == `entailment`). None matches nothing."""
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=tol.rel, abs_tol=tol.abs)
    if x is not None or y is not None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na) and na == nb


def matches_any(pred: str | None, gold: str | Sequence[str], tol: Tolerance = Tolerance()) -> bool:
    golds = [gold] if isinstance(gold, str) else [str(g) for g in gold]
    return any(answers_match(pred, g, tol) for g in golds)


def consensus(answers: Sequence[str | None], tol: Tolerance = Tolerance()) -> bool:
    """Every agent gave an answer and all answers are equal."""
    if not answers or any(a is None for a in answers):
        return False
    return all(answers_match(answers[0], a, tol) for a in answers[1:])
