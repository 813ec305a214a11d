"""Layout planner: exact parameter counts (transformers and megatron), analytic FLOPs against
torch's FlopCounterMode, memory-model invariants, layout validation, the bench-layouts CLI, and
(slow) measured Megatron steps on the tiny model."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_matpo.planner.cluster import GIB, PRESETS, load_cluster
from megatron_matpo.planner.cost import (
    Assumptions, Layout, Workload, group_bandwidth, peak_memory, predict, stage_memory, step_time)
from megatron_matpo.planner.measure import compare_rankings, kendall, spearman
from megatron_matpo.planner.model_stats import (
    ModelSpec, forward_flops, param_counts, stage_params, train_flops)
from megatron_matpo.planner.search import enumerate_layouts, parallel_problems, plan
from tests.conftest import ARCHS

REPO = Path(__file__).resolve().parents[1]
QWEN3_14B = REPO / "configs/models/qwen3-14b"
A800 = PRESETS["a800x128"]
LONG = Workload(seq_len=40960, global_batch_tokens=128 * 40960)


@pytest.fixture(scope="module")
def qwen3_14b() -> ModelSpec:
    return ModelSpec.from_hf(QWEN3_14B)


def _hf_meta_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory for 14B parameters
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


# ---------------------------------------------------------------- model statistics


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_equals_transformers(tiny_models, arch):
    from transformers import AutoConfig

    spec = ModelSpec.from_hf(tiny_models[arch])
    assert spec.tied_embeddings == (arch == "qwen2") and spec.qkv_bias == (arch == "qwen2")
    assert spec.qk_norm == (arch == "qwen3")
    assert param_counts(spec)["total"] == _hf_meta_params(AutoConfig.from_pretrained(tiny_models[arch]))


def test_qwen3_14b_param_count(qwen3_14b):
    from transformers import AutoConfig

    n = param_counts(qwen3_14b)["total"]
    assert n == _hf_meta_params(AutoConfig.from_pretrained(QWEN3_14B)) == 14_768_307_200
    # the shards of every layout add up to the model (the output layer is separate from the embedding)
    for tp, pp in ((1, 1), (8, 1), (2, 4), (4, 5)):
        shards = [stage_params(qwen3_14b, tp, pp, s) for s in range(pp)]
        replicated_per_rank = 40 // pp * (2 * 5120 + 2 * 128)  # norms on every TP rank
        assert sum(shards) * tp - (tp - 1) * (pp * replicated_per_rank + 5120) == n
    # one token more: at TP=8 each rank's embedding and output shard grow by one (padded) row
    odd = replace(qwen3_14b, vocab=151_937)
    assert stage_params(odd, 8, 1, 0) - stage_params(qwen3_14b, 8, 1, 0) == 2 * 5120


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_match_flop_counter(tiny_models, arch):
    """Eager attention (dense s×s products) so FlopCounterMode sees QKᵀ and AV as bmm; the analytic
    count with causal=False must then be exact. FlopCounterMode counts only matmul-like ops (mm,
    addmm without its bias add, bmm, sdpa kernels), like our formula: norms, RoPE, SiLU, softmax and
    residual adds are excluded by both. (On CPU the sdpa kernel is not counted at all, hence eager.)"""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_models[arch])
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = ModelSpec.from_hf(config)
    seq = 48
    ids = torch.randint(0, spec.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    measured = counter.get_total_flops()
    assert forward_flops(spec, seq, causal=False) == measured
    causal = forward_flops(spec, seq)  # what flash attention executes: half of the score products
    attention_dense = spec.layers * 4 * seq * seq * spec.q_dim
    assert measured - causal == attention_dense / 2
    assert train_flops(spec, seq, seq) == 3 * causal
    head = 2 * seq * spec.hidden * spec.vocab
    assert train_flops(spec, seq, seq, recompute=True) == 3 * causal + (causal - head)


# ---------------------------------------------------------------- memory and time


def test_distributed_optimizer_shards_optimizer_state_by_dp_exactly(qwen3_14b):
    a = Assumptions()
    base = None
    for dp, cp in ((1, 1), (2, 1), (4, 1), (16, 1), (4, 2), (2, 8)):
        lay = Layout(tp=4, pp=2, dp=dp, cp=cp, micro_batch_tokens=40960, distributed_optimizer=True)
        mem = stage_memory(qwen3_14b, A800, lay, LONG, a, stage=0)
        full = stage_memory(qwen3_14b, A800, replace(lay, distributed_optimizer=False), LONG, a, stage=0)
        # fp32 master + Adam m, v = 12 bytes/param, split over the dp·cp group
        assert mem.optimizer * dp * cp == full.optimizer == 12 * mem.params
        assert mem.weights == full.weights == 2 * mem.params and mem.grads == full.grads == 4 * mem.params
        base = base or mem.weights
        assert mem.weights == base  # DP/CP replicate the weights


def test_recompute_lowers_activation_memory_and_costs_compute(qwen3_14b):
    a = Assumptions()
    for lay in (Layout(tp=8, pp=1, dp=16, micro_batch_tokens=40960),
                Layout(tp=4, pp=4, dp=8, micro_batch_tokens=40960)):
        off, on = peak_memory(qwen3_14b, A800, lay, LONG, a), peak_memory(
            qwen3_14b, A800, replace(lay, recompute=True), LONG, a)
        assert on.activations < off.activations / 5
        t_off, t_on = step_time(qwen3_14b, A800, lay, LONG, a), step_time(
            qwen3_14b, A800, replace(lay, recompute=True), LONG, a)
        assert 1.2 < t_on.compute / t_off.compute < 4 / 3  # the layers' forward again, not the output layer


def test_pipeline_first_stage_holds_all_layers_of_activations(qwen3_14b):
    """1F1B: stage 0 keeps p micro-batches of L/p layers = one micro-batch of the whole model."""
    a = Assumptions()
    flat = stage_memory(qwen3_14b, A800, Layout(tp=8, pp=1, dp=16, micro_batch_tokens=40960), LONG, a, 0)
    piped = Layout(tp=8, pp=4, dp=4, micro_batch_tokens=40960)
    assert stage_memory(qwen3_14b, A800, piped, LONG, a, 0).activations == pytest.approx(flat.activations)
    last = stage_memory(qwen3_14b, A800, piped, LONG, a, 3)
    assert last.activations == pytest.approx(flat.activations / 4) and last.logits > 0
    # more micro-batch tokens, more activations; CP splits them
    double = Layout(tp=8, pp=1, dp=8, micro_batch_tokens=81920)
    assert stage_memory(qwen3_14b, A800, double, LONG, a, 0).activations == pytest.approx(2 * flat.activations)
    assert stage_memory(qwen3_14b, A800, replace(double, cp=2, dp=4), LONG, a, 0).activations == pytest.approx(
        flat.activations)


def test_step_time_terms(qwen3_14b):
    a = Assumptions()
    lay = Layout(tp=8, pp=4, dp=4, micro_batch_tokens=40960)
    t = step_time(qwen3_14b, A800, lay, LONG, a)
    m = LONG.micro_batches(lay)
    assert m == 32 and t.bubble_fraction == pytest.approx(3 / 35)
    assert t.bubble / (t.total - t.dp_comm) == pytest.approx(3 / 35)
    assert t.tp_comm > 0 and t.pp_p2p > 0 and t.dp_comm > 0 and t.cp_comm == 0
    # TP inside a node rides NVLink; a DP ring with one member per node shares the node's NICs
    assert group_bandwidth(A800, 8, 1, a) == pytest.approx(200e9 * 0.8)
    assert group_bandwidth(A800, 16, 8, a) == pytest.approx(100e9 / 8 * 0.8)
    no_overlap = step_time(qwen3_14b, A800, lay, LONG, a).dp_comm
    assert step_time(qwen3_14b, A800, lay, LONG, replace(a, dp_exposed_fraction=0.25)).dp_comm == pytest.approx(
        no_overlap / 4)
    pred = predict(qwen3_14b, A800, lay, LONG, a)
    assert pred.tokens_per_s == pytest.approx(LONG.global_batch_tokens / t.total) and 0 < pred.mfu < a.mfu


def test_fixed_costs_add_hand_counted_latencies_and_overheads(qwen3_14b):
    """collective_latency_us / layer_overhead_ms add exactly alpha x (collectives counted by hand) and
    overhead x layers x micro-batches (x 4/3 with recompute), and nothing else changes."""
    a = Assumptions(sequence_parallel=False)
    work = Workload(seq_len=4096, global_batch_tokens=8 * 4096)
    fixed = replace(A800, collective_latency_us=100.0, layer_overhead_ms=2.0)
    alpha, ovh, L = 100e-6, 2e-3, qwen3_14b.layers
    # TP=2, one stage, one DP rank: per micro-batch 4 all-reduces per layer + embedding + output layer
    lay = Layout(tp=2, pp=1, dp=1, micro_batch_tokens=4096)
    base, t = step_time(qwen3_14b, A800, lay, work, a), step_time(qwen3_14b, fixed, lay, work, a)
    assert t.micro_batches == 8 and base.overhead == 0
    assert t.tp_comm - base.tp_comm == pytest.approx(8 * (4 * L + 2) * alpha)
    assert t.overhead == pytest.approx(8 * L * ovh)
    assert (t.compute, t.dp_comm, t.pp_p2p) == (base.compute, base.dp_comm, base.pp_p2p)
    # recompute: 2 more TP collectives per layer and one more forward (4/3 of the dispatch)
    rc = replace(lay, recompute=True)
    t_rc, base_rc = step_time(qwen3_14b, fixed, rc, work, a), step_time(qwen3_14b, A800, rc, work, a)
    assert t_rc.tp_comm - base_rc.tp_comm == pytest.approx(8 * (6 * L + 2) * alpha)
    assert t_rc.overhead == pytest.approx(8 * L * ovh * 4 / 3)
    # PP=2, DP=2: 1 send per micro-batch on each stage; the bubble repeats the slot's fixed costs;
    # DP with the distributed optimizer: one reduce-scatter + one all-gather
    lay = Layout(tp=1, pp=2, dp=2, micro_batch_tokens=4096)
    base, t = step_time(qwen3_14b, A800, lay, work, a), step_time(qwen3_14b, fixed, lay, work, a)
    m = t.micro_batches
    assert m == 4 and t.pp_p2p - base.pp_p2p == pytest.approx(m * alpha)
    assert t.overhead == pytest.approx(m * L / 2 * ovh)
    assert t.dp_comm - base.dp_comm == pytest.approx(2 * alpha * a.dp_exposed_fraction)
    assert t.bubble - base.bubble == pytest.approx((alpha + L / 2 * ovh))  # (p - 1) = 1 slot


def test_calibration_sets_the_probed_constants():
    from megatron_matpo.planner.calibrate import LARGE_BYTES, calibrated

    a = Assumptions()
    probe = {"effective_tflops": 0.05, "fixed_per_micro_batch_s": 0.008, "layers": 4, "world": 2,
             "all_reduce_small_s": 0.0005, "all_reduce_large_s": 0.0005 + LARGE_BYTES / 1e9}
    c = calibrated(PRESETS["cpu-tiny"], probe, a)
    assert c.peak_tflops * a.mfu == pytest.approx(0.05) and c.layer_overhead_ms == pytest.approx(2.0)
    assert c.collective_latency_us == pytest.approx(500)
    # the model's all-reduce of LARGE_BYTES on 2 ranks then takes what the probe measured
    from megatron_matpo.planner.cost import all_reduce_time
    bw = group_bandwidth(c, 2, 1, a)
    assert all_reduce_time(LARGE_BYTES, 2, bw) + c.collective_latency_us * 1e-6 == pytest.approx(
        probe["all_reduce_large_s"])
    assert c.concurrent_compute_factor == 1.0  # no busy-ranks measurement: unchanged
    # both ranks busy: 0.1 s of compute alone (0.108 - 0.008 fixed) takes 0.125 s at once -> factor 1.25;
    # the TP=2 step: (0.1 x 1.25) / 2 compute + 0.008 fixed + 18 collectives (4 per layer + 2) of
    # 1 row x 256 tokens x hidden 64 fp32, plus 18 x 2 ms latency -> alpha = 2 ms
    busy = {**probe, "micro_batch_s": [0.108, 0.3], "rows": [1, 4], "seq_len": 256, "hidden": 64,
            "concurrent_micro_batch_s": 0.008 + 0.125}
    achieved = 2 * 1 / 2 * LARGE_BYTES / (probe["all_reduce_large_s"] - probe["all_reduce_small_s"])
    per_bytes = 1 / 2 * 2 * 256 * 64 * 4 / achieved
    busy["tp_micro_batch_s"] = 0.125 / 2 + 0.008 + 18 * (per_bytes + 0.002)
    c = calibrated(PRESETS["cpu-tiny"], busy, a)
    assert c.concurrent_compute_factor == pytest.approx(1.25) and c.collective_latency_us == pytest.approx(2000)
    # the factor applies to layouts of several ranks only
    spec, work = ModelSpec.from_hf(str(QWEN3_14B)), Workload(seq_len=256, global_batch_tokens=1024)
    one, two = Layout(tp=1, pp=1, dp=1, micro_batch_tokens=256), Layout(tp=1, pp=1, dp=2, micro_batch_tokens=256)
    flat = replace(c, concurrent_compute_factor=1.0)
    assert step_time(spec, c, one, work, a).compute == step_time(spec, flat, one, work, a).compute
    assert step_time(spec, c, two, work, a).compute == pytest.approx(1.25 * step_time(spec, flat, two, work, a).compute)


# ---------------------------------------------------------------- validation and search


def test_invalid_layouts_rejected_with_reasons(qwen3_14b):
    assert parallel_problems(qwen3_14b, A800, tp=3, pp=1, cp=1) == [
        "tp=3 does not divide num_attention_heads=40", "tp=3 does not divide num_key_value_heads=8",
        "tp=3 does not divide intermediate_size=17408"]  # the vocabulary is padded to a multiple of TP
    assert "tp=16 spans nodes (gpus_per_node=8)" in parallel_problems(qwen3_14b, A800, 16, 1, 1)
    assert parallel_problems(qwen3_14b, A800, 8, 3, 1) == ["pp=3 does not divide num_hidden_layers=40"]
    assert parallel_problems(qwen3_14b, PRESETS["cpu-tiny"], 1, 1, 2) == []  # our attention does CP without TE
    assert parallel_problems(qwen3_14b, A800, 8, 8, 4) == []

    valid, rejected = enumerate_layouts(qwen3_14b, A800, LONG, gpus=96)
    assert valid and all(v.world == 96 for v in valid)
    assert all(40 % v.tp == 0 and 8 % v.tp == 0 and 40 % v.pp == 0 and v.tp <= 8 for v in valid)
    reasons = {r for rej in rejected for r in rej.reasons}
    assert "tp=3 does not divide num_attention_heads=40" in reasons
    assert "tp=12 spans nodes (gpus_per_node=8)" in reasons
    assert "pp=3 does not divide num_hidden_layers=40" in reasons
    _, short = enumerate_layouts(qwen3_14b, A800, LONG, micro_batch_tokens=[20480], tp=[8], pp=[1], cp=[1])
    assert any("a row cannot be split" in r for r in short[0].reasons)
    with pytest.raises(ValueError, match="exceeds"):
        enumerate_layouts(qwen3_14b, A800, LONG, gpus=256)


def test_plan_ranks_fitting_layouts_by_step_time(qwen3_14b):
    result = plan(qwen3_14b, A800, LONG)
    times = [p.time.total for p in result.ranked]
    assert times == sorted(times) and len(result.ranked) > 20
    budget = A800.gpu_memory_gib * GIB * 0.9
    assert all(p.memory.total <= budget for p in result.ranked)
    assert all(p.memory.total > budget for p in result.over_memory)
    # the whole unsharded 14.8B model with fp32 grads and Adam cannot fit one 80 GB GPU
    assert not any(p.layout.tp == 1 and p.layout.pp == 1 for p in result.ranked)


def test_cluster_yaml_matches_preset(tmp_path):
    import yaml

    fields = {k: v for k, v in A800.to_dict().items() if k != "description"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(fields))
    assert load_cluster(str(path)) == replace(A800, description="")
    path.write_text(yaml.safe_dump({**fields, "nvlink": 1}))
    with pytest.raises(ValueError, match="unknown cluster fields"):
        load_cluster(str(path))


def test_rank_agreement_statistics():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [10, 20, 30, 40, 50]) == pytest.approx(1.0) and kendall(x, x[::-1]) == pytest.approx(-1.0)
    y = [2.0, 1.0, 3.0, 3.0, 5.0]  # a swap and a tie
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert kendall(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    agree = compare_rankings([{"key": "a", "step_time_s": 1.0}, {"key": "b", "step_time_s": 2.0}],
                             [{"key": "b", "step_time_s": 0.5}, {"key": "a", "step_time_s": 0.7}, {"key": "z"}])
    assert agree["n"] == 2 and agree["spearman"] == pytest.approx(-1.0)


# ---------------------------------------------------------------- CLI


def test_cli_ranks_qwen3_14b_on_a800(tmp_path, capsys):
    from megatron_matpo.planner.command import main
    from megatron_matpo.planner.report import matplotlib_available

    out_json, out_png = tmp_path / "layouts.json", tmp_path / "layouts.png"
    rc = main(["--model", str(QWEN3_14B / "config.json"), "--cluster", "a800x128", "--seq-len", "40960",
               "--top", "5", "--plain", "--json", str(out_json), "--png", str(out_png)])
    text = capsys.readouterr().out
    assert rc == 0
    lines = text.splitlines()
    assert lines[0].startswith("Qwen3ForCausalLM (14.768B params) on a800x128: 128 of 128 GPUs")
    header = lines[1].split()
    assert header[:6] == ["#", "TP", "SP", "PP", "CP", "DP"]
    ranks = [line.split()[0] for line in lines[3:8]]
    assert ranks == ["1", "2", "3", "4", "5"]
    doc = json.loads(out_json.read_text())
    assert doc["params"]["total"] == 14_768_307_200 and doc["cluster"]["name"] == "a800x128"
    top = doc["ranked"][:5]
    assert [p["step_time_s"] for p in top] == sorted(p["step_time_s"] for p in top)
    for p in top:
        assert p["fits"] and p["memory"]["total_gib"] <= 80 * 0.9
        assert p["layout"]["tp"] * p["layout"]["pp"] * p["layout"]["cp"] * p["layout"]["dp"] == 128
    assert doc["rejected"] and doc["over_memory"]
    if matplotlib_available():
        assert out_png.stat().st_size > 0
    else:
        assert not out_png.exists() and "matplotlib is not installed" in text


def test_cli_calibrates_on_this_machine(tiny_models, tmp_path, capsys):
    """`--calibrate`: a real probe (2 gloo ranks) writes a cluster YAML with the measured constants,
    which `--cluster FILE` loads back; a GPU preset is refused on a CPU machine before any process starts."""
    from megatron_matpo import platform
    from megatron_matpo.planner.command import main

    hf, cal = tiny_models["qwen3"], tmp_path / "cal.yaml"
    common = ["--model", hf, "--seq-len", "64", "--global-batch-tokens", "512", "--no-sequence-parallel",
              "--plain", "--json", str(tmp_path / "l.json"), "--png", str(tmp_path / "l.png")]
    if not platform.capabilities().cuda:
        assert main(common + ["--cluster", "a800x128", "--calibrate", str(cal)]) == 2
        assert "--cluster a800x128 describes bf16 GPUs" in capsys.readouterr().err and not cal.exists()
    assert main(common + ["--cluster", "cpu-tiny", "--calibrate", str(cal)]) == 0
    c = load_cluster(str(cal))
    base = PRESETS["cpu-tiny"]
    assert c.name == "cpu-tiny-calibrated" and c.collective_latency_us > 0 and c.layer_overhead_ms > 0
    assert c.peak_tflops > 0 and c.nvlink_gbs > 0 and (c.nodes, c.gpus_per_node) == (base.nodes, base.gpus_per_node)
    doc = json.loads((tmp_path / "l.json").read_text())
    assert doc["cluster"]["collective_latency_us"] == c.collective_latency_us
    assert all(p["time"]["overhead"] > 0 for p in doc["ranked"])
    assert "calibrated cluster written to" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen3_14b_matpo", "qwen3_14b_single_agent"])
def test_qwen3_14b_configs_use_the_best_layout_the_trainer_runs(tmp_path, capsys, name):
    """The cluster configs' actor layout is the planner's first (the builder runs every layout it ranks: CP
    and sequence parallelism included), and the memory and step time their comment states are its predictions."""
    import re

    import yaml

    from megatron_matpo.planner.command import main

    text = (REPO / "configs" / f"{name}.yaml").read_text()
    actor = yaml.safe_load(text)["actor"]
    out = tmp_path / "layouts.json"
    assert main(["--model", str(QWEN3_14B / "config.json"), "--cluster", "a800x128", "--seq-len", "40960",
                 "--plain", "--json", str(out)]) == 0
    capsys.readouterr()
    best = json.loads(out.read_text())["ranked"][0]
    lay = best["layout"]
    assert (lay["tp"], lay["pp"], lay["cp"], lay["sp"]) == (
        actor["tp"], actor["pp"], actor.get("cp", 1), actor.get("sequence_parallel", False)), best
    assert actor["dp"] == 0 and lay["dp"] == 128 // (lay["tp"] * lay["pp"] * lay["cp"]), best  # dp fills the cluster
    assert lay["recompute"] == (actor["recompute"] == "full") and lay["micro_batch_tokens"] == actor[
        "max_tokens_per_micro_batch"]
    stated = re.search(r"predicts ([\d.]+) GiB per GPU and\n# ([\d.]+) s per optimizer step", text)
    assert stated and float(stated.group(1)) == round(best["memory"]["total_gib"], 1), best["memory"]
    assert float(stated.group(2)) == round(best["step_time_s"], 1)


# ---------------------------------------------------------------- measured mode


@pytest.mark.slow
def test_measured_mode_on_tiny_model(tiny_models):
    """Real Megatron steps (gloo, 2 processes) for three layouts of the tiny Qwen2 (tied embeddings,
    q/k/v bias): every rank's parameter count equals the analytic shard, and the runs report time,
    throughput and memory."""
    from megatron_matpo.planner.measure import measure_layouts

    hf = tiny_models["qwen2"]
    spec = ModelSpec.from_hf(hf)
    layouts = [Layout(tp=1, pp=1, dp=2, micro_batch_tokens=128),
               Layout(tp=2, pp=1, dp=1, micro_batch_tokens=128, recompute=True),
               Layout(tp=1, pp=2, dp=1, micro_batch_tokens=128, distributed_optimizer=False)]
    measured = measure_layouts(hf, layouts, tokens_per_step=256, steps=1, seq_len=64)
    assert [m["key"] for m in measured] == [lay.key for lay in layouts]
    for lay, m in zip(layouts, measured):
        for r in m["params_per_rank"]:
            assert r["params"] == stage_params(spec, lay.tp, lay.pp, r["pp_rank"]), (lay.key, r)
        assert m["tokens_per_step"] == 256 and m["step_time_s"] > 0 and m["tokens_per_s"] > 0
        assert m["peak_memory_gib"] > 0 and math.isfinite(m["loss"])
    assert measured[0]["params_per_rank"][0]["params"] == param_counts(spec)["total"]  # TP=1 holds the model

    cluster = PRESETS["cpu-tiny"]
    work = Workload(seq_len=64, global_batch_tokens=256)
    a = Assumptions(sequence_parallel=False)
    predicted = [predict(spec, cluster, lay, work, a) for lay in layouts]
    agree = compare_rankings(predicted, measured)
    assert agree["n"] == 3 and -1.0 <= agree["spearman"] <= 1.0 and -1.0 <= agree["kendall"] <= 1.0
