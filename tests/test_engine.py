"""A real SGLang server on the tiny model: greedy output and logprobs equal transformers'; the router
spreads concurrent requests."""
from __future__ import annotations

import asyncio

import pytest
import torch

from megatron_matpo.rollout.engine import EngineClient, EngineRouter

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 99, 250, 3], [700, 12, 41], list(range(100, 140))]


def test_greedy_ids_and_logprobs_match_transformers(engine, tiny_models):
    from transformers import AutoModelForCausalLM

    async def run():
        c = EngineClient(engine.url)
        try:
            return await asyncio.gather(*(c.generate(p, {"max_new_tokens": 12, "temperature": 0.0,
                                                          "ignore_eos": True}) for p in PROMPTS))
        finally:
            await c.aclose()

    gens = asyncio.run(run())
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()
    for prompt, g in zip(PROMPTS, gens):
        ids = torch.tensor([prompt + g.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        n = len(prompt)
        ref_greedy = logp[n - 1:-1].argmax(-1).tolist()
        assert g.output_ids == ref_greedy  # each engine token is transformers' argmax given the prefix
        ref_lp = logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]
        assert torch.allclose(torch.tensor(g.logprobs), ref_lp, atol=1e-4), (g.logprobs, ref_lp)
        assert g.finish_reason == "length" and g.prompt_tokens == n


def test_router_balances_in_flight(engine):
    async def run():
        clients = [EngineClient(engine.url), EngineClient(engine.url)]
        router = EngineRouter(clients)
        try:
            await asyncio.gather(*(router.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 1.0})
                                   for _ in range(16)))
        finally:
            await router.aclose()
        return router.assigned

    assigned = asyncio.run(run())
    assert sum(assigned) == 16 and abs(assigned[0] - assigned[1]) <= 1

