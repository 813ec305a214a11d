#!/usr/bin/env python
"""Write the offline multi-hop QA set: DIR/corpus.jsonl plus MATPO-data parquet configs
(matpo_train_<name>, matpo_val_<name>_repeat_<k>, and the same as single_agent_*).

    python tools/make_multihop_data.py --out runs/data/multihop --seed 0
"""
from __future__ import annotations

import argparse
import sys

from megatron_matpo.data.multihop import MultihopConfig, write_multihop


def main(argv: list[str] | None = None) -> int:
    d = MultihopConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--entities", type=int, default=d.n_entities, help="number of invented entities/pages")
    ap.add_argument("--train", type=int, default=d.n_train, help="train questions")
    ap.add_argument("--val", type=int, default=d.n_val, help="distinct val questions")
    ap.add_argument("--val-repeat", type=int, default=d.val_repeat, help="k of the val repeat_k configs")
    ap.add_argument("--three-hop-fraction", type=float, default=d.three_hop_fraction)
    ap.add_argument("--distractors", type=int, default=d.distractors_per_page, help="distractor sentences per page")
    ap.add_argument("--name", default=d.name, help="config suffix, e.g. matpo_train_<name>")
    a = ap.parse_args(argv)
    try:
        cfg = MultihopConfig(seed=a.seed, n_entities=a.entities, n_train=a.train, n_val=a.val,
                             val_repeat=a.val_repeat, three_hop_fraction=a.three_hop_fraction,
                             distractors_per_page=a.distractors, name=a.name)
        written = write_multihop(a.out, cfg)
    except ValueError as e:
        ap.error(str(e))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
