"""MAPoRL verifiers: a score in [0, 1] for every (agent, round) answer of a discussion.

Three kinds, all `reward.judge.AccuracyScorer`s (`await score(items) -> [AccuracyResult]`):
- `NumericMatchVerifier` (default, offline): the turn's final answer (last `\\boxed{}`, else the
  last number) against the gold answer, numerically within a tolerance, else as normalized text.
- an LLM judge: `reward.judge.LLMJudgeScorer` unchanged (any OpenAI-compatible endpoint).
- `RewardModelVerifier`: a scalar-head reward model served by SGLang (`Qwen3ForRewardModel`,
  `*ForSequenceClassification` with one label, ...). SGLang 0.5.23 serves those as pooled-output
  models (detected from the architecture, or `--is-embedding`) and scores them on
  `POST /classify` with the `/encode` payload: `{"input_ids": [[...], ...]}` in, one
  `{"embedding": [score], "meta_info": {...}}` per input out (a bare object for a single input).
  The conversation (question as the user turn, answer as the assistant turn) is rendered with the
  reward model's own chat template and tokenized here, so the server never re-tokenizes text.
"""
from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from megatron_matpo.maporl.answers import Tolerance, final_answer, matches_any
from megatron_matpo.reward.judge import AccuracyItem, AccuracyResult, AccuracyScorer, JudgeConfig, LLMJudgeScorer


def verifier_input_ids(tok, question: str, response: str, enable_thinking: bool | None = None) -> list[int]:
    """A reward model's token ids for one answer: its chat template over the user question and the
    assistant response (no generation prompt: the last token closes the answer; its score is the
    model's). What `matpo train-verifier` trains on and what is served are the same ids."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": response}],
                                   tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]


class NumericMatchVerifier:
    """1.0 when the final answer equals a gold alias (numbers within `tol`), else 0.0."""

    def __init__(self, tol: Tolerance = Tolerance()) -> None:
        self.tol = tol
        self._sums: Counter[str] = Counter()

    async def score(self, items: Sequence[AccuracyItem]) -> list[AccuracyResult]:
        return [self.score_one(it) for it in items]

    def score_one(self, item: AccuracyItem) -> AccuracyResult:
        pred = final_answer(item.response)
        ok = float(matches_any(pred, item.gold, self.tol))
        self._sums.update({"count": 1, "correct": ok, "no_answer": int(pred is None)})
        return AccuracyResult(ok, pred, {"em": ok})

    def pop_metrics(self) -> dict[str, float]:
        n = self._sums["count"]
        out = {"verifier/no_answer": float(self._sums["no_answer"])}
        if n:
            out["verifier/accuracy"] = self._sums["correct"] / n
        self._sums.clear()
        return out


@dataclass
class RewardModelConfig:
    url: str = ""                     # the SGLang server, e.g. http://host:port (no /v1)
    tokenizer_path: str = ""          # the reward model's tokenizer (chat template included); default model_path
    # an HF score model (`matpo train-verifier` writes one) that the trainer serves on its own SGLang engine
    # when `url` is empty
    model_path: str = ""
    squash: str = "sigmoid"           # "sigmoid": logit -> probability of correct; "none": raw score
    batch_size: int = 32              # inputs per /classify request
    max_concurrency: int = 4          # requests in flight
    timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 0.5
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        self.tokenizer_path = self.tokenizer_path or self.model_path
        if not self.url and not self.model_path:
            raise ValueError("RewardModelConfig: give the server's url or the model_path the trainer serves")
        if not self.tokenizer_path:
            raise ValueError("RewardModelConfig: tokenizer_path (the reward model's tokenizer) is required with url")
        if self.squash not in ("sigmoid", "none"):
            raise ValueError(f"RewardModelConfig.squash must be 'sigmoid' or 'none', got {self.squash!r}")
        if self.batch_size < 1 or self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError("RewardModelConfig: batch_size and max_concurrency >= 1, max_retries >= 0")


class RewardModelError(RuntimeError):
    pass


class RewardModelVerifier:
    """Scores (question, answer) conversations with a scalar-head reward model on SGLang /classify."""

    def __init__(self, config: RewardModelConfig, tokenizer=None) -> None:
        self.config = config
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        self.tok = tokenizer
        self._counts: Counter[str] = Counter()

    def input_ids(self, item: AccuracyItem) -> list[int]:
        return verifier_input_ids(self.tok, item.question, item.response, self.config.enable_thinking)

    async def score(self, items: Sequence[AccuracyItem]) -> list[AccuracyResult]:
        cfg = self.config
        ids = [self.input_ids(it) for it in items]
        chunks = [list(range(i, min(i + cfg.batch_size, len(ids)))) for i in range(0, len(ids), cfg.batch_size)]
        sem = asyncio.Semaphore(cfg.max_concurrency)
        raw: list[float] = [0.0] * len(ids)
        async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s)) as client:
            async def run(chunk: list[int]) -> None:
                async with sem:
                    scores = await self._classify(client, [ids[i] for i in chunk])
                for i, s in zip(chunk, scores):
                    raw[i] = s

            await asyncio.gather(*(run(c) for c in chunks))
        out = []
        for it, r in zip(items, raw):
            s = 1.0 / (1.0 + math.exp(-r)) if cfg.squash == "sigmoid" else r
            out.append(AccuracyResult(s, final_answer(it.response), {"rm_score": r}))
        self._counts["rm_scored"] += len(out)
        return out

    async def _classify(self, client: httpx.AsyncClient, batch: list[list[int]]) -> list[float]:
        cfg = self.config
        url = cfg.url.rstrip("/") + "/classify"
        last = "no attempt"
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self._counts["rm_retries"] += 1
                await asyncio.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            self._counts["rm_calls"] += 1
            try:
                r = await client.post(url, json={"input_ids": batch})
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 200:
                return _parse_classify(r.json(), len(batch), url)
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code < 500 and r.status_code != 429:
                break  # a bad request stays bad
        raise RewardModelError(f"reward model request to {url} failed: {last}")

    def pop_metrics(self) -> dict[str, float]:
        out = {f"verifier/{k}": float(self._counts[k]) for k in ("rm_calls", "rm_retries", "rm_scored")}
        self._counts.clear()
        return out


def _parse_classify(body: Any, n: int, url: str) -> list[float]:
    entries = body if isinstance(body, list) else [body]
    if len(entries) != n:
        raise RewardModelError(f"{url} returned {len(entries)} results for {n} inputs")
    out = []
    for e in entries:
        emb = e.get("embedding") if isinstance(e, dict) else None
        if not isinstance(emb, list) or len(emb) != 1:
            # a multi-label classifier or an embedding model is not a scalar reward model
            raise RewardModelError(f"{url} returned {emb!r:.80} where a scalar reward model returns [score]")
        out.append(float(emb[0]))
    return out


@dataclass
class VerifierConfig:
    kind: str = "numeric"             # numeric | judge | reward_model
    rel_tol: float = 1e-6
    abs_tol: float = 1e-6
    judge: dict[str, Any] = field(default_factory=dict)          # JudgeConfig fields
    reward_model: dict[str, Any] = field(default_factory=dict)   # RewardModelConfig fields
    # kind=reward_model with a model_path that does not exist yet: `matpo train-verifier` builds it first
    # (VerifierTrainConfig fields; unset ones come from the run: the policy's model, a sampling pass on the
    # run's data with its discussion; run_dir is model_path's parent)
    train: dict[str, Any] | None = None
    # the SGLang engine the trainer serves `reward_model.model_path` on (EngineSection fields)
    engine: dict[str, Any] = field(default_factory=lambda: {"mem_fraction_static": 0.5, "max_total_tokens": 65536})

    def served_model(self) -> str | None:
        """The score model the trainer starts an engine for (kind=reward_model without a url), else None."""
        rm = self.reward_model
        return rm.get("model_path") or None if self.kind == "reward_model" and not rm.get("url") else None

    def validate(self, prefix: str = "maporl.verifier") -> None:
        """Every field, before any process starts (one ValueError naming the field)."""
        if self.kind not in ("numeric", "judge", "reward_model"):
            raise ValueError(f"{prefix}.kind: {self.kind!r}: expected 'numeric', 'judge' or 'reward_model'")
        for kind, cls, fields in (("judge", JudgeConfig, self.judge), ("reward_model", RewardModelConfig,
                                                                       self.reward_model)):
            if self.kind == kind:
                try:
                    cls(**fields)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{prefix}.{kind}: {e}") from None
        if self.train is not None and not self.served_model():
            raise ValueError(f"{prefix}.train: trains the model the run serves: needs kind=reward_model with "
                             "reward_model.model_path (and no url)")


def make_verifier(cfg: VerifierConfig) -> AccuracyScorer:
    if cfg.kind == "numeric":
        return NumericMatchVerifier(Tolerance(cfg.rel_tol, cfg.abs_tol))
    if cfg.kind == "judge":
        return LLMJudgeScorer(JudgeConfig(**cfg.judge))
    if cfg.kind == "reward_model":
        return RewardModelVerifier(RewardModelConfig(**cfg.reward_model))
    raise ValueError(f"verifier kind {cfg.kind!r}: expected 'numeric', 'judge' or 'reward_model'")
