"""MATPO-data rows (veRL style) validated into `Sample`s, plus avg@k grouping of repeated eval sets.

Row shape, as in the MATPO-data parquet files:
    data_source: str
    prompt: [{"role": str, "content": str}, ...]        # system prompt + user question
    ability: str
    reward_model: {"ground_truth": str, "style": str}
    extra_info: {"answer", "question", "index" (int | str), "split", "need_tools_kwargs",
                 "tools_kwargs": {tool: {"create_kwargs": {"ground_truth"}}},
                 optional "question_type" / "evidence_list" / "metadata"}
    optional top-level columns: "dataset", "level", "task_id"
Validation is strict only where the trainer depends on a value (prompt, question, ground truth).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
_CORE_EXTRA_KEYS = ("question", "index", "split")
_REPEAT_RE = re.compile(r"repeat_(\d+)$")


class DatasetError(ValueError):
    """A data file or row does not match the MATPO-data schema; the message says where."""


@dataclass
class Sample:
    uid: str                      # unique within a dataset: "<group>#<occurrence>"
    data_source: str
    question: str
    ground_truth: str
    prompt: list[dict[str, str]]  # chat messages, ready for a chat template
    index: int | str | None       # extra_info.index (int in some configs, str in others)
    split: str
    extra: dict[str, Any] = field(default_factory=dict)    # the rest of extra_info
    group: str = ""               # repeats of one question share it (avg@k, eval grouping)
    ability: str = "qa"
    reward_style: str = "rule"
    columns: dict[str, Any] = field(default_factory=dict)  # optional top-level columns

    def to_row(self) -> dict[str, Any]:
        """The MATPO-data row for this sample (inverse of `sample_from_row`)."""
        extra_info = {"answer": self.ground_truth, "question": self.question, "index": self.index,
                      "split": self.split, **self.extra}
        return {
            "data_source": self.data_source,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in self.prompt],
            "ability": self.ability,
            "reward_model": {"ground_truth": self.ground_truth, "style": self.reward_style},
            "extra_info": extra_info,
            **self.columns,
        }


def _tname(v: Any) -> str:
    return "None" if v is None else type(v).__name__


class _Where:
    """Builds `<file> row <n>: field <name>: <problem>` messages."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, fieldname: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.where}: field {fieldname}: {problem}")

    def string(self, value: Any, fieldname: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.error(fieldname, f"expected a string, got {_tname(value)}")
        if nonempty and not value.strip():
            raise self.error(fieldname, "expected a non-empty string, got an empty one")
        return value

    def mapping(self, value: Any, fieldname: str, *, optional: bool = False) -> dict[str, Any] | None:
        if value is None and optional:
            return None
        if not isinstance(value, Mapping):
            raise self.error(fieldname, f"expected a struct/dict, got {_tname(value)}")
        return dict(value)


def _messages(w: _Where, value: Any) -> list[dict[str, str]]:
    if value is None or isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise w.error("prompt", f"expected a list of {{role, content}} messages, got {_tname(value)}")
    out = []
    for i, m in enumerate(value):
        m = w.mapping(m, f"prompt[{i}]")
        role = w.string(m.get("role"), f"prompt[{i}].role", nonempty=True)
        content = w.string(m.get("content"), f"prompt[{i}].content")
        out.append({"role": role, "content": content})
    if not out:
        raise w.error("prompt", "expected at least one message, got an empty list")
    return out


def _tools_kwargs(w: _Where, value: Any) -> None:
    tk = w.mapping(value, "extra_info.tools_kwargs", optional=True)
    for tool, kw in (tk or {}).items():
        # pyarrow fills tools absent from a row with None (the struct is the union over rows)
        kw = w.mapping(kw, f"extra_info.tools_kwargs.{tool}", optional=True)
        if kw is not None:
            w.mapping(kw.get("create_kwargs"), f"extra_info.tools_kwargs.{tool}.create_kwargs", optional=True)


def group_key(data_source: str, index: int | str | None, question: str) -> str:
    if index is not None:
        return f"{data_source}:{index}"
    # no index: identical questions are repeats of one another
    return f"{data_source}:q{hashlib.sha1(question.encode()).hexdigest()[:12]}"


def sample_from_row(row: Mapping[str, Any], where: str = "row") -> Sample:
    """Validate one row; `where` (e.g. "train-00000.parquet row 17") prefixes every error."""
    w = _Where(where)
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a row dict, got {_tname(row)}")
    for col in REQUIRED_COLUMNS:
        if col not in row:
            raise w.error(col, "missing column")
    data_source = w.string(row["data_source"], "data_source", nonempty=True)
    prompt = _messages(w, row["prompt"])
    ability = w.string(row.get("ability"), "ability", optional=True) or "qa"

    rm = w.mapping(row["reward_model"], "reward_model")
    ground_truth = w.string(rm.get("ground_truth"), "reward_model.ground_truth", nonempty=True)
    style = w.string(rm.get("style"), "reward_model.style", optional=True) or "rule"

    ei = w.mapping(row.get("extra_info"), "extra_info", optional=True) or {}
    question = w.string(ei.get("question"), "extra_info.question", optional=True)
    if question is None or not question.strip():
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise w.error("extra_info.question", "missing, and the prompt has no non-empty user message")
        question = users[-1]
    index = ei.get("index")
    if isinstance(index, bool) or not (index is None or isinstance(index, (int, str))):
        raise w.error("extra_info.index", f"expected an int or a string, got {_tname(index)}")
    split = w.string(ei.get("split"), "extra_info.split", optional=True) or ""
    w.string(ei.get("answer"), "extra_info.answer", optional=True)
    need = ei.get("need_tools_kwargs")
    if need is not None and not isinstance(need, bool):
        raise w.error("extra_info.need_tools_kwargs", f"expected a bool, got {_tname(need)}")
    _tools_kwargs(w, ei.get("tools_kwargs"))

    # None values are struct fields other rows have (pyarrow unions struct fields); drop them
    extra = {k: v for k, v in ei.items() if k not in _CORE_EXTRA_KEYS and v is not None}
    columns = {k: v for k, v in row.items()
               if k not in (*REQUIRED_COLUMNS, "ability", "extra_info") and v is not None}
    group = group_key(data_source, index, question)
    return Sample(uid=f"{group}#0", data_source=data_source, question=question, ground_truth=ground_truth,
                  prompt=prompt, index=index, split=split, extra=extra, group=group, ability=ability,
                  reward_style=style, columns=columns)


def assign_uids(samples: Iterable[Sample]) -> list[Sample]:
    """uid = "<group>#<r>", r counting earlier samples of the same group (repeats get 0..k-1)."""
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        r = seen.get(s.group, 0)
        seen[s.group] = r + 1
        out.append(dataclasses.replace(s, uid=f"{s.group}#{r}"))
    return out


# ----- repeated eval sets (avg@k) -----

def repeat_k_from_name(name: str) -> int:
    """`matpo_val_gaia_repeat_8` -> 8; names without a `repeat_<k>` suffix -> 1."""
    m = _REPEAT_RE.search(name.rstrip("/"))
    if m is None:
        return 1
    k = int(m.group(1))
    if k < 1:
        raise DatasetError(f"{name}: repeat count must be >= 1, got {k}")
    return k


def expand_repeats(samples: Sequence[Sample], k: int) -> list[Sample]:
    """Each sample k times in a row (how a `repeat_k` eval set is laid out), with distinct uids."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    groups = [s.group for s in samples]
    if len(set(groups)) != len(groups):
        raise ValueError("expand_repeats needs samples with distinct groups (already repeated?)")
    return assign_uids(s for s in samples for _ in range(k))


def group_samples(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return groups


def check_repeats(samples: Sequence[Sample], k: int, where: str) -> None:
    """Every question of a repeat_k set must appear exactly k times."""
    for g, members in group_samples(samples).items():
        if len(members) != k:
            raise DatasetError(f"{where}: repeat_{k} set, but group {g!r} has {len(members)} rows")


def avg_at_k(groups: Sequence[str], scores: Sequence[float], k: int | None = None) -> float:
    """Mean over questions of the mean score of that question's k attempts.

    `groups[i]` is the group of the sample scored `scores[i]` (1.0 correct, 0.0 wrong). With `k`,
    every group must have exactly k scores, which catches dropped or duplicated eval results.
    """
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups but {len(scores)} scores")
    if not groups:
        raise ValueError("avg_at_k of no samples")
    per: dict[str, list[float]] = {}
    for g, s in zip(groups, scores):
        per.setdefault(g, []).append(float(s))
    if k is not None:
        bad = {g: len(v) for g, v in per.items() if len(v) != k}
        if bad:
            g, n = next(iter(bad.items()))
            raise ValueError(f"avg@{k}: {len(bad)} groups do not have {k} scores (e.g. {g!r}: {n})")
    return sum(sum(v) / len(v) for v in per.values()) / len(per)
