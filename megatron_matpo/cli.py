"""`matpo` command line. Subcommands: `demo` (the embedded default), `convert`, `make-tiny`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_WORK_DIR = Path(os.environ.get("MATPO_WORK_DIR", "runs"))


def _quiet_libraries() -> None:
    from megatron_matpo.dist import quiet_known_noise

    quiet_known_noise()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _layout(args):
    from megatron_matpo.model.layout import ParallelLayout

    return ParallelLayout(tp=args.tp, pp=args.pp)


def cmd_make_tiny(args) -> int:
    from megatron_matpo.model.tiny import make_tiny_model

    path = make_tiny_model(args.out, args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0


def cmd_convert(args) -> int:
    from megatron_matpo import convert

    t0 = time.time()
    if args.direction == "hf-to-megatron":
        out = convert.hf_to_megatron(args.src, args.out, _layout(args))
    else:
        out = convert.megatron_to_hf(args.src, args.out, _layout(args))
    print(f"{args.direction}: {args.src} -> {out} (tp={args.tp}, pp={args.pp}) in {time.time() - t0:.1f}s")
    return 0


def cmd_demo(args) -> int:
    """Embedded default until the RL loop lands: tiny Qwen3 → Megatron TP2×PP2 → HF, verified."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_matpo import convert
    from megatron_matpo.model.layout import ParallelLayout
    from megatron_matpo.model.tiny import make_tiny_model

    work = Path(args.work_dir) / "demo"
    layout = ParallelLayout(tp=2, pp=2)
    steps = ["build tiny Qwen3", f"HF -> Megatron (tp={layout.tp}, pp={layout.pp})",
             "Megatron -> HF", "verify tensors and logits"]
    say = lambda i: print(f"[{i + 1}/{len(steps)}] {steps[i]}", flush=True)  # noqa: E731
    say(0)
    hf = make_tiny_model(work / "tiny-qwen3", "qwen3")
    say(1)
    convert.hf_to_megatron(hf, work / "megatron", layout)
    say(2)
    back = convert.megatron_to_hf(work / "megatron", work / "hf-export", layout)
    say(3)
    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    exact = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l1 = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
        l2 = AutoModelForCausalLM.from_pretrained(back).eval()(ids).logits
    diff = (l1 - l2).abs().max().item()
    print(f"round trip: {len(a)} tensors bit-exact={exact}; max logit diff={diff:.3g}; exported to {back}")
    return 0 if exact and diff == 0.0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matpo", description="Multi-agent tool-integrated RL on Megatron-core")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="embedded default: tiny Qwen3 HF -> Megatron TP2xPP2 -> HF, verified")
    d.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="HF <-> Megatron distributed checkpoint, any TP x PP")
    c.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    c.add_argument("src", help="HF model dir (hf-to-megatron) or megatron-matpo checkpoint dir")
    c.add_argument("out", help="output directory")
    c.add_argument("--tp", type=int, default=1, help="tensor parallel size of the converting world")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the converting world")
    c.set_defaults(fn=cmd_convert)

    t = sub.add_parser("make-tiny", help="write a tiny random-init HF model with a small tokenizer")
    t.add_argument("out")
    t.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_make_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from megatron_matpo.model.builder import UnsupportedArchitecture
    from megatron_matpo.model.layout import LayoutError

    try:
        return args.fn(args)
    except (LayoutError, UnsupportedArchitecture, FileNotFoundError) as e:
        print(f"matpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
