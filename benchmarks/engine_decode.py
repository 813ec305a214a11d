"""A CPU SGLang engine's decode throughput with and without our batched torch-native decode
(megatron_matpo/rollout/sglang_plugin.py), both sides in one run on the same engine settings.

Load: `--requests` concurrent requests, each a `--prompt`-token prompt (distinct, so no prefix is
shared) and `--tokens` sampled tokens (ignore_eos), on the tiny Qwen3 of the tests: the shape of the
learnable toy's rollouts (64 requests of ~1k tokens). Each side starts its own engine (the plugin is
switched off with SGLANG_PLUGINS, SGLang's plugin whitelist) and runs the load `--reps` times after a
warm-up; the median wall time is reported, and their ratio.

    .venv/bin/python benchmarks/engine_decode.py [--requests 64] [--prompt 1000] [--tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, bench_env, meta, median, write_result  # noqa: E402


async def load(url: str, prompts: list[list[int]], tokens: int) -> float:
    from megatron_matpo.rollout.engine import EngineClient

    c = EngineClient(url)
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(c.generate(p, {"max_new_tokens": tokens, "temperature": 1.0, "ignore_eos": True})
                               for p in prompts))
        return time.perf_counter() - t0
    finally:
        await c.aclose()


def side(model: str, plugin: bool, prompts: list[list[int]], tokens: int, reps: int) -> list[float]:
    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    old = os.environ.get("SGLANG_PLUGINS")
    if not plugin:
        os.environ["SGLANG_PLUGINS"] = "none"  # a whitelist naming no installed plugin
    try:
        (server,) = launch_engines(EngineConfig(model_path=model, log_dir=str(CACHE / "engine_decode" / "logs")), 1)
    finally:
        if old is None:
            os.environ.pop("SGLANG_PLUGINS", None)
        else:
            os.environ["SGLANG_PLUGINS"] = old
    try:
        asyncio.run(load(server.url, prompts[:4], 4))  # warm-up
        return [asyncio.run(load(server.url, prompts, tokens)) for _ in range(reps)]
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="default: benchmarks/results/engine_decode.json")
    args = ap.parse_args()
    bench_env()
    from megatron_matpo.model.tiny import make_tiny_model, synthetic_corpus, train_tokenizer

    model = CACHE / "engine_decode" / "tiny-qwen3"
    if not (model / "config.json").exists():
        make_tiny_model(model, "qwen3", tokenizer=train_tokenizer(synthetic_corpus()))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(20, vocab) for _ in range(args.prompt)] for _ in range(args.requests)]
    loop = side(str(model), False, prompts, args.tokens, args.reps)
    ours = side(str(model), True, prompts, args.tokens, args.reps)
    steps = args.requests * args.tokens
    res = {"requests": args.requests, "prompt_tokens": args.prompt, "new_tokens": args.tokens,
           "sglang_loop_s": loop, "batched_s": ours, "sglang_loop_median_s": median(loop),
           "batched_median_s": median(ours), "speedup": median(loop) / median(ours),
           "sglang_loop_tokens_per_s": steps / median(loop), "batched_tokens_per_s": steps / median(ours)}
    print(f"{args.requests} requests x ({args.prompt} prompt + {args.tokens} new tokens): SGLang's per-request "
          f"decode loop {median(loop):.2f} s, batched decode {median(ours):.2f} s -> {res['speedup']:.2f}x")
    write_result("engine_decode", {"meta": meta(), **res}, args.json)


if __name__ == "__main__":
    main()
