"""RunLogger: the same scalars at the same steps in metrics.jsonl, tensorboard and (offline, no network)
Weights & Biases; wandb settings refused before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_matpo.train.config import WandbSection
from tests.e2e import wandb_history


def test_wandb_offline_gets_the_scalars_of_metrics_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_matpo.train.logger import RunLogger

    run = tmp_path / "run"
    log = RunLogger(run, wandb=WandbSection(enabled=True),
                    config={"loss": {"agg": "token-mean"}, "api_key": "<redacted>"})
    steps = {1: {"reward/mean": 0.25, "actor/grad_norm": 1.5}, 2: {"reward/mean": 0.75, "actor/grad_norm": 0.5}}
    for step, m in steps.items():
        log.log(step, m)
    log.close()
    jsonl = {d["step"]: {k: v for k, v in d.items() if k not in ("step", "time")}
             for d in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    history, config = wandb_history(run)
    assert jsonl == steps and history == steps
    assert config["loss"] == {"agg": "token-mean"} and config["api_key"] == "<redacted>", config
    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert {s: tb.Scalars("reward/mean")[i].value for i, s in enumerate(steps)} == {1: 0.25, 2: 0.75}


def test_wandb_settings_refused_before_anything_starts(tmp_path, monkeypatch):
    from megatron_matpo import config
    from megatron_matpo.config import ConfigError
    from megatron_matpo.train.config import TrainConfig

    root = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from a `wandb login`
    for ov, why in ((["logger.wandb.mode=cloud"], "logger.wandb.mode: must be offline or online, got 'cloud'"),
                    (["logger.wandb.mode=online"], "logger.wandb.mode: online needs WANDB_API_KEY or `wandb login`")):
        with pytest.raises(ConfigError, match="^" + why.replace("(", r"\(").replace(")", r"\)")):
            config.load(TrainConfig, root / "configs/tiny_cpu.yaml",
                        [f"run_dir={tmp_path}/run", "logger.wandb.enabled=true", *ov]).validate()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    config.load(TrainConfig, root / "configs/tiny_cpu.yaml",
                [f"run_dir={tmp_path}/run", "logger.wandb.enabled=true", "logger.wandb.mode=online"]).validate()


def test_closing_eval_line_pairs_each_source_before_and_after():
    """`matpo train`'s closing line: each eval source scored before step 1 and at the last step."""
    from megatron_matpo.train.summary import eval_line

    before = {"eval/multihop/accuracy": 0.25, "eval/multihop/questions": 32.0, "eval/multihop/rollouts": 64.0,
              "eval/multihop/avg@2": 0.25, "eval1/other/accuracy": 0.5, "reward/mean": 0.1}
    after = {"eval/multihop/accuracy": 0.40625, "eval/multihop/questions": 32.0, "reward/accuracy": 0.3}
    assert eval_line(before, after) == "eval accuracy multihop 0.250 -> 0.406 (+0.156; 32 questions x 2)"
    assert eval_line(before, before, rise=False) == ("eval accuracy multihop 0.250 (32 questions x 2); "
                                                     "eval1/other 0.500 (0 questions x 0)")
    assert eval_line({}, after) is None and eval_line(before, {}) is None


def test_startup_summary_says_how_eval_samples(tiny_models):
    """The data line names the eval set, when it runs and how it samples (greedy, a temperature, or the
    rollouts' own)."""
    from megatron_matpo import config
    from megatron_matpo.train.config import TrainConfig
    from megatron_matpo.train.summary import startup_summary

    root = Path(__file__).resolve().parents[1]
    base = ["run_dir=r", f"model={tiny_models['qwen3']}", "eval.data=v", "eval.every=6"]
    lines = {t: next(x for x in startup_summary(config.load(TrainConfig, root / "configs/tiny_cpu.yaml",
                                                            base + ([f"eval.temperature={t}"] if t is not None else [])),
                                                ).splitlines() if " data " in x)
             for t in (None, 0, 0.7)}
    assert lines[None].endswith("(eval: v every 6 steps)"), lines
    assert lines[0].endswith("(eval: v every 6 steps, greedy)") and lines[0.7].endswith("temperature 0.7)"), lines
