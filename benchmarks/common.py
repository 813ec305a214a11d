"""Shared by the benchmark scripts: run metadata (date, machine, versions) and the result files that
`benchmarks/report.py` renders into docs/benchmarks.md.

Each script writes `benchmarks/results/<name>.json`: {"meta": ..., "targets": ..., ...}.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "bench"  # generated inputs (models, data), reused between runs; git-ignored

VERSIONED = ("torch", "megatron-core", "megatron-bridge", "sglang", "transformers", "ray")


def machine() -> str:
    """e.g. '2-core AMD EPYC, 23 GiB' or 'NVIDIA H100 80GB HBM3 + 16-core ...'."""
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2 ** 20:.0f} GiB"
                break
    except OSError:
        pass
    out = f"{os.cpu_count()}-core {cpu}{mem}"
    try:
        import torch

        if torch.cuda.is_available():
            out = f"{torch.cuda.get_device_name(0)} + {out}"
    except Exception:  # noqa: BLE001 - metadata only
        pass
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def meta(**extra) -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
            "commit": git_commit(), "load_avg_1m_at_end": load_avg(), **extra}


def write_result(name: str, data: dict, path: str | Path | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"results written to {out}")
    return out


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def bench_env() -> None:
    """What every multi-process CPU benchmark sets before it starts processes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
