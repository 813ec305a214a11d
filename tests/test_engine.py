"""A real SGLang server on the tiny model: greedy output and logprobs equal transformers'; the router
spreads concurrent requests."""
from __future__ import annotations

import asyncio
from pathlib import Path

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
    # the engine imported only the model classes we serve (compat.sglang_engine_env), not SGLang's ~260:
    # loading the whole registry logs each model module that fails to import on this host
    log = (Path(engine.cfg.log_dir) / f"engine-{engine.port}.log").read_text()
    assert "Ignore import error when loading sglang.srt.models." not in log, log[-2000:]


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


def test_a_request_on_a_connection_the_server_just_closed_is_sent_again():
    """A local HTTP/1.1 server that answers the first request on a connection (keep-alive) and closes
    the connection on reading the second, without answering, as uvicorn does at its keep-alive
    timeout: the client's second request fails on the stale connection and goes out once more on a
    fresh one. Three connections would mean a second retry; one request reaching no server is an error."""
    import json

    body = json.dumps({"output_ids": [7], "meta_info": {"output_token_logprobs": [[-0.5, 7, None]],
                                                        "finish_reason": {"type": "stop"}, "prompt_tokens": 2}})
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            if served == 1 and len(connections) == 1:  # the stale connection: closed, nothing answered
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
            await writer.drain()
            served += 1

    async def run():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = EngineClient(f"http://127.0.0.1:{port}")
        try:
            first = await c.generate([1, 2], {})
            second = await c.generate([1, 2], {})  # on the pooled connection, which the server closes
            return first, second
        finally:
            await c.aclose()
            server.close()

    first, second = asyncio.run(run())
    assert first.output_ids == second.output_ids == [7] and second.logprobs == [-0.5]
    assert len(connections) == 2  # the first connection (answered, then closed) and the retry's
