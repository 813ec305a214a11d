#!/usr/bin/env python
"""Write MAPoRL task data as MATPO-data parquet configs: the offline arithmetic word problems
(maporl_train_<name>, maporl_val_<name>[_repeat_<k>]), and optionally GSM8K / ANLI jsonl files
converted to the same schema (maporl_<split>_gsm8k, maporl_<split>_anli).

    python tools/make_arithmetic_data.py --out runs/data/arithmetic --seed 0 --max-ops 3
    python tools/make_arithmetic_data.py --out runs/data/maporl --convert gsm8k test.jsonl test \\
        --convert anli dev_r1.jsonl val
"""
from __future__ import annotations

import argparse
import sys

from megatron_matpo.data.arithmetic import (OPS, ArithmeticConfig, read_anli_jsonl, read_gsm8k_jsonl, write_arithmetic,
                                            write_config)
from megatron_matpo.data.schema import DatasetError

_READERS = {"gsm8k": read_gsm8k_jsonl, "anli": read_anli_jsonl}


def main(argv: list[str] | None = None) -> int:
    d = ArithmeticConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--train", type=int, default=d.n_train, help="train problems")
    ap.add_argument("--val", type=int, default=d.n_val, help="distinct val problems")
    ap.add_argument("--val-repeat", type=int, default=d.val_repeat, help="k of the val repeat_k config")
    ap.add_argument("--min-ops", type=int, default=d.min_ops)
    ap.add_argument("--max-ops", type=int, default=d.max_ops)
    ap.add_argument("--operand-min", type=int, default=d.operand_min)
    ap.add_argument("--operand-max", type=int, default=d.operand_max)
    ap.add_argument("--max-factor", type=int, default=d.max_factor, help="largest multiplication/division factor")
    ap.add_argument("--ops", default=",".join(d.ops), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--name", default=d.name, help="config suffix, e.g. maporl_train_<name>")
    ap.add_argument("--no-arithmetic", action="store_true", help="only convert --convert files")
    ap.add_argument("--convert", nargs=3, action="append", default=[], metavar=("KIND", "FILE", "SPLIT"),
                    help="convert a gsm8k or anli jsonl file into config maporl_<SPLIT>_<KIND>")
    a = ap.parse_args(argv)
    written = {}
    try:
        if not a.no_arithmetic:
            cfg = ArithmeticConfig(seed=a.seed, n_train=a.train, n_val=a.val, val_repeat=a.val_repeat,
                                   min_ops=a.min_ops, max_ops=a.max_ops, operand_min=a.operand_min,
                                   operand_max=a.operand_max, max_factor=a.max_factor,
                                   ops=tuple(o.strip() for o in a.ops.split(",") if o.strip()), name=a.name)
            written.update(write_arithmetic(a.out, cfg))
        for kind, path, split in a.convert:
            if kind not in _READERS:
                ap.error(f"--convert kind must be one of {', '.join(_READERS)}, got {kind!r}")
            name = f"maporl_{split}_{kind}"
            written[name] = write_config(_READERS[kind](path, split), a.out, name)
    except (ValueError, DatasetError) as e:
        ap.error(str(e))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
