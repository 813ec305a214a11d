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



def test_batched_decode_plugin_equals_sglangs_loop():
    """Our SGLang plugin (megatron_matpo/rollout/sglang_plugin.py), loaded the way SGLang's processes load
    it (entry point + load_plugins), replaces the torch-native backend's per-request decode loop; on a
    ragged batch with GQA it returns what SGLang's own loop returns."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.plugins import load_plugins

    from megatron_matpo.rollout import sglang_plugin

    load_plugins()
    patched = TorchNativeAttnBackend._run_sdpa_forward_decode
    assert getattr(patched, "__wrapped__", None) is not None, "the plugin's hook was not applied"
    sglang_loop = patched.__wrapped__
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 130, 1, 64, 77], dtype=torch.int32)
    heads, kv_heads, dim, pool = 4, 2, 16, 600
    k_cache, v_cache = (torch.randn(pool, kv_heads, dim, generator=g) for _ in range(2))
    req_to_token = torch.randint(1, pool, (8, 256), generator=g, dtype=torch.int32)
    req_pool_indices = torch.tensor([3, 0, 7, 5, 1])
    query = torch.randn(len(lens), heads, dim, generator=g)
    args = (k_cache, v_cache, req_to_token, req_pool_indices, lens, None)
    kw = dict(scaling=0.25, enable_gqa=True, causal=False, is_cross_attn=False, sliding_window_size=None)
    ours, ref = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    sglang_plugin.batched_decode(sglang_loop, None, query, ours, *args, **kw)
    sglang_loop(None, query, ref, *args, **kw)
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()
    # what SGLang's processes call goes through the plugin
    called = torch.full_like(query, float("nan"))
    patched(None, query, called, *args, **kw)
    assert torch.equal(called, ours)
