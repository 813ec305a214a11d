#!/usr/bin/env python
"""Tiny random-init (fixed seed) Qwen3/Qwen2/Llama HF directory with a small ChatML tokenizer
carrying the Qwen3 special tokens (same as `matpo make-tiny`).

    python tools/make_tiny_model.py runs/tiny-qwen3 --arch qwen3
"""
import sys

from megatron_matpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-tiny", *sys.argv[1:]]))
