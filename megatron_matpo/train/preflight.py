"""The checks of a training job that need its inputs on disk: run after bootstrap has written what it
may write and before any process (Ray, engines, ranks) starts.

Each policy's model directory must hold a readable HF `config.json`, which the actor's layout must
divide (heads, KV heads, FFN, layers, vocabulary); the data, eval (when on) and local-corpus paths
must exist; a local Ray cluster of `orchestrate.num_cpus` CPUs must fit the placement.
A failure is one `ConfigError("<field>: <why>")`; reading a few JSON files keeps this well under a
second, so a typo costs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from megatron_matpo.config import ConfigError
from megatron_matpo.model.layout import LayoutError
from megatron_matpo.model.rope import check_rope
from megatron_matpo.train.config import TrainConfig


def read_hf_config(key: str, path: str) -> SimpleNamespace:
    """The `config.json` of the HF directory at `path` (named `key` in the job's config), or a ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory (an HF model directory with config.json)")
    cfg = p / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} is not an HF model directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {cfg} cannot be read: {e}") from None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    missing = [f for f in ("num_attention_heads", "num_hidden_layers", "intermediate_size") if f not in text]
    if missing:
        raise ConfigError(f"{key}: {cfg} lacks {', '.join(missing)} (not a decoder LM config)")
    return SimpleNamespace(**{**text, "architectures": data.get("architectures")})


def _models(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(field, HF directory) of every model the job builds: each policy, and the critics' initial model."""
    if cfg.algorithm == "maporl" and cfg.maporl.agent_models:
        models = [(f"maporl.agent_models[{k}]", m) for k, m in enumerate(cfg.maporl.agent_models)]
    else:
        models = [("model", cfg.model)]
    if cfg.advantage.estimator == "gae" and cfg.critic.model:
        models.append(("critic.model", cfg.critic.model))
    return models


def preflight(cfg: TrainConfig) -> None:
    for key, path in _models(cfg):
        hf = read_hf_config(key, path)
        try:
            cfg.actor.layout.validate(hf, section="actor")
            check_rope(vars(hf))
        except LayoutError as e:
            raise ConfigError(f"{e} (model: {path})") from None
    if not Path(cfg.data).exists():
        raise ConfigError(f"data: {cfg.data} does not exist")
    evals = [] if not cfg.eval.every else [cfg.eval.data] if isinstance(cfg.eval.data, str) else list(cfg.eval.data)
    for k, path in enumerate(evals):
        if not Path(path).exists():
            raise ConfigError(f"eval.data{'' if isinstance(cfg.eval.data, str) else f'[{k}]'}: {path} does not exist")
    _check_verifier(cfg)
    _check_local_cluster(cfg)
    tb = cfg.rollout.toolbox
    corpus = cfg.corpus or tb.corpus
    if cfg.algorithm == "matpo" and tb.backend == "local" and not tb.url:
        if not corpus:
            raise ConfigError("corpus: the local search backend needs a corpus.jsonl (or rollout.toolbox.url)")
        if not Path(corpus).is_file():
            raise ConfigError(f"{'corpus' if cfg.corpus else 'rollout.toolbox.corpus'}: {corpus} is not a file")


def _check_local_cluster(cfg: TrainConfig) -> None:
    """A local Ray cluster of `orchestrate.num_cpus` logical CPUs must hold one bundle per actor/critic
    rank, engine and tool server (else the placement group waits out `placement_timeout_s`)."""
    import os

    from megatron_matpo.orchestrate.bringup import plan_for

    o = cfg.orchestrate
    if o.num_cpus is None or o.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    plan = plan_for(cfg, gpus_per_rank=0.0)
    if plan.total("CPU") > o.num_cpus:
        raise ConfigError(f"orchestrate.num_cpus: {o.num_cpus} logical CPUs for {len(plan.bundles)} bundles of 1 CPU "
                          f"({plan.what}); raise it or leave it unset (enough for every process)")


def _check_verifier(cfg: TrainConfig) -> None:
    """MAPoRL's served score model: a one-label score model, or (`maporl.verifier.train`) a valid job that
    will train it first, its layout checked against its base model."""
    from megatron_matpo.train.bootstrap import verifier_train_config
    from megatron_matpo.verifier.export import NotAScoreModel, check_score_model

    served = cfg.maporl.verifier.served_model() if cfg.algorithm == "maporl" else None
    if served is None:
        return
    if Path(served).exists():
        try:
            check_score_model(served)
        except NotAScoreModel as e:
            raise ConfigError(f"maporl.verifier.reward_model.model_path: {e}") from None
        return
    job = verifier_train_config(cfg)
    if job is None:
        raise ConfigError(f"maporl.verifier.reward_model.model_path: {served} does not exist (set "
                          "maporl.verifier.train to train it first, or run `matpo train-verifier`)")
    try:
        from megatron_matpo.model.builder import check_layout

        check_layout(job.model, job.actor.layout)
    except LayoutError as e:
        raise ConfigError(f"maporl.verifier.train.actor: {e} (model: {job.model})") from None
