#!/usr/bin/env python
"""HF <-> Megatron checkpoint conversion (same as `matpo convert`).

    python tools/convert_checkpoint.py hf-to-megatron <hf_dir> <out_dir> --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf <ckpt_dir> <out_dir> --tp 1 --pp 1
"""
import sys

from megatron_matpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
