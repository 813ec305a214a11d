"""Accuracy scorers for a final response: offline exact match, or an LLM judge (MATPO's choice).

Both take the response's last `\\boxed{}` as the prediction. An LLM judge is any OpenAI-compatible
`POST {base_url}/chat/completions` endpoint (base_url includes the `/v1`, as in the OpenAI SDK);
it answers one letter: A = CORRECT (1.0), B = INCORRECT, C = NOT_ATTEMPTED (0.0).
"""
from __future__ import annotations

import asyncio
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from megatron_matpo.reward.answer import exact_match, extract_boxed, f1


@dataclass(frozen=True)
class AccuracyItem:
    question: str
    gold: str | Sequence[str]   # one answer or a list of accepted aliases
    response: str               # the planner's (or single agent's) final message


@dataclass(frozen=True)
class AccuracyResult:
    score: float                # the accuracy term of the reward, in [0, 1]
    pred: str | None            # the extracted boxed answer
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class AccuracyScorer(Protocol):
    async def score(self, items: Sequence[AccuracyItem]) -> list[AccuracyResult]: ...

    def pop_metrics(self) -> dict[str, float]:
        """Counters since the last call (for per-step logging), then reset."""
        ...


def _has_answer(pred: str | None) -> bool:
    return pred is not None and bool(pred.strip())


class ExactMatchScorer:
    """Offline default: exact match of the boxed answer (SQuAD-normalized); token F1 reported."""

    def __init__(self) -> None:
        self._sums: Counter[str] = Counter()

    async def score(self, items: Sequence[AccuracyItem]) -> list[AccuracyResult]:
        return [self.score_one(it) for it in items]

    def score_one(self, item: AccuracyItem) -> AccuracyResult:
        pred = extract_boxed(item.response)
        em, tf1 = exact_match(pred, item.gold), f1(pred, item.gold)
        self._sums.update({"count": 1, "em": em, "f1": tf1, "no_answer": int(not _has_answer(pred))})
        return AccuracyResult(em, pred, {"em": em, "f1": tf1})

    def pop_metrics(self) -> dict[str, float]:
        n = self._sums["count"]
        out = {"acc/no_answer": float(self._sums["no_answer"])}
        if n:
            out |= {"acc/em_mean": self._sums["em"] / n, "acc/f1_mean": self._sums["f1"] / n}
        self._sums.clear()
        return out


# Our own grading prompt, in the spirit of SimpleQA's grader: three grades, one letter out.
GRADER_TEMPLATE = """You grade answers to factual questions. You get a question, its gold target \
(the reference answer) and a predicted answer. Pick exactly one grade:

A) CORRECT: the predicted answer carries the meaning of the gold target and says nothing that \
contradicts it. Wording, capitalization, punctuation, word order and extra correct detail do not \
matter; a hedged answer counts if it commits to the right answer. A number is correct when it \
agrees with the gold target to the precision the gold target gives.
B) INCORRECT: the predicted answer commits to something that contradicts the gold target, even \
with hedging, or offers several candidates without settling on the right one.
C) NOT_ATTEMPTED: the predicted answer gives no answer (it is empty, says it does not know, or \
asks for more information) and does not contradict the gold target.

Grade against the gold target only; do not overrule it with your own knowledge. When the gold \
target lists alternatives separated by " OR ", matching any one of them is enough.

Examples.
Question: Which river flows through Vienna? Gold target: Danube
- "The Danube (Donau)." -> A
- "I am fairly sure it is the Rhine." -> B
- "I could not find this in the sources." -> C
Question: How many moons does Mars have? Gold target: 2
- "Two: Phobos and Deimos." -> A
- "Either 2 or 3." -> B

Now grade this one.
Question: {question}
Gold target: {target}
Predicted answer: {predicted}

Reply with one letter, A, B or C, and nothing else."""

GRADE_SCORES = {"A": 1.0, "B": 0.0, "C": 0.0}
_GRADE = re.compile(r"^[\W_]*([ABC])(?![A-Za-z])")


def parse_grade(content: str | None) -> str | None:
    """'A' / 'B' / 'C' from the judge's reply ('A', ' B.', '(C)'...), None when unparseable."""
    if not content:
        return None
    m = _GRADE.match(content.strip())
    return m.group(1) if m else None


def _env(*names: str, default: str | None = None) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), default)


@dataclass
class JudgeConfig:
    base_url: str = field(default_factory=lambda: _env("MATPO_JUDGE_BASE_URL", default="https://api.openai.com/v1"))
    model: str = field(default_factory=lambda: _env("MATPO_JUDGE_MODEL", default="gpt-4o-mini"))
    api_key: str | None = field(default_factory=lambda: _env("MATPO_JUDGE_API_KEY", "OPENAI_API_KEY"))
    max_tokens: int = 2
    temperature: float = 0.0
    timeout_s: float = 30.0          # per attempt
    max_retries: int = 4             # attempts = 1 + max_retries
    backoff_s: float = 1.0           # first retry delay; doubles each retry (with jitter)
    max_backoff_s: float = 30.0
    max_concurrency: int = 32        # requests in flight at once, per `score` call
    fail_open: bool = False          # after the last retry: False raises JudgeError, True scores 0.0

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError("JudgeConfig needs base_url and model (or MATPO_JUDGE_BASE_URL / MATPO_JUDGE_MODEL)")
        if self.max_retries < 0 or self.max_concurrency < 1 or self.timeout_s <= 0:
            raise ValueError(f"bad JudgeConfig: max_retries={self.max_retries} "
                             f"max_concurrency={self.max_concurrency} timeout_s={self.timeout_s}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class JudgeError(RuntimeError):
    pass


_RETRY_STATUS = {408, 409, 425, 429}


class LLMJudgeScorer:
    """Accuracy from an LLM judge. Responses without a boxed answer are NOT_ATTEMPTED without a call."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        self.config = config or JudgeConfig()
        self._counts: Counter[str] = Counter()

    def build_messages(self, question: str, gold: str | Sequence[str], pred: str) -> list[dict[str, str]]:
        target = gold if isinstance(gold, str) else " OR ".join(str(g) for g in gold)
        prompt = GRADER_TEMPLATE.format(question=question, target=target, predicted=pred)
        return [{"role": "user", "content": prompt}]

    async def score(self, items: Sequence[AccuracyItem]) -> list[AccuracyResult]:
        # One client per call: httpx pools are bound to the event loop that uses them.
        cfg = self.config
        sem = asyncio.Semaphore(cfg.max_concurrency)
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
            # let every request finish before the client closes; then surface the first failure
            out = await asyncio.gather(*(self._score_one(client, sem, it) for it in items), return_exceptions=True)
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return list(out)  # type: ignore[arg-type]

    async def _score_one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore,
                         item: AccuracyItem) -> AccuracyResult:
        pred = extract_boxed(item.response)
        if not _has_answer(pred):
            self._counts["no_answer"] += 1
            return AccuracyResult(0.0, pred, {"grade": "C", "judged": False})
        try:
            content = await self._complete(client, sem, self.build_messages(item.question, item.gold, pred))
        except JudgeError as e:
            self._counts["judge_failures"] += 1
            if not self.config.fail_open:
                raise
            return AccuracyResult(0.0, pred, {"grade": None, "judged": False, "error": str(e)})
        grade = parse_grade(content)
        if grade is None:
            self._counts["judge_parse_errors"] += 1
            return AccuracyResult(0.0, pred, {"grade": None, "judged": True, "raw": content})
        self._counts[f"judge_grade_{grade}"] += 1
        return AccuracyResult(GRADE_SCORES[grade], pred, {"grade": grade, "judged": True})

    async def _complete(self, client: httpx.AsyncClient, sem: asyncio.Semaphore,
                        messages: list[dict[str, str]]) -> str | None:
        cfg = self.config
        payload = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                   "temperature": cfg.temperature}
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        last = "no attempt"
        retry_after: str | None = None  # the server's Retry-After, honoured for the next delay
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self._counts["judge_retries"] += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
                retry_after = None
            async with sem:  # not held while backing off
                self._counts["judge_calls"] += 1
                try:
                    r = await client.post(cfg.url, json=payload, headers=headers)
                except httpx.TransportError as e:  # connection errors and timeouts
                    last = f"{type(e).__name__}: {e}"
                    continue
            if r.status_code == 200:
                try:
                    return r.json()["choices"][0]["message"]["content"]
                except Exception:  # a 200 we cannot read: counted as a parse error by the caller
                    return None
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code not in _RETRY_STATUS and r.status_code < 500:
                raise JudgeError(f"judge request to {cfg.url} failed: {last}")
            retry_after = r.headers.get("retry-after")
        raise JudgeError(f"judge request to {cfg.url} failed after {cfg.max_retries + 1} attempts: {last}")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        cfg = self.config
        try:
            if retry_after is not None:
                return min(float(retry_after), cfg.max_backoff_s)
        except ValueError:
            pass  # an HTTP-date: fall back to our own schedule
        return min(cfg.backoff_s * 2 ** (attempt - 1), cfg.max_backoff_s) * random.uniform(0.5, 1.0)

    def pop_metrics(self) -> dict[str, float]:
        keys = ("judge_calls", "judge_retries", "judge_failures", "judge_parse_errors",
                "judge_grade_A", "judge_grade_B", "judge_grade_C", "no_answer")
        out = {f"acc/{k}": float(self._counts[k]) for k in keys}
        self._counts.clear()
        return out
