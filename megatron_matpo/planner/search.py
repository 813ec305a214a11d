"""Enumerate the TP × PP × CP × DP (× micro-batch budget, recompute, distributed optimizer) layouts
a model and a cluster allow, predict each, and rank the ones that fit by predicted step time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from megatron_matpo.planner.cluster import Cluster
from megatron_matpo.planner.cost import Assumptions, Layout, Prediction, Workload, predict
from megatron_matpo.planner.model_stats import ModelSpec

DEFAULT_CP = (1, 2, 4, 8)
DEFAULT_MICRO_BATCH_ROWS = (1, 2, 4)  # packing budgets as multiples of the row length


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parallel_problems(spec: ModelSpec, cluster: Cluster, tp: int, pp: int, cp: int,
                      allow_cross_node_tp: bool = False) -> list[str]:
    """Why a TP × PP × CP split cannot build or run this model (empty when it can)."""
    why = []
    for name, value in (("num_attention_heads", spec.heads), ("num_key_value_heads", spec.kv_heads),
                        ("intermediate_size", spec.intermediate)):
        if value % tp:
            why.append(f"tp={tp} does not divide {name}={value}")
    if tp > cluster.gpus_per_node and not allow_cross_node_tp:
        why.append(f"tp={tp} spans nodes (gpus_per_node={cluster.gpus_per_node})")
    if spec.layers % pp:
        why.append(f"pp={pp} does not divide num_hidden_layers={spec.layers}")
    return why


def batch_problems(workload: Workload, dp: int, micro_batch_tokens: int) -> list[str]:
    """Why a micro-batch budget does not suit the workload at this DP size."""
    why = []
    if micro_batch_tokens < workload.seq_len:
        why.append(f"micro_batch_tokens={micro_batch_tokens} < seq_len={workload.seq_len}: a row cannot be split")
    per_rank = workload.global_batch_tokens / dp
    if per_rank < workload.seq_len:
        why.append(f"dp={dp} leaves {per_rank:.0f} tokens per DP rank, less than one row of {workload.seq_len}")
    elif micro_batch_tokens > per_rank:
        why.append(f"micro_batch_tokens={micro_batch_tokens} exceeds the {per_rank:.0f} tokens per DP rank")
    return why


@dataclass
class Rejection:
    layout: dict
    reasons: list[str]

    def to_dict(self) -> dict:
        return {"layout": self.layout, "reasons": self.reasons}


def enumerate_layouts(spec: ModelSpec, cluster: Cluster, workload: Workload, gpus: int | None = None, *,
                      tp: Iterable[int] | None = None, pp: Iterable[int] | None = None,
                      cp: Iterable[int] | None = None, micro_batch_tokens: Iterable[int] | None = None,
                      recompute: Sequence[bool] = (False, True),
                      distributed_optimizer: Sequence[bool] = (True, False),
                      sequence_parallel: Sequence[bool] = (False, True),
                      allow_cross_node_tp: bool = False) -> tuple[list[Layout], list[Rejection]]:
    """All layouts with tp·pp·cp·dp == gpus (default: the whole cluster), valid ones and rejected
    ones with their reasons. Candidates default to every divisor for TP and PP, CP in {1,2,4,8},
    packing budgets of 1, 2 and 4 rows, and each tp > 1 layout with and without SP."""
    gpus = gpus or cluster.gpus
    if gpus > cluster.gpus:
        raise ValueError(f"--gpus {gpus} exceeds {cluster.name}'s {cluster.gpus} GPUs")
    tps = sorted(set(tp)) if tp else divisors(gpus)
    cps = sorted(set(cp)) if cp else list(DEFAULT_CP)
    mbts = sorted(set(micro_batch_tokens)) if micro_batch_tokens else [k * workload.seq_len
                                                                       for k in DEFAULT_MICRO_BATCH_ROWS]
    valid: list[Layout] = []
    rejected: list[Rejection] = []
    for t in tps:
        for c in cps:
            if gpus % (t * c):
                rejected.append(Rejection({"tp": t, "cp": c}, [f"tp·cp={t * c} does not divide gpus={gpus}"]))
                continue
            for p in (sorted(set(pp)) if pp else divisors(gpus // (t * c))):
                if (gpus // (t * c)) % p:
                    rejected.append(Rejection({"tp": t, "cp": c, "pp": p},
                                              [f"tp·cp·pp={t * c * p} does not divide gpus={gpus}"]))
                    continue
                d = gpus // (t * c * p)
                why = parallel_problems(spec, cluster, t, p, c, allow_cross_node_tp)
                if why:
                    rejected.append(Rejection({"tp": t, "pp": p, "cp": c, "dp": d}, why))
                    continue
                for mbt in mbts:
                    why = batch_problems(workload, d, mbt)
                    if why:
                        rejected.append(Rejection({"tp": t, "pp": p, "cp": c, "dp": d, "micro_batch_tokens": mbt},
                                                  why))
                        continue
                    for rc in recompute:
                        for do in distributed_optimizer:
                            for sp in sorted(set(sequence_parallel)) if t > 1 else [False]:
                                valid.append(Layout(tp=t, pp=p, dp=d, cp=c, micro_batch_tokens=mbt,
                                                    recompute=rc, distributed_optimizer=do, sp=sp))
    return valid, rejected


@dataclass
class Plan:
    spec: ModelSpec
    cluster: Cluster
    workload: Workload
    assumptions: Assumptions
    gpus: int
    ranked: list[Prediction]  # fitting layouts, fastest first
    over_memory: list[Prediction]  # valid but predicted above the memory budget, smallest first
    rejected: list[Rejection] = field(default_factory=list)


def plan(spec: ModelSpec, cluster: Cluster, workload: Workload, assumptions: Assumptions | None = None,
         gpus: int | None = None, **search) -> Plan:
    assumptions = assumptions or Assumptions()
    search.setdefault("sequence_parallel", (False, True) if assumptions.sequence_parallel else (False,))
    layouts, rejected = enumerate_layouts(spec, cluster, workload, gpus, **search)
    preds = [predict(spec, cluster, lay, workload, assumptions) for lay in layouts]
    fit = sorted((p for p in preds if p.fits), key=lambda p: (p.time.total, p.memory.total))
    over = sorted((p for p in preds if not p.fits), key=lambda p: p.memory.total)
    return Plan(spec=spec, cluster=cluster, workload=workload, assumptions=assumptions,
                gpus=gpus or cluster.gpus, ranked=fit, over_memory=over, rejected=rejected)
