"""Render benchmarks/results/*.json as markdown tables into docs/benchmarks.md, between marker
comments `<!-- BEGIN name -->` / `<!-- END name -->` (text outside the markers is left alone; a
section whose result file is missing keeps its old content).

    .venv/bin/python benchmarks/report.py [--results benchmarks/results] [--doc docs/benchmarks.md] [--check]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

MiB = 2 ** 20


def _load(results: Path, name: str) -> dict | None:
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ok(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**missed**")


def _provenance(m: dict) -> str:
    v = m.get("versions", {})
    stack = ", ".join(f"{k} {v[k]}" for k in ("torch", "megatron-core", "megatron-bridge", "sglang") if k in v)
    load = m.get("load_avg_1m_at_end")
    extra = f"; 1-min load at the end {load:.1f}" if load is not None else ""
    wall = f"; ran {m['wall_s'] / 60:.1f} min" if m.get("wall_s") else ""
    return (f"_{m['date']} · {m['machine']} · Python {v.get('python', '?')}, {stack} · commit {m.get('commit', '?')}"
            f"{wall}{extra}_")


# ---------------------------------------------------------------- sections


def packing(d: dict) -> str:
    rows = [[r["seed"], r["rows"], f"**{r['packed_fraction']:.4f}**", f"{r['padded_fraction']:.4f}", f"{r['ratio']:.2f}",
             f"**{r['packed_imbalance']:.4f}**", f"{r['padded_imbalance']:.4f}", f"{r['pack_s']:.1f} s"] for r in d["rows"]]
    t = d["targets"]
    worst_frac = min(r["packed_fraction"] for r in d["rows"])
    worst_imb = max(r["packed_imbalance"] for r in d["rows"])
    return "\n\n".join([
        _table(["seed", "rows", "packed real-token fraction", "padded", "ratio", "packed DP imbalance (max/mean)",
                "padded", "packing time"], rows),
        f"Targets: real-token fraction ≥ {t['real_token_fraction']:.0%} — {_ok(worst_frac >= t['real_token_fraction'])} "
        f"(worst seed {worst_frac:.4f}); DP imbalance ≤ {t['dp_imbalance']} — {_ok(worst_imb <= t['dp_imbalance'])} "
        f"(worst {worst_imb:.4f}).",
        _provenance(d["meta"])])


def actor_mfu_cpu(d: dict) -> str:
    rows = [[r["variant"], f"{r['step_s']:.3f}", f"{r['real_tokens_per_s']:,.0f}", f"{r['slots']:,}", r["seqs"],
             r["real_tokens"]] for r in d["rows"]]
    return "\n\n".join([
        _table(["variant", "step (s)", "real tokens/s", "slots", "sequences", "real tokens"], rows),
        f"Packed over padded: **{d['speedup_packed_over_padded']:.2f}×** (no CPU target; the MFU figures are the GPU "
        "table above).", _provenance(d["meta"])])


def _ours(rows: list[dict]) -> list[dict]:
    """The rows of the sync as it runs (our resharded export); older results have no `export` field."""
    mine = [r for r in rows if r.get("export", "reshard") == "reshard"]
    return mine or rows


def weight_sync(d: dict) -> str:
    m = d["model"]
    rows = []
    for r in d["rows"]:
        tgt = f"{r['memory_target_bytes'] / MiB:.2f}" if r["memory_target_bytes"] else "n/a (whole shard)"
        by_rank = r.get("peak_extra_by_rank_bytes", [r["peak_extra_rank0_bytes"], r["peak_extra_rank1_bytes"]])
        p = r.get("profile", {})
        rows.append([r["layout"], r["mode"], r.get("export", "megatron_bridge"), r["bucket_mb"] or "-",
                     int(r["buckets"] or 0), f"{r['sync_s']:.3f}", f"{r['sync_s'] / (r['bytes'] / 1e9):.2f}",
                     f"{r['baseline_s'] / (r['bytes'] / 1e9):.2f}", f"**{r['ratio']:.3f}**",
                     " / ".join(f"{p.get(k, 0.0):.3f}" for k in ("produce_s", "send_s", "flush_s")),
                     " / ".join(f"{p[k]:.3f}" for k in ("engine_wait_s", "engine_load_s"))
                     + (f" · {p['engine_direct_mib']:.1f}" if "engine_direct_mib" in p else "") if p.get("engine_load_s")
                     else "-",
                     f"{r['export_s']:.3f}", " / ".join(f"{x / MiB:.2f}" for x in by_rank), tgt,
                     _ok(r["memory_target_met"]), f"{r['peak_extra_engine_bytes'] / MiB:.2f}"])
    head = (f"Model: Qwen3 architecture, hidden {m['hidden']}, {m['layers']} layers, FFN {m['ffn']}: "
            f"{m['bytes'] / MiB:.1f} MiB fp32 in {m['tensors']} HF tensors, largest {m['largest_tensor_bytes'] / MiB:.2f} MiB. "
            f"Median of {d['meta']['reps']} syncs per row after one warm-up; baseline interleaved with each sync.")
    lines = []
    for export in dict.fromkeys(r.get("export", "megatron_bridge") for r in d["rows"]):
        sel = [r for r in d["rows"] if r.get("export", "megatron_bridge") == export]
        bucketed = [r for r in sel if r["memory_target_met"] is not None]
        ratios = [r["ratio"] for r in bucketed] or [r["ratio"] for r in sel]
        met = sum(r["memory_target_met"] for r in bucketed)
        lines.append(f"{export}: bucketed ratio {min(ratios):.3f}–{max(ratios):.3f} — "
                     f"{_ok(min(ratios) >= d['targets']['ratio'])} (target ≥ {d['targets']['ratio']}); peak extra "
                     f"memory ≤ 1 bucket + largest tensor on every rank: {met}/{len(bucketed)} bucketed variants.")
    for before in ("reshard-loaded", "reshard-per-bucket", "megatron_bridge"):  # interleaved: the steadier figure
        pairs = {(r["layout"], r["mode"], r["bucket_mb"]): r for r in d["rows"] if r.get("export") == before}
        speed = [pairs[k]["sync_s"] / r["sync_s"] for r in d["rows"] if r.get("export") == "reshard"
                 and (k := (r["layout"], r["mode"], r["bucket_mb"])) in pairs]
        if speed:
            lines.append(f"Sync time {before} / reshard, same variant: {min(speed):.2f}–{max(speed):.2f}×.")
    return "\n\n".join([
        head,
        _table(["layout", "path", "export", "bucket MiB", "buckets", "sync s", "sync s/GB", "baseline s/GB",
                f"ratio (target ≥ {d['targets']['ratio']})", "produce / send / flush s", "engine wait / load s · direct MiB", "export-only s",
                "peak extra MiB rank 0 / 1", "target MiB", "memory", "engine extra MiB"], rows),
        " ".join(lines), _provenance(d["meta"])])


def weight_sync_large(d: dict) -> str:
    return weight_sync(d)


def weight_sync_h2048(d: dict) -> str:
    return weight_sync(d)


def rollout_overlap(d: dict) -> str:
    s, st = d["summary"], d["setup"]
    rows = []
    for mode in ("concurrent", "sequential"):
        x = s[mode]
        rows.append([mode, f"{x['wall_s']:.2f}", f"{x['critical_path_s']:.2f}",
                     f"**{x['ratio']:.3f}**" if mode == "concurrent" else f"{x['ratio']:.3f}",
                     f"{x['ratio_measured_tools']:.3f}", f"{x['rollout_ratio_median']:.3f}", int(x["workers"]),
                     int(x["tool_calls"]), f"{x['tool_latency_median_s']:.2f} / {x['tool_latency_max_s']:.2f}",
                     f"{x['busy_s']:.0f}"])
    c = s["concurrent"]
    return "\n\n".join([
        f"{st['prompts']} prompts × {st['samples']} rollouts = {st['prompts'] * st['samples']} planners, each "
        f"delegating {st['delegations']} subtasks in its first turn; every worker searches once; "
        f"{st['latency_s']} s injected per tool call; {st['config']} limits (planner {st['planner']['max_turns']} turns × "
        f"≤ {st['planner']['max_tokens_per_turn']} tokens, worker {st['worker']['max_turns']} × "
        f"≤ {st['worker']['max_tokens_per_turn']} + summary ≤ {st['worker']['summary_reserve_tokens']}). "
        f"Median of {d['meta']['reps']} batches per mode, alternating.",
        _table(["workers run", "batch wall s", "critical path s", f"wall / critical path (target ≤ {d['targets']['ratio']})",
                "… with measured tool latencies", "per-rollout median", "workers", "tool calls",
                "tool latency median / max s", "Σ call time s"], rows),
        f"Concurrent: **{c['ratio']:.3f}×** the critical path — {_ok(d['target_met'])}. Concurrent workers finish the "
        f"batch **{d['speedup_concurrent_over_sequential']:.2f}×** faster than sequential ones.",
        _provenance(d["meta"])])


def step_breakdown(d: dict) -> str:
    b, run = d["breakdown"], d["run"]
    names = list(b["mean_stage_s"])
    rows = []
    for s in b["steps"]:
        cp = s.get("rollout_critical_path_s")
        rows.append([s["step"], f"{s['step_s']:.2f}"] + [f"{s['stages'].get(k, 0.0):.2f}" for k in names]
                    + [f"{s['overhead_s'] * 1000:.1f} ms", f"{cp:.2f}" if cp else "-"])
    rows.append([f"steps {b['steady_steps'][0]}–{b['steady_steps'][-1]} share", "100%"]
                + [f"{b['share'][k]:.1%}" for k in names] + [f"**{b['overhead_share']:.2%}**", ""])
    lines = [_table(["step", "step s"] + [f"{k} s" for k in names] + ["overhead", "rollout critical path s"], rows)]
    lines.append(f"Orchestration overhead (step − Σ stages) in steady state: **{b['overhead_share']:.2%}** of the "
                 f"step — {_ok(b['target_met'])} (target ≤ {d['targets']['overhead_share']:.0%}).")
    more = []
    if b.get("mean_between_steps_s") is not None:
        more.append(f"between logged steps (logging, tensorboard) {b['mean_between_steps_s'] * 1000:.0f} ms")
    if b.get("mean_sync_ray_roundtrip_s") is not None:
        more.append(f"Ray round trip of the sync stage (controller − rank 0's own time) "
                    f"{b['mean_sync_ray_roundtrip_s'] * 1000:.0f} ms")
    if b.get("rollout_over_critical_path"):
        more.append(f"rollout stage / its longest planner chain {b['rollout_over_critical_path']:.3f}")
    if "command_wall_s" in run:
        more.append(f"the whole `matpo train` took {run['command_wall_s']:.0f} s: bring-up {run['bring_up_s']:.0f} s, "
                    f"{len(b['steps'])} steps {sum(s['step_s'] for s in b['steps']):.0f} s, "
                    f"tear-down (checkpoint, HF export, stop) {run['tear_down_s']:.0f} s")
    if more:
        lines.append("Also: " + "; ".join(more) + ".")
    lines.append(f"Source: {run.get('source', '?')}. " + _provenance(d["meta"]))
    return "\n\n".join(lines)


def bringup(d: dict) -> str:
    parts = [k for k in d["median"] if k != "total"]
    other = d.get("against") or {}
    label = (f" at {other['rev']}" if other.get("rev") else f" with {' '.join(other.get('overrides', []))}")
    sides = [("", d)] + ([(label, other)] if other else [])
    rows = []
    for label, side in sides:
        rows += [[f"{i + 1}{label}"] + [f"{r.get(k, 0.0):.1f}" for k in parts] + [f"{r['total']:.1f}"]
                 for i, r in enumerate(side["reps"])]
        rows.append([f"median{label}"] + [f"{side['median'].get(k, 0.0):.1f}" for k in parts]
                    + [f"**{side['median']['total']:.1f}**"])
    text = [_table(["rep"] + [f"{k} s" for k in parts] + ["process start → first rollout s"], rows),
            f"Process start → first rollout request: **{d['median']['total']:.1f} s** (median) — "
            f"{_ok(d['target_met'])} (target ≤ {d['targets']['total_s']:.0f} s). Parts overlap (the tokenizer "
            "loads in the background; engines and ranks start together when the KV pool is fixed), so they do "
            "not add up."]
    if other:
        r = other["ratio"]
        text.append(f"{label.strip()[0].upper()}{label.strip()[1:]} (interleaved reps) / this commit: total "
                    f"**{r['total']:.2f}×**, engines + tool server {r.get('engines_tools', float('nan')):.2f}×, "
                    f"actor ranks {r.get('ranks', float('nan')):.2f}×.")
    text.append(f"Source: {d['meta'].get('source', '?')}. " + _provenance(d["meta"]))
    return "\n\n".join(text)


def async_pipeline(d: dict) -> str:
    rows = [[f"{r['latency_s']:g}", r["max_staleness"], f"{r['step_s']:.1f}", f"**{r['ratio']:.2f}×**",
             f"{r['overlap_efficiency']:.2f}" if r["max_staleness"] else "—", f"{r['sync_rollout_s']:.1f}",
             f"{r['sync_rest_s']:.1f}", f"{r['engine_busy']:.2f}", f"{r['actor_busy']:.2f}",
             ", ".join(map(str, r["staleness_observed"]))] for r in d["rows"]]
    t = d["targets"]["overlap_efficiency_at_1s"]
    return "\n\n".join([
        _table(["tool latency s", "max staleness", "step s", "steps/h vs sync", "overlap efficiency",
                "sync R s", "sync T s", "engine busy", "actor busy", "staleness seen"], rows),
        f"Best: ratio **{d['ratio']:.2f}×**, overlap efficiency {d['overlap_efficiency']:.2f}; target at 1 s "
        f"latency ≥ {t} — {_ok(d['target_met'])}.", f"Source: {d['meta'].get('source', '?')}. " + _provenance(d["meta"])])


def engine_decode(d: dict) -> str:
    rows = [["SGLang's per-request loop", f"{d['sglang_loop_median_s']:.2f}", f"{d['sglang_loop_tokens_per_s']:.0f}",
             ", ".join(f"{x:.2f}" for x in d["sglang_loop_s"])],
            ["batched (our plugin)", f"{d['batched_median_s']:.2f}", f"{d['batched_tokens_per_s']:.0f}",
             ", ".join(f"{x:.2f}" for x in d["batched_s"])]]
    return "\n\n".join([
        f"{d['requests']} concurrent requests × ({d['prompt_tokens']}-token prompt + {d['new_tokens']} sampled tokens), "
        "tiny Qwen3, one CPU engine per side.",
        _table(["torch-native decode", "median s", "new tokens / s", "reps s"], rows),
        f"Batched / loop: **{d['speedup']:.2f}×** on whole requests (prefill included).", _provenance(d["meta"])])


def layout_accuracy(d: dict) -> str:
    st = d["setup"]
    hidden = f" (hidden {st['hidden']})" if st.get("hidden") else ""
    cal = "predicted_uncalibrated_s" in d["rows"][0]
    rows = [[f"`{r['key']}`"] + ([f"{r['predicted_uncalibrated_s']:.3f}"] if cal else [])
            + [f"{r['predicted_s']:.3f}", r["predicted_rank"], f"{r['measured_s']:.3f}",
               r["measured_rank"], f"{r['measured_over_predicted']:.2f}", f"{r['predicted_memory_gib']:.2f}",
               f"{r['measured_memory_gib']:.2f}"] for r in d["rows"]]
    per_round = ", ".join(f"{x:.3f}" for x in d["spearman_per_round"])
    head = ["layout"] + (["uncalibrated predicted s", "calibrated predicted s"] if cal else ["predicted step s"])
    text = [f"Model {st['model']}{hidden}, cluster preset `{st['cluster']}`, rows of {st['seq_len']} tokens, "
            f"{st['batch_tokens']} tokens per step; {len(d['rows'])} of {st['fitting_layouts']} fitting layouts, "
            f"{d['meta']['rounds']} rounds × {d['meta']['steps']} timed steps (median).",
            _table(head + ["rank", "measured step s", "rank", "measured / predicted", "predicted memory GiB",
                           "measured RSS GiB"], rows)]
    if cal:
        c = st["calibrated_cluster"]
        text.append(f"Calibration (`planner/calibrate.py`, {st['probe_s']:.0f} s probe on this machine): collective "
                    f"latency {c['collective_latency_us']:.0f} µs, link {c['nvlink_gbs'] / 2:.2f} GB/s one way, "
                    f"{st['probe']['effective_tflops'] * 1e3:.1f} GFLOP/s effective, "
                    f"{c['layer_overhead_ms']:.2f} ms fixed per layer and micro-batch. Uncalibrated (`cpu-tiny` as "
                    f"is) Spearman {d['spearman_uncalibrated']:.3f}, Kendall {d['kendall_uncalibrated']:.3f}.")
    text.append(f"{'Calibrated ' if cal else ''}Spearman **{d['spearman']:.3f}** (per round: {per_round}), Kendall "
                f"{d['kendall']:.3f} over {len(d['rows'])} layouts — {_ok(d['target_met'])} against the ≥ "
                f"{d['targets']['spearman']} of issue 18.")
    return "\n\n".join(text + [_provenance(d["meta"])])


def summary(res: dict[str, dict]) -> str:
    rows = []
    if (d := res.get("packing")):
        worst = min(r["packed_fraction"] for r in d["rows"])
        imb = max(r["packed_imbalance"] for r in d["rows"])
        rows.append(["packing", "real-token fraction (worst seed)", "≥ 0.98", f"{worst:.4f}", f"{worst / 0.98:.2f}",
                     _ok(worst >= 0.98), d["meta"]["date"]])
        rows.append(["packing", "DP imbalance max/mean (worst seed)", "≤ 1.05", f"{imb:.4f}", f"{imb / 1.05:.2f}",
                     _ok(imb <= 1.05), d["meta"]["date"]])
    if (d := res.get("weight_sync")):
        # bucketed rows (the target's) of the sync as it runs, at every model size measured
        ours = [dict(r, model_mib=x["model"]["bytes"] / MiB) for x in (d, res.get("weight_sync_large"),
                                                                      res.get("weight_sync_h2048")) if x
                for r in _ours(x["rows"]) if r["memory_target_met"] is not None]
        # the target holds for every path and layout: the worst bucketed variant of the largest model measured
        largest = [r for r in ours if r["model_mib"] == max(x["model_mib"] for x in ours)]
        worst_r, best = min(largest, key=lambda r: r["ratio"]), max(largest, key=lambda r: r["ratio"])

        def name(r: dict) -> str:
            return f"{r['layout']} {r['mode']}" + (f" {r['bucket_mb']:g} MiB" if r["bucket_mb"] else "")

        rows.append(["weight sync", f"bytes/s vs plain transfer, worst bucketed variant at {best['model_mib']:.0f} MiB "
                     f"({name(worst_r)}; best {name(best)}: {best['ratio']:.2f})", "≥ 0.5",
                     f"{worst_r['ratio']:.3f}", f"{worst_r['ratio'] / 0.5:.2f}", _ok(worst_r["ratio"] >= 0.5),
                     d["meta"]["date"]])
        mem = ours

        def peak(r: dict) -> int:
            return max(r.get("peak_extra_by_rank_bytes", [r["peak_extra_rank0_bytes"]]))

        worst = max(mem, key=lambda r: peak(r) / r["memory_target_bytes"])
        q = peak(worst) / worst["memory_target_bytes"]
        rows.append(["weight sync", "peak extra memory / (bucket + largest tensor), worst rank and variant", "≤ 1",
                     f"{q:.2f}", f"{q:.2f}", _ok(all(r["memory_target_met"] for r in mem)), d["meta"]["date"]])
    if (d := res.get("rollout_overlap")):
        c = d["summary"]["concurrent"]
        rows.append(["rollout overlap", "concurrent wall / critical path", "≤ 1.15", f"{c['ratio']:.3f}",
                     f"{c['ratio'] / 1.15:.2f}", _ok(d["target_met"]), d["meta"]["date"]])
    if (d := res.get("step_breakdown")):
        b = d["breakdown"]
        rows.append(["step breakdown", "orchestration overhead share of step", "≤ 10%", f"{b['overhead_share']:.2%}",
                     f"{b['overhead_share'] / 0.10:.2f}", _ok(b["target_met"]), d["meta"]["date"]])
    if (d := res.get("bringup")):
        t = d["median"]["total"]
        rows.append(["bring-up", "process start → first rollout request (configs/tiny_cpu.yaml)",
                     f"≤ {d['targets']['total_s']:.0f} s", f"{t:.1f} s", f"{t / d['targets']['total_s']:.2f}",
                     _ok(d["target_met"]), d["meta"]["date"]])
    if (d := res.get("async_pipeline")) and d.get("target_met") is not None:
        at1 = max((r for r in d["rows"] if r["latency_s"] == 1.0 and r["max_staleness"]),
                  key=lambda r: r["overlap_efficiency"])
        rows.append(["async pipeline", f"overlap efficiency at 1 s tool latency (staleness {at1['max_staleness']})",
                     f"≥ {d['targets']['overlap_efficiency_at_1s']}", f"{at1['overlap_efficiency']:.2f}",
                     f"{at1['overlap_efficiency'] / d['targets']['overlap_efficiency_at_1s']:.2f}",
                     _ok(d["target_met"]), d["meta"]["date"]])
    if (d := res.get("layout_accuracy")):
        rows.append(["layout planner", f"Spearman, predicted vs measured ({len(d['rows'])} layouts)",
                     f"≥ {d['targets']['spearman']} (issue 18)", f"{d['spearman']:.3f}",
                     f"{d['spearman'] / d['targets']['spearman']:.2f}", _ok(d["target_met"]), d["meta"]["date"]])
    machine = next((d["meta"]["machine"] for d in res.values() if d), "?")
    return "\n\n".join([_table(["benchmark", "figure", "target", "measured", "measured / target", "", "date"], rows),
                        f"_All on {machine}; versions and commit under each section._"])


def matpo_vs_single(d: dict) -> str:
    su, st = d["summary"], d["setup"]
    steps = sorted({int(k) for r in d["runs"] for k in r["curve"]})
    rows = [[("MATPO" if r["arm"] == "matpo" else "single agent"), r["seed"]]
            + [f"{r['curve'][str(k)]:.3f}" if str(k) in r["curve"] else "—" for k in steps]
            + [" ".join(f"{a:.2f}" for a in r["train_accuracy"])] for r in d["runs"]]
    lines = [f"{'MATPO' if arm == 'matpo' else 'Single agent'}: before {su[arm]['before_mean']:.3f}, after "
             f"{su[arm]['after_mean']:.3f} (rise {su[arm]['rise_mean']:+.3f}; after-RL spread over seeds "
             f"{su[arm]['after_spread']:.3f})" for arm in ("matpo", "single")]
    verdict = (f"MATPO above the single agent after RL: **{'yes' if su['matpo_above_single'] else 'no'}**; "
               f"more stable (smaller spread): **{'yes' if su['matpo_more_stable'] else 'no'}**.")
    return "\n\n".join([
        f"{st['steps']} RL steps per run, eval every {st['eval_every']}, seeds {', '.join(map(str, st['seeds']))}; "
        f"noise {', '.join(x.split('noise.', 1)[1] for x in st['noise'])}; {st['context_tokens']}-token contexts. "
        f"Curves: `{d.get('png', 'benchmarks/results/matpo_vs_single.png')}`.",
        _table(["arm", "seed"] + [f"step {k}" for k in steps] + ["training batches' accuracy (T = 1)"], rows),
        "; ".join(lines) + ".", verdict, _provenance(d["meta"])])


SECTIONS = {"summary": None, "packing": packing, "actor_mfu_cpu": actor_mfu_cpu, "weight_sync": weight_sync,
            "weight_sync_large": weight_sync_large, "weight_sync_h2048": weight_sync_h2048,
            "rollout_overlap": rollout_overlap,
            "step_breakdown": step_breakdown, "bringup": bringup, "async_pipeline": async_pipeline,
            "engine_decode": engine_decode, "layout_accuracy": layout_accuracy,
            "layout_accuracy_h512": layout_accuracy, "matpo_vs_single": matpo_vs_single}


def render(doc: str, results: Path) -> tuple[str, list[str]]:
    res = {name: _load(results, name) for name in SECTIONS if name != "summary"}
    done = []
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n)(.*?)(<!-- END {name} -->)", re.S)
        if not pat.search(doc):
            continue
        if name == "summary":
            body = summary(res)
        elif res.get(name) is None:
            continue
        else:
            body = fn(res[name])
        doc = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), doc)
        done.append(name)
    return doc, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the doc is not up to date")
    args = ap.parse_args()
    doc_path = Path(args.doc)
    old = doc_path.read_text()
    new, done = render(old, Path(args.results))
    if args.check:
        sys.exit(0 if new == old else 1)
    doc_path.write_text(new)
    print(f"{doc_path}: rendered {', '.join(done) or 'nothing'}")


if __name__ == "__main__":
    main()
