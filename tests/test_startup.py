"""What a process imports while it starts (compat's start-up trims): each trim keeps what the library
sees, and the imports it avoids stay out of a CPU rank."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import textwrap

import pytest

from megatron_matpo import compat
from megatron_matpo.rollout.engine import EngineConfig, EngineServer


def test_cached_packages_distributions_equal_the_real_ones(tmp_path, monkeypatch):
    real = {k: list(v) for k, v in md.packages_distributions().items()}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(md, "packages_distributions", md.packages_distributions)  # restored after the test
    compat.cache_packages_distributions()
    compat.cache_packages_distributions()  # idempotent: one wrapper
    assert md.packages_distributions._matpo_cached
    first = md.packages_distributions()  # computed and written
    (written,) = (tmp_path / "megatron_matpo").glob("packages_distributions-*.json")
    assert first == real
    assert md.packages_distributions() == real  # read back from the file
    # another set of path entries (e.g. an install) is another key, not a stale answer
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    (tmp_path / "extra-1.0.dist-info").mkdir()
    md.packages_distributions()
    assert len(list((tmp_path / "megatron_matpo").glob("packages_distributions-*.json"))) == 2


def test_without_modules_blocks_only_inside_and_only_what_was_not_imported(tmp_path, monkeypatch):
    (tmp_path / "matpo_probe_mod.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with compat.without_modules("matpo_probe_mod", "json"):
        with pytest.raises(ImportError):
            import matpo_probe_mod  # noqa: F401
        import json  # already imported before the block: untouched

        assert json.dumps(1) == "1"
    import matpo_probe_mod

    assert matpo_probe_mod.VALUE == 7
    del sys.modules["matpo_probe_mod"]


def test_lazy_torch_compile_compiles_on_first_call_with_the_same_options(monkeypatch):
    import torch

    real, calls = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: calls.append(kw) or real(model, **kw))
    counting = torch.compile

    def fn(x):
        return x * 2 + 1

    with compat.lazy_torch_compile():
        assert torch.compile is not counting
        lazy = torch.compile(fn, backend="eager")
        deco = torch.compile(backend="eager")(fn)
        assert calls == []  # a function: nothing compiled (nor Inductor configured) yet
        module = torch.compile(torch.nn.Linear(2, 2), backend="eager")  # not a function: compiled now
        assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule) and len(calls) == 1
    assert torch.compile is counting
    x = torch.arange(4.0)
    assert torch.equal(lazy(x), fn(x)) and torch.equal(lazy(x), fn(x)) and torch.equal(deco(x), fn(x))
    assert calls == [{"backend": "eager"}] * 3  # the module, then each function once, with its options
    assert lazy.__name__ == "fn"


def test_a_cpu_rank_imports_megatron_without_the_gpu_kernels_and_inductor():
    """A fresh interpreter does what an actor rank does first (platform.activate, then megatron-bridge):
    megatron-core, megatron-bridge and transformers are all there, flashinfer / flash_attn / wandb /
    Inductor's compiler (what `torch.compile` configures when called) are not, and a later `import wandb`
    (our logger's) still works."""
    code = textwrap.dedent("""
        import sys
        from megatron_matpo import platform
        from megatron_matpo.compat import import_auto_bridge, quiet_library_noise
        quiet_library_noise()
        platform.activate()
        AutoBridge = import_auto_bridge()
        import megatron.core.jit
        have = {m: m in sys.modules and sys.modules[m] is not None
                for m in ("megatron.core", "megatron.bridge", "transformers", "flashinfer", "flash_attn", "wandb",
                          "torch._inductor.compile_fx")}
        import wandb
        print(have, AutoBridge.__name__, wandb.__name__, megatron.core.jit.jit_fuser.__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    have = {"megatron.core": True, "megatron.bridge": True, "transformers": True, "flashinfer": False,
            "flash_attn": False, "wandb": False, "torch._inductor.compile_fx": False}
    assert out.stdout.strip().splitlines()[-1] == f"{have} AutoBridge wandb compile_on_first_call", out.stdout[-3000:]


def test_engine_command_takes_its_device_from_the_config():
    cpu = EngineServer(EngineConfig(model_path="m", device="cpu")).command()
    assert cpu[cpu.index("--device") + 1] == "cpu" and "megatron_matpo.rollout.sglang_main" in cpu
    assert "--device" not in EngineServer(EngineConfig(model_path="m", device="cuda")).command()
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        EngineConfig(model_path="m", device="gpu").on_cuda()
    env = compat.sglang_engine_env({}, cpu=True)
    assert env["SGLANG_EXTERNAL_MODEL_PACKAGE"] == compat.SERVED_MODELS_PACKAGE
    assert compat.sglang_engine_env({"SGLANG_EXTERNAL_MODEL_PACKAGE": "mine"}, cpu=False)[
        "SGLANG_EXTERNAL_MODEL_PACKAGE"] == "mine"
