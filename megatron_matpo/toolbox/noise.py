"""Optional noise on tool outputs, to train and test robustness to imperfect tools.

Three perturbations, each applied with its own probability: truncate a scraped page, shuffle the
order of search results, and insert distractor results (random corpus pages, or results seen for
other queries). Randomness is derived from (seed, kind, key, salt) rather than from call order, so
the same call is perturbed the same way however many calls run concurrently (distractors drawn from
the pool of earlier results naturally depend on which calls came before; a corpus source does not).
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (rng, k, links to exclude) -> up to k organic-shaped results without positions
DistractorSource = Callable[[random.Random, int, set[str]], list[dict[str, Any]]]


@dataclass
class NoiseConfig:
    seed: int = 0
    truncate_prob: float = 0.0
    truncate_min_frac: float = 0.2      # keep between min and max fraction of the text
    truncate_max_frac: float = 0.8
    shuffle_prob: float = 0.0
    distractor_prob: float = 0.0
    num_distractors: int = 2
    pool_size: int = 512                # recent results kept as distractors when no corpus

    def __post_init__(self) -> None:
        for name in ("truncate_prob", "shuffle_prob", "distractor_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"NoiseConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.truncate_min_frac <= self.truncate_max_frac <= 1.0:
            raise ValueError("NoiseConfig needs 0 <= truncate_min_frac <= truncate_max_frac <= 1")

    @property
    def enabled(self) -> bool:
        return self.truncate_prob > 0 or self.shuffle_prob > 0 or self.distractor_prob > 0


class NoiseInjector:
    def __init__(self, cfg: NoiseConfig, distractor_source: DistractorSource | None = None) -> None:
        self.cfg = cfg
        self._source = distractor_source
        self._pool: deque[dict[str, Any]] = deque(maxlen=cfg.pool_size)

    def _rng(self, kind: str, key: str, salt: str) -> random.Random:
        # str seeds hash deterministically (sha512) across processes, unlike hash().
        return random.Random(f"{self.cfg.seed}|{kind}|{key}|{salt}")

    def perturb_text(self, text: str, key: str = "", salt: str = "") -> str:
        """Maybe cut the text to a random fraction of its length (marked, so it is visible)."""
        rng = self._rng("truncate", key, salt)
        if not text or rng.random() >= self.cfg.truncate_prob:
            return text
        keep = int(len(text) * rng.uniform(self.cfg.truncate_min_frac, self.cfg.truncate_max_frac))
        return text[:keep] + "\n[... content truncated]"

    def perturb_results(self, results: list[dict[str, Any]], key: str = "",
                        salt: str = "") -> list[dict[str, Any]]:
        """Maybe shuffle, maybe add distractors; positions renumbered 1..n. Input not modified."""
        out = [dict(r) for r in results]
        links = {str(r.get("link", "")) for r in out}
        rng = self._rng("shuffle", key, salt)
        if len(out) > 1 and rng.random() < self.cfg.shuffle_prob:
            rng.shuffle(out)
        rng = self._rng("distract", key, salt)
        if self.cfg.num_distractors > 0 and rng.random() < self.cfg.distractor_prob:
            for d in self._distractors(rng, links):
                out.insert(rng.randint(0, len(out)), dict(d))  # unmarked: the model must judge
        self._remember(results)
        for i, r in enumerate(out, 1):
            r["position"] = i
        return out

    def _distractors(self, rng: random.Random, exclude: set[str]) -> list[dict[str, Any]]:
        k = self.cfg.num_distractors
        if self._source is not None:
            return self._source(rng, k, set(exclude))[:k]
        candidates = [r for r in self._pool if str(r.get("link", "")) not in exclude]
        unique = list({str(r.get("link", "")): r for r in candidates}.values())
        return rng.sample(unique, min(k, len(unique)))

    def _remember(self, results: list[dict[str, Any]]) -> None:
        if self._source is None:
            self._pool.extend({k: v for k, v in r.items() if k != "position"} for r in results)
