import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("qwen3", "qwen2", "llama")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny Qwen3 / Qwen2 (qkv bias, tied embeddings) / Llama HF directories sharing one tokenizer."""
    from megatron_matpo.model.tiny import make_tiny_model, synthetic_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(synthetic_corpus())
    return {a: str(make_tiny_model(root / a, a, tokenizer=tok)) for a in ARCHS}



@pytest.fixture(scope="session")
def engine(tiny_models, tmp_path_factory):
    """One real SGLang server on the tiny Qwen3 for the whole session (start-up dominates)."""
    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    cfg = EngineConfig(model_path=tiny_models["qwen3"], log_dir=str(tmp_path_factory.mktemp("engine-logs")))
    (server,) = launch_engines(cfg, 1)
    yield server
    server.stop()
