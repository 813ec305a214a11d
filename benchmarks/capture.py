"""Run a benchmark that prints its figures (packing.py, actor_mfu.py) and store them, with the run's
date, machine and versions, as benchmarks/results/<name>.json for report.py.

    .venv/bin/python benchmarks/capture.py packing -- .venv/bin/python benchmarks/packing.py
    .venv/bin/python benchmarks/capture.py actor_mfu_cpu -- .venv/bin/python benchmarks/actor_mfu.py --model ...
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, meta, write_result  # noqa: E402

PACKING_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def parse_packing(lines: list[str]) -> dict:
    rows = []
    for line in lines:
        m = PACKING_ROW.match(line)
        if m:
            seed, n, pf, df, ratio, pi, di, secs = m.groups()
            rows.append({"seed": int(seed), "rows": int(n), "packed_fraction": float(pf), "padded_fraction": float(df),
                         "ratio": float(ratio), "packed_imbalance": float(pi), "padded_imbalance": float(di),
                         "pack_s": float(secs)})
    setup = next((ln.strip() for ln in lines if ln.startswith("MATPO-shaped")), "")
    return {"setup": setup, "rows": rows,
            "targets": {"real_token_fraction": 0.98, "dp_imbalance": 1.05}}


def parse_actor_mfu(lines: list[str]) -> dict:
    objs = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                objs.append(json.loads(line))
            except ValueError:
                pass
    speedup = next((o["speedup_packed_over_padded"] for o in objs if "speedup_packed_over_padded" in o), None)
    return {"rows": [o for o in objs if "variant" in o], "speedup_packed_over_padded": speedup}


PARSERS = {"packing": parse_packing, "actor_mfu": parse_actor_mfu}


def main() -> None:
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        raise SystemExit(__doc__)
    name, cmd = sys.argv[1], sys.argv[3:]
    parser = next(f for prefix, f in PARSERS.items() if name.startswith(prefix))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if not line.lstrip().startswith(("W1", "/", "warnings.warn")):
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    data = parser(lines)
    write_result(name, {"meta": meta(wall_s=time.perf_counter() - t0, command=" ".join(cmd)), **data})


if __name__ == "__main__":
    main()
