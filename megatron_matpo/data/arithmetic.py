"""MAPoRL task data in the MATPO-data parquet schema: an offline GSM8K-like arithmetic set, and
loaders for users who have GSM8K (jsonl: question, answer "... #### N") or ANLI (jsonl: premise or
context, hypothesis, label) files.

The generated problems are short word problems: a starting amount, then `n_ops` steps (add,
subtract, multiply, divide; every intermediate value a non-negative integer, divisions exact),
then "How many ... now?". Difficulty knobs: the number of operations, the operand range and the
largest multiplication/division factor. Everything flows from one `random.Random(seed)`: the same
config gives byte-identical parquet files.

Rows: `prompt` is the single-agent view (the question plus the `\\boxed{}` instruction); the
discussion workflow builds each agent's own prompts from `extra_info.question`.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_matpo.data.parquet import write_parquet
from megatron_matpo.data.schema import DatasetError, Sample, assign_uids, expand_repeats, sample_from_row
from megatron_matpo.maporl.prompts import first_round_prompt

OPS = ("add", "sub", "mul", "div")
_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Iris", "Tom", "Nina", "Sam")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "shells", "stamps", "cards")
_TEMPLATES = {
    "add": ("{n} buys {k} more {it}.", "{n} finds {k} {it}.", "A friend gives {n} {k} {it}."),
    "sub": ("{n} gives {k} {it} to a neighbour.", "{n} loses {k} {it}.", "{n} sells {k} {it}."),
    "mul": ("Then {n} gets enough {it} to have {k} times as many as before.",
            "After a lucky week, {n} has {k} times as many {it} as before."),
    "div": ("{n} splits the {it} equally into {k} bags and keeps only one bag.",
            "{n} shares the {it} equally among {k} children and keeps one child's share."),
}
MAX_VALUE = 100_000  # keeps intermediate values readable


@dataclass(frozen=True)
class ArithmeticConfig:
    seed: int = 0
    n_train: int = 512
    n_val: int = 64
    val_repeat: int = 1
    min_ops: int = 2
    max_ops: int = 4
    operand_min: int = 2          # start amount and add/sub operands lie in [operand_min, operand_max]
    operand_max: int = 50
    max_factor: int = 5           # mul/div factors lie in [2, max_factor]
    ops: tuple[str, ...] = OPS
    name: str = "arithmetic"      # configs maporl_train_<name>, maporl_val_<name>[_repeat_<k>]

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.operand_min <= self.operand_max:
            raise ValueError(f"need 1 <= operand_min <= operand_max, got {self.operand_min}, {self.operand_max}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if "add" not in self.ops and "mul" not in self.ops:
            # with only sub/div the amount can only shrink: many problems would be unbuildable
            raise ValueError("ops needs 'add' or 'mul'")
        if self.n_train < 1 or self.n_val < 1 or self.val_repeat < 1:
            raise ValueError("n_train, n_val and val_repeat must be >= 1")


@dataclass(frozen=True)
class Step:
    op: str
    operand: int
    before: int
    after: int


@dataclass(frozen=True)
class Problem:
    text: str
    answer: int
    start: int
    steps: tuple[Step, ...]

    @property
    def solution(self) -> str:
        """A GSM8K-style worked solution ending in `#### answer`."""
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
        lines = [f"{s.before} {sym[s.op]} {s.operand} = {s.after}" for s in self.steps]
        return "\n".join(lines + [f"#### {self.answer}"])


def apply_op(op: str, value: int, k: int) -> int:
    if op == "add":
        return value + k
    if op == "sub":
        return value - k
    if op == "mul":
        return value * k
    if op == "div":
        if value % k:
            raise ValueError(f"{value} is not divisible by {k}")
        return value // k
    raise ValueError(f"unknown op {op!r}")


def _operand(op: str, value: int, cfg: ArithmeticConfig, rng: random.Random) -> int | None:
    """A random operand that keeps the value a non-negative integer below MAX_VALUE, or None."""
    if op == "add":
        k = rng.randint(cfg.operand_min, cfg.operand_max)
        return k if value + k <= MAX_VALUE else None
    if op == "sub":
        hi = min(cfg.operand_max, value)
        return rng.randint(cfg.operand_min, hi) if hi >= cfg.operand_min else None
    if op == "mul":
        k = rng.randint(2, cfg.max_factor)
        return k if value * k <= MAX_VALUE else None
    divisors = [k for k in range(2, cfg.max_factor + 1) if value % k == 0]
    return rng.choice(divisors) if divisors and value > 0 else None


def make_problem(cfg: ArithmeticConfig, rng: random.Random) -> Problem | None:
    """One random problem, or None when no allowed operation fits the running value (e.g. only
    'mul' and the value would pass MAX_VALUE); the caller draws again."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = start = rng.randint(cfg.operand_min, cfg.operand_max)
    sentences = [f"{name} has {start} {item}."]
    steps: list[Step] = []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        ops = list(cfg.ops)
        rng.shuffle(ops)
        for op in ops:  # the first op (in random order) that fits the current value
            k = _operand(op, value, cfg, rng)
            if k is not None:
                break
        else:
            return None
        after = apply_op(op, value, k)
        steps.append(Step(op, k, value, after))
        sentences.append(rng.choice(_TEMPLATES[op]).format(n=name, k=k, it=item))
        value = after
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(text=" ".join(sentences), answer=value, start=start, steps=tuple(steps))


def generate(cfg: ArithmeticConfig = ArithmeticConfig()) -> tuple[list[Problem], list[Problem]]:
    """Distinct train and val problems (no question text in both)."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    out: list[Problem] = []
    need = cfg.n_train + cfg.n_val
    attempts = 0
    while len(out) < need:
        attempts += 1
        if attempts > 50 * need + 1000:
            raise ValueError(f"only {len(out)} distinct problems for {need} requested: widen the operand range "
                             "or the number of operations")
        p = make_problem(cfg, rng)
        if p is not None and p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out[:cfg.n_train], out[cfg.n_train:]


# ----- MATPO-data rows -----

def _row(data_source: str, question: str, answer: str, index: int | str, split: str, ability: str,
         question_type: str, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": first_round_prompt(question)}],
        "ability": ability,
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"answer": answer, "question": question, "index": index, "split": split,
                       "need_tools_kwargs": False, "question_type": question_type, "metadata": metadata},
    }


def problem_row(p: Problem, index: int, split: str, data_source: str = "arithmetic") -> dict[str, Any]:
    meta = {"start": p.start, "ops": [s.op for s in p.steps], "operands": [s.operand for s in p.steps],
            "solution": p.solution}
    return _row(data_source, p.text, str(p.answer), index, split, "math", f"{len(p.steps)}ops", meta)


def to_samples(rows: list[dict[str, Any]], where: str, repeat: int = 1) -> list[Sample]:
    samples = assign_uids(sample_from_row(r, where=f"{where} row {i}") for i, r in enumerate(rows))
    return expand_repeats(samples, repeat) if repeat > 1 else samples


def config_names(cfg: ArithmeticConfig) -> dict[str, str]:
    val = f"maporl_val_{cfg.name}_repeat_{cfg.val_repeat}" if cfg.val_repeat > 1 else f"maporl_val_{cfg.name}"
    return {"train": f"maporl_train_{cfg.name}", "val": val}


def write_arithmetic(out_dir: str | Path, cfg: ArithmeticConfig = ArithmeticConfig()) -> dict[str, Path]:
    """maporl_train_<name> and maporl_val_<name>[_repeat_<k>] config folders (one parquet file each)."""
    train, val = generate(cfg)
    names = config_names(cfg)
    out = Path(out_dir)
    written = {}
    for split, problems, repeat in (("train", train, 1), ("val", val, cfg.val_repeat)):
        rows = [problem_row(p, i, split) for i, p in enumerate(problems)]
        written[names[split]] = write_parquet(to_samples(rows, f"{split} problems", repeat),
                                              out / names[split] / "train-00000.parquet")
    return written


# ----- GSM8K and ANLI files -----

def _jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p} line {n}: not JSON: {e}") from e
            if not isinstance(obj, dict):
                raise DatasetError(f"{p} line {n}: expected a JSON object")
            out.append((n, obj))
    if not out:
        raise DatasetError(f"{p}: no rows")
    return out


def _text(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    raise DatasetError(f"{where}: field {'/'.join(keys)}: expected a non-empty string")


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_gold(answer: str) -> str:
    """`... #### 1,234` -> `1234` (GSM8K's final-answer line; thousands separators dropped)."""
    m = _GSM8K_ANSWER.search(answer)
    if not m:
        raise ValueError("no '#### <answer>' line")
    return m.group(1).replace(",", "").replace("$", "").strip()


def read_gsm8k_jsonl(path: str | Path, split: str, data_source: str = "gsm8k") -> list[Sample]:
    """GSM8K's jsonl (`{"question", "answer": "<solution> #### <number>"}`) as MATPO-data samples."""
    rows = []
    for i, (n, obj) in enumerate(_jsonl(path)):
        where = f"{path} line {n}"
        question, answer = _text(obj, ("question",), where), _text(obj, ("answer",), where)
        try:
            gold = gsm8k_gold(answer)
        except ValueError as e:
            raise DatasetError(f"{where}: field answer: {e}") from e
        solution = answer[:answer.rfind("####")].strip()
        rows.append(_row(data_source, question, gold, i, split, "math", "gsm8k", {"solution": solution}))
    return to_samples(rows, str(path))


ANLI_LABELS = ("entailment", "neutral", "contradiction")  # ids 0, 1, 2 as in the HF `anli` dataset
_ANLI_SHORT = {"e": "entailment", "n": "neutral", "c": "contradiction"}


def anli_label(label: Any) -> str:
    if isinstance(label, bool):
        raise ValueError(f"bad label {label!r}")
    if isinstance(label, int):
        if 0 <= label < len(ANLI_LABELS):
            return ANLI_LABELS[label]
    elif isinstance(label, str):
        s = label.strip().lower()
        if s in _ANLI_SHORT:
            return _ANLI_SHORT[s]
        if s in ANLI_LABELS:
            return s
    raise ValueError(f"bad label {label!r}: expected 0/1/2, e/n/c or {'/'.join(ANLI_LABELS)}")


def anli_question(premise: str, hypothesis: str) -> str:
    return (f"Premise: {premise}\nHypothesis: {hypothesis}\n"
            "Does the premise entail the hypothesis, contradict it, or neither? "
            "Answer with one word: entailment, neutral or contradiction.")


def read_anli_jsonl(path: str | Path, split: str, data_source: str = "anli") -> list[Sample]:
    """ANLI jsonl (HF fields premise/hypothesis/label 0-2, or the original context/hypothesis/label
    e/n/c with `uid`) as MATPO-data samples whose gold answer is the label word."""
    rows = []
    for i, (n, obj) in enumerate(_jsonl(path)):
        where = f"{path} line {n}"
        premise = _text(obj, ("premise", "context"), where)
        hypothesis = _text(obj, ("hypothesis",), where)
        try:
            label = anli_label(obj.get("label"))
        except ValueError as e:
            raise DatasetError(f"{where}: field label: {e}") from e
        uid = obj.get("uid")
        index = uid if isinstance(uid, str) and uid else i
        rows.append(_row(data_source, anli_question(premise, hypothesis), label, index, split, "nli", "anli",
                         {"premise": premise, "hypothesis": hypothesis}))
    return to_samples(rows, str(path))


def write_config(samples: list[Sample], out_dir: str | Path, name: str) -> Path:
    """One config folder `<out_dir>/<name>/train-00000.parquet`."""
    return write_parquet(samples, Path(out_dir) / name / "train-00000.parquet")
