import inspect
import os
import threading
from concurrent.futures import Future
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
def odd_vocab_model(tiny_models, tmp_path_factory) -> str:
    """The tiny Qwen3 after `resize_token_embeddings` to an odd size (one token added), as after SFT with
    an added token: no TP > 1 divides its vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = tiny_models["qwen3"], tmp_path_factory.mktemp("odd-vocab")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    size = model.config.vocab_size + (1 if model.config.vocab_size % 2 == 0 else 2)
    model.resize_token_embeddings(size, mean_resizing=False)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


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

    # a fixed KV pool, as the CPU configs have: sized from the free host memory it failed ("Loaded weights leave
    # no GPU memory for the KV cache") while the MATPO world, starting beside it, took memory during the profile
    cfg = EngineConfig(model_path=tiny_models["qwen3"], log_dir=str(tmp_path_factory.mktemp("engine-logs")),
                       mem_fraction_static=0.5, max_total_tokens=262144)
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
    ov = [f"model={root}/tiny-qwen3", f"data={root}/multihop/matpo_train_multihop",
          f"corpus={root}/multihop/corpus.jsonl",
          f"eval.data={root}/multihop/matpo_val_multihop_repeat_2"]
    ensure_inputs(config.load(TrainConfig, REPO / "configs/tiny_cpu.yaml", ov))
    return ov


# --- worlds that run beside the rest of the suite -------------------------------------------------
# An end-to-end world is mostly its own processes waiting on each other (the engine decodes while the
# actor waits, then the reverse; bring-up and tear-down in between): on 2 cores a third of its time is
# idle. A world named here starts in a thread before the first test when any collected test asks for
# it, the other tests run meanwhile, and its tests take its result (they wait where it is not done).
# The function takes session fixtures by name and returns the world's record (or raises: each of its
# tests then fails with that error).
BACKGROUND = {"matpo_world": "tests.test_train:run_matpo_world"}
_WANTED = pytest.StashKey[set]()


@pytest.hookimpl(trylast=True)  # after -m / -k deselected what will not run
def pytest_collection_modifyitems(config, items):
    config.stash[_WANTED] = {w for item in items for w in BACKGROUND if w in item.fixturenames}


class Worlds:
    def __init__(self) -> None:
        self.futures: dict[str, Future] = {}

    def start(self, name: str, fn, kwargs: dict) -> None:
        fut = self.futures[name] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(**kwargs))
            except BaseException as e:  # noqa: BLE001 -- handed to the world's tests
                fut.set_exception(e)

        threading.Thread(target=run, name=f"world:{name}", daemon=True).start()

    def result(self, name: str):
        return self.futures[name].result()


@pytest.fixture(scope="session", autouse=True)
def worlds(request):
    """The background worlds of this session (BACKGROUND), started before the first test."""
    import importlib

    from tests.e2e import LIVE, kill_tree

    w = Worlds()
    for name in sorted(request.config.stash.get(_WANTED, set())):
        module, fn_name = BACKGROUND[name].split(":")
        fn = getattr(importlib.import_module(module), fn_name)
        w.start(name, fn, {arg: request.getfixturevalue(arg) for arg in inspect.signature(fn).parameters})
    yield w
    # a session that ends early (a failure with -x, ^C) leaves a world running: end its processes, then
    # let its thread see them gone (the session fixtures it uses, e.g. Slurm, are torn down after this)
    for fut in w.futures.values():
        if not fut.done():
            for p in list(LIVE):
                kill_tree(p)
            try:
                fut.result(timeout=120)
            except BaseException:  # noqa: BLE001 -- its tests already reported it, or none ran
                pass
