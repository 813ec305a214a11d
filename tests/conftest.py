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
def engine(tiny_models, tmp_path_factory):
    """One real SGLang server on the tiny Qwen3 for the whole session (start-up dominates)."""
    from megatron_matpo.rollout.engine import EngineConfig, launch_engines

    from tests.e2e import ENGINE_THREADS

    cfg = EngineConfig(model_path=tiny_models["qwen3"], log_dir=str(tmp_path_factory.mktemp("engine-logs")),
                       cpu_threads=ENGINE_THREADS)
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


# The suite runs on two xdist workers (pytest.ini): one world alone leaves about a third of the two
# cores idle (single-threaded imports and bring-up, one engine decoding while the ranks wait). A file
# is one unit of work, so a module-scoped world is built once; the files that share the session's
# SGLang engine form one unit, so it is started once. Units are handed out longest first (seconds
# measured on the 2-core machine, fresh-clone run at bb6abd5) so the two workers finish together.
# (Our own scheduler, not `--dist loadgroup`: xdist 3.8.0 tags grouped tests by assigning
# `item._nodeid`, which pytest 9.2 no longer reads, so its groups are silently ignored.)
_SECONDS = {"test_train.py": 850, "test_maporl_train.py": 800, "test_slurm.py": 440, "test_bridge.py": 200,
            "test_megatron_parity.py": 170, "test_cli.py": 100, "test_checkpoint.py": 90}
_SHARE_ENGINE = {"test_engine.py", "test_maporl.py", "test_reward.py", "test_rollout_cli.py", "test_workflow.py"}


def _unit(file_name: str) -> str:
    return "session-engine" if file_name in _SHARE_ENGINE else file_name


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByWorld(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])

    return ByWorld(config, log)


def pytest_collection_modifyitems(config, items):
    weight = {name: 100 for name in _SHARE_ENGINE} | _SECONDS
    items.sort(key=lambda item: -weight.get(item.path.name, 0))  # stable: a file keeps its own order
