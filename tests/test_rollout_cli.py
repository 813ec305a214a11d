"""`matpo rollout` / `matpo eval` end to end: generated multi-hop data, the session's real SGLang
engine, a real MCP tool server started by the runner; plus the config loader."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_matpo import config
from megatron_matpo.rollout.runner import RolloutConfig


def test_config_types_and_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ndata: d\nworkflow: {mode: single, planner: {max_turns: 3}}\n")
    cfg = config.load(RolloutConfig, p, ["n_samples=3", "workflow.temperature=0.5", "engine.urls=[http://x]"])
    assert (cfg.n_samples, cfg.workflow.mode, cfg.workflow.planner.max_turns) == (3, "single", 3)
    assert cfg.workflow.temperature == 0.5 and cfg.engine.urls == ["http://x"]
    with pytest.raises(config.ConfigError, match=r"workflow.planner.max_turnz"):
        config.load(RolloutConfig, p, ["workflow.planner.max_turnz=2"])
    with pytest.raises(config.ConfigError, match=r"n_samples: expected int"):
        config.load(RolloutConfig, p, ["n_samples=many"])
    # YAML 1.1 reads "1e-2" (no dot) as a string; float fields accept it, and nothing else
    assert config.load(RolloutConfig, p, ["workflow.temperature=1e-2"]).workflow.temperature == 0.01
    with pytest.raises(config.ConfigError, match=r"workflow.temperature: expected float"):
        config.load(RolloutConfig, p, ["workflow.temperature=hot"])


@pytest.mark.slow
def test_rollout_and_eval_cli(engine, tiny_models, tmp_path):
    from megatron_matpo.data.multihop import MultihopConfig, write_multihop

    write_multihop(tmp_path / "mh", MultihopConfig(n_entities=40, n_train=8, n_val=3, val_repeat=2))
    out = tmp_path / "traces.jsonl"
    cmd = [sys.executable, "-m", "megatron_matpo.cli", "rollout", "--config", "configs/rollout_tiny_cpu.yaml",
           "--data", str(tmp_path / "mh" / "matpo_val_multihop_repeat_2"), "--out", str(out),
           f"model={tiny_models['qwen3']}", f"toolbox.corpus={tmp_path / 'mh' / 'corpus.jsonl'}",
           f"engine.urls=[{engine.url}]", "n_samples=2",
           "workflow.planner.max_tokens_per_turn=32", "workflow.worker.max_tokens_per_turn=32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    roots = [x for x in rows if x["parent_id"] is None]
    assert len(roots) == 3 * 2 * 2  # 3 questions × repeat 2 × n_samples 2
    assert all(x["role"] == "planner" and "accuracy" in x and x["reward"] is not None for x in roots)
    for x in roots:  # reward = 0.9·acc + 0.5·(0.1·fmt_planner + 0.1·mean fmt_workers)
        c = x["reward_components"]
        fw = c.get("format_worker_mean", 1.0)
        assert abs(x["reward"] - (0.9 * c["accuracy"] + 0.5 * (0.1 * c["format_planner"] + 0.1 * fw))) < 1e-9
    r = subprocess.run([sys.executable, "-m", "megatron_matpo.cli", "eval", str(out), "--json",
                        str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    (src,) = report
    assert report[src]["questions"] == 3 and report[src]["rollouts"] == 12 and "avg@4" in report[src]
