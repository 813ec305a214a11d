"""`matpo convert` end to end through the real launcher, resharding across layouts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _matpo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_matpo.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_layout_fails_fast_with_numbers(tiny_models, tmp_path):
    r = _matpo("convert", "hf-to-megatron", tiny_models["qwen3"], str(tmp_path / "x"), "--tp", "3", timeout=120)
    assert r.returncode == 2
    assert "parallel.tp: 3 does not divide num_attention_heads=4" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing was launched or written


@pytest.mark.slow
def test_convert_reshards_tp2_to_pp2(tiny_models, tmp_path):
    from safetensors.torch import load_file

    src, ckpt, out = tiny_models["llama"], tmp_path / "ckpt", tmp_path / "hf"
    r = _matpo("convert", "hf-to-megatron", src, str(ckpt), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _matpo("convert", "megatron-to-hf", str(ckpt), str(out), "--pp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(f"{src}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# Bad training configs as a new user writes them (`matpo train <override>` on configs/tiny_cpu.yaml):
# each is refused by the launching process before Ray, an engine or a rank starts, as one line
# `matpo train: error: <field>: <why>` and exit 2. {tmp} is the test's directory.
BAD_TRAIN_CONFIGS = [
    (["actor.tp=3"], "actor.tp", "3 does not divide num_attention_heads=4"),
    (["actor.pp=3"], "actor.pp", "3 does not divide num_hidden_layers="),
    (["actor.tp=two"], "actor.tp", "expected int"),
    (["sync.bucket_mb=0"], "sync.bucket_mb", "must be > 0"),
    (["sync.timeout_s=-1"], "sync.timeout_s", "must be > 0"),
    (["rollout.workflow.planner.max_turns=-1"], "rollout.workflow.planner.max_turns", "must be > 0"),
    (["rollout.workflow.worker.max_tokens_per_turn=0"], "rollout.workflow.worker.max_tokens_per_turn", "must be > 0"),
    (["rollout.workflow.planner.max_context_tokens=0"], "rollout.workflow.planner.max_context_tokens", "must be > 0"),
    (["actor.max_tokens_per_micro_batch=-5"], "actor.max_tokens_per_micro_batch", "must be > 0"),
    (["rollout.workflow.top_p=0"], "rollout.workflow.top_p", "must be in (0, 1]"),
    (["rollout.workflow.temperature=-1"], "rollout.workflow.temperature", "must be >= 0"),
    (["eval.temperature=-0.5"], "eval.temperature", "must be >= 0 (or null: the rollouts' temperature)"),
    (["loss.clip_low=-0.1"], "loss.clip_low", "must be >= 0"),
    (["optim.lr=-1"], "optim.lr", "must be >= 0"),
    (["rollout.engine.urls=[http://127.0.0.1:1]"], "rollout.engine.urls", "training starts its own engines"),
    (["actor.dp=0"], "actor.dp", "0 (fill the cluster) needs orchestrate.nodes"),
    (["orchestrate.nodes=1", "orchestrate.gpus_per_node=8", "actor.tp=2", "actor.dp=4"], "actor.dp",
     "= 8 GPUs but the allocation has 7 for actors"),
    (["no_such_key=1"], "no_such_key", "unknown config key"),
    (["model={tmp}/a/path/that/does/not/exist"], "model", "does not exist (bootstrap builds a tiny"),
    (["model={tmp}/empty"], "model", "is not an HF model directory (no config.json)"),
    (["model={tmp}/corrupt"], "model", "config.json cannot be read"),
    (["data={tmp}/no-data"], "data", "does not exist"),
    (["actor.dp=3", "orchestrate.num_cpus=2"], "orchestrate.num_cpus", "2 logical CPUs for 8 bundles of 1 CPU"),
    (["async.max_staleness=1", "orchestrate.colocate=true", "sync.mode=tensor"], "async.max_staleness",
     "needs engines on their own devices"),
    (["async.max_staleness=-1"], "async.max_staleness", "must be >= 0"),
    (["loss.off_policy.mode=is"], "loss.off_policy", "mode must be one of"),
    (["dynamic_sampling.max_draws=0"], "dynamic_sampling.max_draws", "must be > 0"),
    (["algorithm=maporl", "loss.agg=rollout-mean-token-mean"], "loss.agg", "MAPoRL rows are per agent turn"),
    (["loss.agg=rollout-mean"], "loss", "unknown loss aggregation"),
]


@pytest.mark.parametrize("overrides,field,why", BAD_TRAIN_CONFIGS, ids=[f"{k}-{c[1]}" for k, c in enumerate(BAD_TRAIN_CONFIGS)])
def test_bad_train_config_is_one_line_before_anything_starts(overrides, field, why, tiny_models, tmp_path, capsys):
    import ray

    from megatron_matpo.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    (tmp_path / "data.parquet").write_bytes(b"")  # paths only: nothing is read before the checks pass
    (tmp_path / "corpus.jsonl").write_text("")
    inputs = [f"model={tiny_models['qwen3']}", f"data={tmp_path}/data.parquet", f"corpus={tmp_path}/corpus.jsonl"]
    run_dir = tmp_path / "run"
    # the pipeline's config, not the embedded default's (whose eval set exists only once it was bootstrapped)
    rc = main(["train", "--config", str(REPO / "configs/tiny_cpu.yaml"), *inputs, f"run_dir={run_dir}",
               *(o.format(tmp=tmp_path) for o in overrides)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.splitlines() == [err.strip()] and err.startswith(f"matpo train: error: {field}: "), err
    assert why in err, err
    assert not run_dir.exists() and not ray.is_initialized()  # nothing was written or started


def test_bad_train_config_from_a_fresh_process(tiny_models, tmp_path):
    """As a user types it: a separate `matpo train` process, exit 2, the one line, no traceback."""
    (tmp_path / "corpus.jsonl").write_text("")
    r = _matpo("train", "--config", str(REPO / "configs/tiny_cpu.yaml"), f"run_dir={tmp_path}/run",
               f"model={tiny_models['qwen3']}", f"data={tmp_path}",
               f"corpus={tmp_path}/corpus.jsonl", "actor.tp=3", timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.strip().splitlines() == [f"matpo train: error: actor.tp: 3 does not divide num_attention_heads=4 "
                                            f"of Qwen3ForCausalLM (model: {tiny_models['qwen3']})"], r.stderr
    assert not (tmp_path / "run").exists()
