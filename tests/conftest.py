import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("qwen3", "qwen2", "llama")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3 / Qwen2 (qkv bias, tied embeddings) / Llama HF directories sharing one tokenizer."""
    from megatron_matpo.model.tiny import make_tiny_model, synthetic_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(synthetic_corpus())
    return {a: str(make_tiny_model(root / a, a, tokenizer=tok)) for a in ARCHS}


@pytest.fixture(scope="session")
def slurm_or_none():
    """A real local Slurm for the session (its env), shared by tests/test_slurm.py and the MATPO world
    of tests/test_train.py; None where it cannot run (no root, no packages)."""
    from tests.e2e import slurm_missing, start_slurm, stop_slurm

    if slurm_missing():
        yield None
        return
    root = Path(f"/tmp/matpo-slurm-{os.getpid()}")
    env = start_slurm(root)
    try:
        yield env
    finally:
        stop_slurm(root, env)


@pytest.fixture
def slurm(slurm_or_none):
    from tests.e2e import slurm_missing

    if slurm_or_none is None:
        pytest.skip(slurm_missing())
    return slurm_or_none


@pytest.fixture(scope="session")
def engine(tiny_models, tmp_path_factory):
    """One real SGLang server on the tiny Qwen3 for the whole session (start-up dominates)."""
    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    cfg = EngineConfig(model_path=tiny_models["qwen3"], log_dir=str(tmp_path_factory.mktemp("engine-logs")))
    (server,) = launch_engines(cfg, 1)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> list[str]:
    """Overrides pointing a config at one bootstrapped tiny model + multi-hop set."""
    from megatron_matpo import config
    from megatron_matpo.train.bootstrap import ensure_inputs
    from megatron_matpo.train.config import TrainConfig

    root = tmp_path_factory.mktemp("train-inputs")
    ov = [f"model={root}/tiny-qwen3", f"data={root}/multihop/matpo_train_multihop", f"corpus={root}/multihop/corpus.jsonl",
          f"eval.data={root}/multihop/matpo_val_multihop_repeat_2"]
    ensure_inputs(config.load(TrainConfig, REPO / "configs/tiny_cpu.yaml", ov))
    return ov
