"""Planner output: a ranked table (rich when installed, plain text otherwise), a JSON document and,
when matplotlib is installed, a PNG of predicted step time against per-GPU memory."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

from megatron_matpo.planner.cluster import GIB
from megatron_matpo.planner.cost import Prediction, memory_budget
from megatron_matpo.planner.model_stats import param_counts
from megatron_matpo.planner.search import Plan

COLUMNS = ("#", "TP", "SP", "PP", "CP", "DP", "mb tokens", "m", "recomp", "dist-opt", "mem GiB", "step s",
           "tok/s/GPU", "MFU", "bubble", "TP s", "DP s")


def _row(rank: int, p: Prediction) -> list[str]:
    lay, t = p.layout, p.time
    return [str(rank), str(lay.tp), "on" if lay.sp else "off", str(lay.pp), str(lay.cp), str(lay.dp), str(lay.micro_batch_tokens),
            str(t.micro_batches), "on" if lay.recompute else "off", "on" if lay.distributed_optimizer else "off",
            f"{p.memory.total / GIB:.1f}", f"{t.total:.3g}", f"{p.tokens_per_s / lay.world:.0f}",
            f"{p.mfu:.1%}", f"{t.bubble_fraction:.0%}", f"{t.tp_comm:.3g}", f"{t.dp_comm:.3g}"]


def headline(plan: Plan) -> str:
    c, w, a = plan.cluster, plan.workload, plan.assumptions
    n = param_counts(plan.spec)["total"]
    size = f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"
    return (f"{plan.spec.arch} ({size} params) on {c.name}: {plan.gpus} of {c.gpus} GPUs, "
            f"{c.gpu_memory_gib:g} GiB each (budget {memory_budget(c, a) / GIB:.1f} GiB), "
            f"{c.peak_tflops:g} TFLOP/s x MFU {a.mfu:g}; rows of {w.seq_len} tokens, "
            f"{w.global_batch_tokens} tokens per step")


def summary(plan: Plan) -> str:
    reasons = Counter(r.split(" (")[0].split(":")[0] for rej in plan.rejected for r in rej.reasons)
    common = "; ".join(f"{k} (x{v})" for k, v in reasons.most_common(4))
    return (f"{len(plan.ranked)} layouts fit, {len(plan.over_memory)} exceed memory, "
            f"{len(plan.rejected)} rejected" + (f" - e.g. {common}" if common else ""))


def format_plain(plan: Plan, top: int) -> str:
    rows = [list(COLUMNS)] + [_row(i + 1, p) for i, p in enumerate(plan.ranked[:top])]
    widths = [max(len(r[j]) for r in rows) for j in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(widths[j]) for j, cell in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([headline(plan), *lines, summary(plan)])


def print_table(plan: Plan, top: int = 10, plain: bool = False) -> None:
    if plain or importlib.util.find_spec("rich") is None:
        print(format_plain(plan, top), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=headline(plan), caption=summary(plan))
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for i, p in enumerate(plan.ranked[:top]):
        table.add_row(*_row(i + 1, p))
    Console(width=220).print(table)


def to_json(plan: Plan) -> dict:
    return {
        "model": plan.spec.to_dict(),
        "params": param_counts(plan.spec),
        "cluster": plan.cluster.to_dict(),
        "gpus": plan.gpus,
        "workload": {"seq_len": plan.workload.seq_len, "global_batch_tokens": plan.workload.global_batch_tokens},
        "assumptions": plan.assumptions.to_dict(),
        "memory_budget_gib": memory_budget(plan.cluster, plan.assumptions) / GIB,
        "ranked": [p.to_dict() for p in plan.ranked],
        "over_memory": [p.to_dict() for p in plan.over_memory],
        "rejected": [r.to_dict() for r in plan.rejected],
    }


def write_json(plan: Plan, path: str | Path, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**to_json(plan), **(extra or {})}, indent=1))
    return path


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_png(plan: Plan, path: str | Path) -> tuple[Path | None, str]:
    """Scatter of step time vs memory (fitting and over-budget layouts, top ones labelled).

    Returns (path, message); path is None when matplotlib is missing (nothing is written).
    """
    if not matplotlib_available():
        return None, "matplotlib is not installed in this environment: no PNG written (JSON and table only)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 6))
    for preds, style, label in ((plan.over_memory, dict(c="lightgray", marker="x"), "over memory"),
                                (plan.ranked, dict(c="tab:blue", marker="o"), "fits")):
        if preds:
            ax.scatter([p.memory.total / GIB for p in preds], [p.time.total for p in preds], s=14, label=label,
                       **style)
    for i, p in enumerate(plan.ranked[:5]):
        ax.annotate(f"{i + 1}: {p.layout.key}", (p.memory.total / GIB, p.time.total), fontsize=7)
    ax.axvline(memory_budget(plan.cluster, plan.assumptions) / GIB, color="tab:red", ls="--", label="budget")
    ax.set_xlabel("predicted peak memory per GPU (GiB)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_yscale("log")
    ax.set_title(headline(plan), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, f"plot written to {path}"
