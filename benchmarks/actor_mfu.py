"""Actor forward+backward throughput and MFU on Qwen3-14B-shaped layers: packed THD vs padded BSHD,
side by side in one run on the same sequences. Prints one JSON line per variant and the ratio.

    python benchmarks/actor_mfu.py --model configs/models/qwen3-14b --layers 4 --tokens 16384
On CPU use a tiny model: --model <tiny dir> --layers 4 --tokens 2048 --dtype fp32.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A800": 312.0, "A100": 312.0}  # dense bf16


def long_tailed_lengths(total: int, max_len: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(max(16, min(max_len, int(rng.paretovariate(1.2) * max_len / 16))))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def train_flops(cfg, lens: list[int]) -> float:
    """fwd+bwd FLOPs (3× forward) of dense matmuls + causal attention, for real tokens only."""
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    d = getattr(cfg, "head_dim", h // cfg.num_attention_heads)
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_token_params = L * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size) + h * V
    tokens = sum(lens)
    attn = sum(L * 2 * n * n * q for n in lens)  # QK^T and AV, causal half: 2·(2·n²·q)/2
    return 3 * (2 * per_token_params * tokens + attn)


def worker(model_dir: str, dtype_name: str, lens: list[int], iters: int, mbs: int) -> dict:
    from megatron_matpo import platform
    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model, load_hf_config
    from megatron_matpo.model.forward import pack_sequences, pad_sequences, run_schedule
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    layout = ParallelLayout()
    init_megatron(layout)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    built = build_model(model_dir, layout, load_weights=False, dtype=dtype, seq_length=max(lens),
                        ddp_config=ddp_config(OptimConfig()))
    cfg = load_hf_config(model_dir)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    dev = platform.device()
    sync = torch.cuda.synchronize if platform.capabilities().cuda else (lambda: None)

    def loss(out, mb):
        return out.float().mean(), {}

    results = {}
    # padded baseline: micro-batches of `mbs` sequences, each padded to its own longest
    padded = [pad_sequences(seqs[i:i + mbs]) for i in range(0, len(seqs), mbs)]
    for name, mbs_list in (("packed_thd", [pack_sequences(seqs)]), ("padded_bshd", padded)):
        times = []
        for i in range(iters + 1):  # first iteration warms up kernels/allocator
            for c in built.chunks:
                c.zero_grad_buffer()
            sync()
            t0 = time.perf_counter()
            run_schedule(built.chunks, mbs_list, loss, forward_only=False, device=dev)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        if platform.capabilities().cuda:
            torch.cuda.empty_cache()
        t = sorted(times)[len(times) // 2]
        flops = train_flops(cfg, lens)
        results[name] = {"step_s": t, "real_tokens_per_s": sum(lens) / t, "tflops": flops / t / 1e12,
                         "slots": sum(int(m.input_ids.numel()) for m in mbs_list)}
    results["device"] = platform.capabilities().device_name
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/qwen3-14b", help="HF config directory")
    ap.add_argument("--layers", type=int, default=4, help="keep the shape, cut the depth")
    ap.add_argument("--tokens", type=int, default=16384, help="real tokens per step")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mbs", type=int, default=4, help="sequences per padded micro-batch")
    args = ap.parse_args()
    from megatron_matpo.dist import launch_local

    tmp = Path(tempfile.mkdtemp())
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    cfg["num_hidden_layers"] = args.layers
    (tmp / "config.json").write_text(json.dumps(cfg))
    lens = long_tailed_lengths(args.tokens, args.max_len)
    try:
        res = launch_local(worker, 1, str(tmp), args.dtype, lens, args.iters, args.mbs)
    finally:
        shutil.rmtree(tmp)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in res["device"]), None)
    for name in ("packed_thd", "padded_bshd"):
        r = res[name]
        r["mfu"] = r["tflops"] / peak if peak else None
        print(json.dumps({"variant": name, "device": res["device"], "layers": args.layers,
                          "seqs": len(lens), "real_tokens": sum(lens), **r}))
    ratio = res["padded_bshd"]["step_s"] / res["packed_thd"]["step_s"]
    print(json.dumps({"speedup_packed_over_padded": ratio}))


if __name__ == "__main__":
    main()
