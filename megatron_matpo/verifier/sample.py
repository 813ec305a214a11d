"""A fresh sampling pass for `matpo train-verifier` (`sample:`): MAPoRL discussions of the policy on the
questions, on one SGLang engine started here and stopped after, written as a MAPoRL run writes its
transcripts (one line per turn, with the question and gold answer), so the answers are collected from
it exactly as from a training run's `rollouts/`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path


def sample_transcripts(cfg, out_dir: Path, log=print) -> Path:
    from transformers import AutoTokenizer

    from megatron_matpo import config
    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.maporl.config import MaporlSection
    from megatron_matpo.maporl.task import MaporlRollout

    s = cfg.sample
    # the run's discussion and rewards; agents share the one engine; the labels need only the gold answers
    section = config.build(MaporlSection, {**s.maporl, "models": "shared", "agent_models": None,
                                           "verifier": {"kind": "numeric", "rel_tol": cfg.rel_tol,
                                                        "abs_tol": cfg.abs_tol}}, "sample.maporl")
    samples = list(read_dataset(s.data, limit=s.max_questions))
    if s.toy_answer is not None:
        samples = [dataclasses.replace(x, ground_truth=s.toy_answer) for x in samples]
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    t0 = time.time()
    log(f"matpo train-verifier: sampling {s.n_samples} discussions of each of {len(samples)} questions with "
        f"{cfg.model} on one engine")
    from megatron_matpo.rollout.engine import launch_engines

    (server,) = launch_engines(s.engine.engine_config(cfg.model, 1, str(out_dir / "logs"), cfg.seed), 1)
    try:
        task = MaporlRollout(section, [tok], [[server.url]], s.n_samples)
        path = out_dir / "samples.jsonl"
        m = task.rollout(samples, path, "sample:", cfg.seed).metrics
    finally:
        server.stop()
    log(f"matpo train-verifier: {len(samples) * s.n_samples} discussions in {time.time() - t0:.0f}s, final-round "
        f"accuracy {m['maporl/accuracy_final']:.3f} -> {path}")
    return path
