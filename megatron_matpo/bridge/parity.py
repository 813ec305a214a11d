"""After a sync the engine must score tokens as the actor does: engine prefill logprobs vs the
actor's own logprobs on the same sequences. A gap means a wrong name mapping, a stale or partial
update, or a numerics mismatch (dtype, kernels) that biases the importance ratios of RL."""
from __future__ import annotations

import asyncio
from typing import Sequence

from megatron_matpo.rollout.engine import EngineClient


def logprob_gap(engine_logprobs: Sequence[Sequence[float | None]],
                actor_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """max / mean |engine − actor| over positions ≥ 1 of every row (position 0 predicts nothing).
    Row convention: entry j is log p(token j | tokens < j)."""
    if len(engine_logprobs) != len(actor_logprobs):
        raise ValueError(f"{len(engine_logprobs)} engine rows vs {len(actor_logprobs)} actor rows")
    diffs: list[float] = []
    for i, (e, a) in enumerate(zip(engine_logprobs, actor_logprobs)):
        if len(e) != len(a):
            raise ValueError(f"row {i}: {len(e)} engine logprobs vs {len(a)} actor logprobs")
        diffs += [abs(float(x) - float(y)) for x, y in list(zip(e, a))[1:]]
    if not diffs:
        raise ValueError("no position >= 1 to compare: every row has fewer than 2 tokens")
    return {"max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs), "tokens": float(len(diffs))}


async def engine_logprobs(engine: EngineClient | str, rows_token_ids: Sequence[Sequence[int]]
                          ) -> list[list[float | None]]:
    """The engine's prefill logprobs of every row (concurrently)."""
    client = engine if isinstance(engine, EngineClient) else EngineClient(engine)
    try:
        return list(await asyncio.gather(*(client.prompt_logprobs(list(map(int, r))) for r in rows_token_ids)))
    finally:
        if client is not engine:
            await client.aclose()


async def engine_parity(engine: EngineClient | str, rows_token_ids: Sequence[Sequence[int]],
                        actor_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """`logprob_gap` between the engine at `engine` (client or url) and the actor's logprobs of
    `rows_token_ids` (row convention; entry 0 ignored)."""
    return logprob_gap(await engine_logprobs(engine, rows_token_ids), actor_logprobs)
