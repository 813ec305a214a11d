"""Packing efficiency on MATPO-shaped batches: THD packing (`train.packing.pack_rows`) vs padded
batches, side by side on the same rows.

Rows: each planner rollout plus 0-6 worker rollouts, lengths long-tailed (log-normal) and capped at
the agent context. Packed: DP-balanced, token-budgeted THD micro-batches. Padded: the common
alternative, rows dealt round-robin to DP ranks in arrival order, `rows_per_micro_batch` per
micro-batch, each padded to its longest row. Prints real-token fraction and DP load imbalance
(max/mean real tokens per rank) for both and their ratio.

    .venv/bin/python benchmarks/packing.py [--planners 256] [--dp 8] [--context 40960]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from megatron_matpo.train.packing import Row, pack_rows, packing_stats


def matpo_rows(planners: int, context: int, seed: int) -> list[Row]:
    rng = random.Random(seed)

    def length(median: float) -> int:
        return max(64, min(context, int(rng.lognormvariate(0.0, 0.9) * median)))

    rows: list[Row] = []
    for _ in range(planners):
        for role, median in [("planner", context / 8)] + [("worker", context / 12)] * rng.randint(0, 6):
            n = length(median)
            rows.append(Row(token_ids=[1] * n, loss_mask=[1] * n, old_logprobs=[0.0] * n, advantage=0.0,
                            role=role))
    return rows


def padded_stats(rows: list[Row], dp: int, rows_per_micro_batch: int) -> dict:
    ranks: list[list[Row]] = [rows[r::dp] for r in range(dp)]
    real = [sum(len(x) for x in rk) for rk in ranks]
    slots = 0
    for rk in ranks:
        for i in range(0, len(rk), rows_per_micro_batch):
            mb = rk[i:i + rows_per_micro_batch]
            slots += max(len(x) for x in mb) * len(mb)
    return {"real_token_fraction": sum(real) / slots, "dp_imbalance": max(real) / statistics.fmean(real)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--planners", type=int, default=256)
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--context", type=int, default=40960)
    ap.add_argument("--rows-per-micro-batch", type=int, default=4, help="padded baseline")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(f"MATPO-shaped batches: {args.planners} planners + 0-6 workers each, context {args.context}, DP={args.dp}")
    print(f"{'seed':>4} {'rows':>6} {'packed frac':>11} {'padded frac':>11} {'ratio':>6} "
          f"{'packed imb':>10} {'padded imb':>10} {'pack s':>7}")
    for seed in range(args.seeds):
        rows = matpo_rows(args.planners, args.context, seed)
        t0 = time.perf_counter()
        packed = packing_stats(pack_rows(rows, args.context, args.dp))
        dt = time.perf_counter() - t0
        padded = padded_stats(rows, args.dp, args.rows_per_micro_batch)
        print(f"{seed:>4} {len(rows):>6} {packed['real_token_fraction']:>11.4f} {padded['real_token_fraction']:>11.4f} "
              f"{packed['real_token_fraction'] / padded['real_token_fraction']:>6.2f} {packed['dp_imbalance']:>10.4f} "
              f"{padded['dp_imbalance']:>10.4f} {dt:>7.2f}")


if __name__ == "__main__":
    main()
