"""Workarounds for bugs in pinned third-party libraries, all in one place.

Each entry names the library version it is for; delete it when the pin moves past the bug.
(The setup-time workaround, uninstalling `sgl-flash-mla`, lives in tools/setup_venv.sh.)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
import sys
import types
from pathlib import Path


def import_auto_bridge():
    """Return megatron-bridge's `AutoBridge`.

    megatron-bridge 0.6.2: `megatron/bridge/peft/lora_layers.py` does an unconditional
    `import transformer_engine.pytorch as te` and evaluates `te.ops.Sequential` /`te.Linear` in
    annotations at import time, although conversion never touches LoRA. Where TE is not installed
    (every CPU machine), a placeholder module stands in for the duration of the import only, so
    nothing afterwards mistakes it for a real TE.
    """
    if "megatron.bridge" in sys.modules or importlib.util.find_spec("transformer_engine") is not None:
        from megatron.bridge import AutoBridge

        return AutoBridge

    from megatron_matpo import platform

    with contextlib.nullcontext() if platform.capabilities().cuda else lean_cpu_imports():
        return _import_auto_bridge_without_te()


def _import_auto_bridge_without_te():
    # Import megatron-core / megatron-training first, without the placeholder, so their own
    # "is TE installed?" probes (module-level try/import, cached TE version) see the truth.
    import megatron.core.utils
    import megatron.training.utils.common_utils  # noqa: F401
    from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401

    megatron.core.utils.get_te_version()

    class _Absent:  # distinct type: isinstance checks against it are always False
        pass

    te = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_pt.ops = types.SimpleNamespace(Sequential=_Absent)
    te_pt.Linear = te_pt.LayerNormLinear = _Absent
    te.pytorch = te_pt
    sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te_pt
    try:
        AutoBridge = _import_bridge_for(BRIDGED_MODULES)
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]
    return AutoBridge


# the model bridges we build from (model/builder.py: Qwen3, Qwen2, Llama); importing one registers it
BRIDGED_MODULES = ("megatron.bridge.models.qwen.qwen3_bridge", "megatron.bridge.models.qwen.qwen2_bridge",
                   "megatron.bridge.models.llama.llama_bridge")


def _import_bridge_for(modules: tuple[str, ...]):
    """megatron-bridge 0.6.2: `import megatron.bridge` runs `megatron/bridge/__init__.py`, which imports
    every model family's bridge, the diffusion bridges and their HF model code (~70 families; ~8 s of
    a ~24 s rank start-up on a 2-core machine, measured with -X importtime). Only the bridges of the
    architectures we build are needed: the three package `__init__`s that import everything stand as
    bare packages over their real directories (submodules import as usual), then AutoBridge and the
    listed bridges are imported. `megatron.bridge.AutoBridge` is set as the real `__init__` sets it."""
    import megatron

    root = Path(megatron.__path__[0]) / "bridge"
    stubs = {"megatron.bridge": root, "megatron.bridge.models": root / "models",
             **{m.rsplit(".", 1)[0]: root / "models" / m.split(".")[3] for m in modules}}
    for name, path in stubs.items():
        mod = types.ModuleType(name)
        mod.__path__, mod.__file__, mod.__package__ = [str(path)], str(path / "__init__.py"), name
        sys.modules[name] = mod
    for name in stubs:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[name])
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    for m in modules:
        importlib.import_module(m)
    sys.modules["megatron.bridge"].AutoBridge = AutoBridge
    return AutoBridge


# ---- start-up CPU: imports a process pays for and never uses --------------------------------------
def cache_packages_distributions() -> None:
    """transformers 5.19.0 (utils/import_utils.py) calls `importlib.metadata.packages_distributions()`
    at import. Python 3.12 answers it by reading the RECORD of every installed distribution (torch's
    and the nvidia wheels' are tens of thousands of lines): ~1.2 s of CPU in every process that imports
    transformers (the controller, each actor rank, each engine), on the critical path of bring-up on 2
    cores. The answer depends only on what is installed, so it is kept in a file keyed by the
    interpreter, `sys.path` and each path entry's distribution metadata (names and mtimes: an install,
    upgrade or removal changes the key). Idempotent; call before transformers is imported."""
    import importlib.metadata as md

    if getattr(md.packages_distributions, "_matpo_cached", False):
        return
    real = md.packages_distributions

    def cached():
        import hashlib
        import json
        import os

        key = hashlib.sha256(sys.version.encode())
        for entry in sys.path:
            key.update(entry.encode() + b"\0")
            try:
                with os.scandir(entry or ".") as it:
                    for d in sorted((d for d in it if d.name.endswith((".dist-info", ".egg-info"))),
                                    key=lambda d: d.name):
                        key.update(f"{d.name}:{d.stat().st_mtime_ns}".encode())
            except OSError:
                pass
        path = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron_matpo"
                / f"packages_distributions-{key.hexdigest()[:20]}.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        mapping = {k: list(v) for k, v in real().items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(mapping))
            os.replace(tmp, path)  # concurrent writers write the same content
        except OSError:
            pass
        return mapping

    cached._matpo_cached = True
    md.packages_distributions = cached


@contextlib.contextmanager
def lazy_torch_compile():
    """torch 2.14.1's `torch.compile(fn)` builds its Inductor configuration when it is called, which
    imports torch._inductor (~1.5 s of CPU). megatron-core 0.19.2 (`jit.jit_fuser = torch.compile`,
    applied at import to its fused activations) and sglang 0.5.23 (`moe_runner/deep_gemm.py`) decorate
    functions with it at import, functions the CPU stack never calls. Inside this block a function
    passed to `torch.compile` is compiled on its first call instead (same options, same result);
    anything else (modules, a call with no function) goes to the real `torch.compile`. Functions
    decorated inside keep the lazy wrapper after the block."""
    import functools
    import inspect

    import torch

    real = torch.compile

    def compile_on_first_call(model=None, **kwargs):
        if model is None:
            return lambda fn: compile_on_first_call(fn, **kwargs)
        if not inspect.isfunction(model):
            return real(model, **kwargs)
        box = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not box:
                box.append(real(model, **kwargs))
            return box[0](*args, **kw)

        return call

    torch.compile = compile_on_first_call
    try:
        yield
    finally:
        torch.compile = real


@contextlib.contextmanager
def lean_cpu_imports():
    """Around the imports of megatron-core and megatron-bridge in a CPU process (platform.activate,
    import_auto_bridge): their optional imports that a CPU rank never uses are skipped and their
    import-time `torch.compile` calls are deferred to a first call that never comes."""
    with without_modules("wandb", "flashinfer", "flash_attn"), lazy_torch_compile():
        yield


@contextlib.contextmanager
def without_modules(*names: str):
    """Make `import NAME` fail with ImportError inside the block (the name maps to None in sys.modules),
    for libraries that import an optional package at module level behind `try/except ImportError` and
    that we never use through it; later imports of NAME work as usual. A name already imported is
    left alone. Used by `lean_cpu_imports`:
    - wandb: megatron-core 0.19.2 `timers.py` imports it for a timers writer we never pass (~1.5 s of
      CPU per rank; our logger, in the controller, imports it when `logger.wandb` is on);
    - flashinfer: megatron-core 0.19.2 `inference/quantization/mxfp8_tensor.py` and
      `transformer/moe/experts.py`, CUDA kernels (~1.5-2 s of CPU per rank);
    - flash_attn (flash-attn-4, which sglang 0.5.23 installs): megatron-core 0.19.2
      `transformer/attention.py` probes FA4's CuTe kernels, importing cutlass, quack and torch._dynamo
      (~1.3 s of CPU per rank); CPU ranks run our own attention (model/attention.py)."""
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in added:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def sglang_cpu_pythonpath() -> str:
    """Directory to prepend to PYTHONPATH/sys.path for SGLang engines on CPU.

    SGLang 0.5.23's generic CPU path (no Intel `sgl_kernel` CPU build on PyPI) imports
    `vllm._custom_ops.rotary_embedding` for RoPE; without it the scheduler process dies and takes
    the parent down with exit 137. `compat_shims/vllm` provides just that function in pure torch.

    SGLang 0.5.23's model runner imports its debug dumper, whose Megatron plugin imports
    `megatron.core` at class definition when megatron is installed (it is here): ~4 s of CPU per
    engine start on 2 cores, for a dumper that is never enabled. `compat_shims/megatron` makes that
    import fail, so the dumper takes its "megatron absent" branch.

    SGLang 0.5.23 imports flashinfer at module level through its quantization registry (fp4_utils,
    inside `try/except ImportError`) even where `is_flashinfer_available()` is False, as on every CPU
    host: ~5 s of CPU per scheduler process on 2 cores (flashinfer, cute_dsl, cutlass). CPU engines
    never call it; `compat_shims/flashinfer` raises ImportError, so SGLang takes its fallback.
    """
    from pathlib import Path

    return str(Path(__file__).parent / "compat_shims")


def sglang_fork_children() -> None:
    """Make the SGLang server in this process fork its scheduler and detokenizer (CPU engines only).

    SGLang 0.5.23 forces the spawn start method (`mp.set_start_method("spawn", force=True)` in
    `entrypoints/engine.py` `_set_envs_and_config`), which CUDA needs. On CPU it only makes each
    child import again what the launching process has already imported (engine.py imports the
    scheduler and detokenizer modules at the top): ~20 s of CPU per child on 2 cores, the largest
    part of an engine start. A forked child inherits those modules. The fork happens before SGLang
    starts its HTTP server and tokenizer manager; I have not checked for every thread a library may
    have started by then, so the evidence is the suite: its engines start this way and their greedy
    output and logprobs equal transformers' (tests/test_engine.py). `rollout.engine.fork_children:
    false` restores spawn. Called by `megatron_matpo.rollout.sglang_main`.
    """
    import multiprocessing as mp

    set_start_method = mp.set_start_method

    def fork_instead_of_spawn(method, force=False):
        set_start_method("fork" if method == "spawn" else method, force=force)

    mp.set_start_method = fork_instead_of_spawn


def init_fresh_distributed_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its (dummy) Adam state before a checkpoint load.

    megatron-core 0.19.2: without Apex/TE (every CPU machine) `DistributedOptimizer` wraps
    `torch.optim.Adam(W)`, and its `state_dict()` reads the step from the per-parameter torch state
    (`assert len(steps) == 1`). A freshly built optimizer has no state yet, so
    `sharded_state_dict(..., is_loading=True)` fails before it can allocate the state it is about
    to load into (megatron's own dummy-state allocation runs after that `state_dict()` call). We
    run megatron's dummy step first, with lr and weight decay zeroed so no parameter moves; the
    loaded checkpoint then overwrites every state tensor and the step count.
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer.state:
            continue
        groups = opt.optimizer.param_groups
        saved = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        try:
            opt._init_optimizer_states_with_dummy_values()
        finally:
            for g, (lr, wd) in zip(groups, saved):
                g["lr"], g["weight_decay"] = lr, wd


def load_distributed_optimizer_state(optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)`, made correct for megatron-core 0.19.2 without Apex/TE.

    Bugs of megatron-core 0.19.2 on the torch-Adam path (no Apex/TE: every CPU machine):
    - `DistributedOptimizer.load_parameter_state_from_dp_reshardable` lacks the `@torch.no_grad()`
      its siblings (`..._from_fs_model_space`, ...) have. With fp32 parameters the main params are
      views of the model's leaf parameters, so its in-place `copy_` raises "a view of a leaf
      Variable that requires grad is being used in an in-place operation". Loading runs under
      no_grad.
    - Adam's per-parameter `step` comes out wrong: `load_state_dict` sets it from the checkpoint's
      param groups but gives every parameter the *same* tensor (torch's Adam increments it in place,
      so it would then advance once per parameter per optimizer step), and the dp_reshardable
      parameter-state load afterwards copies the *loading template's* `step` (the live, pre-load
      value) over it. Either way Adam's bias correction after a resume differs from the
      uninterrupted run. The step is re-set from the loaded param groups, one tensor per parameter.
    - `load_parameter_state_from_fully_reshardable` drops "step" from the loaded tensors ("handled
      separately") but `_set_main_param_and_optimizer_states` then looks up every key of the live
      torch state, "step" included: KeyError. For the duration of the load, this instance's
      `_set_main_param_and_optimizer_states` sees "step": None, which it skips as a non-tensor.
    """
    import torch
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        with torch.no_grad():
            optimizer.load_state_dict(state_dict)
        return
    dist_opts = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
                 if isinstance(o, DistributedOptimizer)]

    def tolerate_missing_step(opt):
        set_states = opt._set_main_param_and_optimizer_states  # the bound class method

        def wrapped(model_param, tensors):
            set_states(model_param, tensors if "step" in tensors else {**tensors, "step": None})
        return wrapped

    for opt in dist_opts:
        opt._set_main_param_and_optimizer_states = tolerate_missing_step(opt)
    try:
        with torch.no_grad():
            optimizer.load_state_dict(state_dict)
    finally:
        for opt in dist_opts:
            del opt._set_main_param_and_optimizer_states  # back to the class method
    for opt in dist_opts:
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


# ---- megatron-core 0.19.2: variable sequence lengths on dense models -------------------------------
def enable_variable_seq_lengths(provider) -> None:
    """Let pipeline stages exchange each micro-batch's shape (packed THD micro-batches differ in
    length). megatron-core 0.19.2's TransformerConfig validation rejects `variable_seq_lengths` with
    the default MoE token dispatcher ("allgather") even for dense models, which have no experts to
    dispatch; naming the alltoall dispatcher satisfies the check and changes nothing else."""
    provider.variable_seq_lengths = True
    if not getattr(provider, "num_moe_experts", None):
        provider.moe_token_dispatcher_type = "alltoall"


def engine_memory_release_supported() -> bool:
    """Whether colocated engines can release and resume their memory.

    SGLang 0.5.23: `/release_memory_occupation` ends with `torch.get_device_module().synchronize()`,
    which is `torch.cuda.synchronize()` on a CPU engine too and kills its scheduler ("Found no
    NVIDIA driver"). So only CUDA engines (started with --enable-memory-saver) release memory; CPU
    engines keep theirs, which costs nothing there.
    """
    from megatron_matpo import platform

    return platform.capabilities().cuda


# sglang 0.5.23: a request whose grammar (regex / JSON schema) is not compiled within
# SGLANG_GRAMMAR_MAX_POLL_ITERATIONS scheduler polls (10,000 x >= 5 ms, ~50 s) is aborted, and the
# client gets an empty, unconstrained-looking answer. On 2 shared CPU cores under load a compile can
# take that long (a forced-answer discussion came back empty in CI); CPU engines wait ~10 min instead.
GRAMMAR_POLL_ITERATIONS_CPU = "120000"


# sglang 0.5.23 (models/registry.py) imports every one of its ~260 model modules when the registry is
# first imported, in each engine's scheduler: ~6 s of CPU on the critical path of an engine start on 2
# cores (20.2 -> 13.5 s to a ready tiny engine, measured alone). With SGLANG_EXTERNAL_MODEL_PACKAGE set it
# imports that package instead and resolves a listed architecture without its defaults; any other
# architecture makes it import the defaults then, so nothing stops loading. A user's own package wins.
SERVED_MODELS_PACKAGE = "megatron_matpo.rollout.sglang_models"


def sglang_engine_env(env: dict, cpu: bool) -> dict:
    env.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", SERVED_MODELS_PACKAGE)
    if cpu:
        env.setdefault("SGLANG_GRAMMAR_MAX_POLL_ITERATIONS", GRAMMAR_POLL_ITERATIONS_CPU)
    return env


# ---- start-up chatter of library probes ------------------------------------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, pattern: str, without_cuda_only: bool = False):
        super().__init__()
        self.pattern, self.without_cuda_only = re.compile(pattern), without_cuda_only

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        if self.without_cuda_only:  # asked here, not at install: the hook must not import torch itself
            import torch

            return torch.cuda.is_available()
        return False


# (logger, message): each filter sits on the library's own logger, so it holds whatever level or
# handler the library gives that logger when it is imported later, and drops only these messages.
_PROBE_LOGS = (
    # megatron-bridge 0.6.2 (utils/import_utils.py `safe_import_from`) forces this logger to INFO with a
    # handler of its own and logs a full traceback for every optional TE / FP8 symbol it probes and does
    # not find (FP8GlobalStateManager, GroupedLinear); it falls back without them, and a symbol it needs
    # fails where it is used
    ("megatron.bridge.utils.import_utils", r"^Import of .* failed with: "),
    # transformers 5.19.0 warns when `config.torch_dtype` is read; megatron-bridge 0.6.2 reads it
    ("transformers.configuration_utils", r"`torch_dtype` is deprecated"),
    ("transformers.modeling_utils", r"`torch_dtype` is deprecated"),
    # megatron-core 0.19.2 warns on every GPTModel built; megatron-bridge 0.6.2 builds GPTModel for
    # the dense families we train (its HybridModel is not what the bridge's providers build)
    ("megatron.core.models.gpt.gpt_model", r"^GPTModel IS DEPRECATED"),
)
_NO_CUDA_LOGS = (  # said only where there is no CUDA device: where there is one they are real
    # flashinfer 0.7.2 (compilation_context.py, imported under sglang) asks each CUDA device for its
    # capability at import
    ("flashinfer.compilation_context", r"^Failed to get device capability"),
    # torch 2.14.1 utils/cpp_extension.py at import, where no CUDA toolkit is found
    ("torch.utils.cpp_extension", r"^No CUDA runtime is found"),
    # megatron-bridge 0.6.2 (utils/fusions.py) at each model build: gradient-accumulation fusion needs TE
    # or Apex, neither of which exists without CUDA
    ("megatron.bridge.utils.fusions", r"^gradient_accumulation_fusion requires"),
)
_PROBE_WARNINGS = (
    # megatron-core 0.19.2: megatron/core/models/hybrid/hybrid_layer_specs.py builds a TE MoE spec at
    # import (whenever megatron.training.models is imported), which warns where TE is absent or < 1.7
    r"Only transformer-engine>=1\.7\.0 supports MoE experts",
    r".*(Apex|Transformer Engine).*(not installed|Falling back).*",  # megatron-core: the local spec is chosen
    r"MimoModelConfig is experimental", r".*CUDA_DEVICE_MAX_CONNECTIONS",
    r"The \.grad attribute of a Tensor that is not a leaf", r"full scope is deprecated",
    r".*torch_dtype. is deprecated", r".*(reduce_scatter_tensor|all_gather_into_tensor). is deprecated",
    # torch 2.14.1 with megatron-core 0.19.2: dist_checkpointing/strategies/torch.py loads each rank's shards
    # with `checkpoint.load(..., no_dist=True)` on purpose (it plans the ranks' reads itself); DCP warns on
    # every such call that it assumes a single process, and again on the order of load's arguments
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
    r"The argument order of load has been changed",
)


def finish_wandb_run(run) -> None:
    """Finish a wandb run with everything it logged on disk. wandb 0.29.0: `run.finish()` can return
    before the wandb-core service has written the run's history records to the offline `.wandb` file
    (read back right after, the file held the config but no history: seen once under CI load);
    `wandb.teardown()` waits for the service to exit, which writes and closes the file."""
    import wandb

    run.finish()
    wandb.teardown()


def quiet_library_noise() -> None:
    """Silence start-up chatter that says nothing actionable, at its source, in every process that
    imports the stack (through `prepare_process`):
    the probes above, megatron-core's per-parameter DDP/optimizer INFO logs, httpx's line per request.
    Idempotent and cheap: it imports no library (Ray workers that never use torch stay without it)."""
    import warnings

    logging.getLogger("megatron.bridge").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # every DDP bucket's parameters at INFO
    # a deprecation notice on every checkpoint save (we use the synchronous save)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for (name, pattern), no_cuda in [(x, False) for x in _PROBE_LOGS] + [(x, True) for x in _NO_CUDA_LOGS]:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(_DropMessages(pattern, without_cuda_only=no_cuda))
    for msg in _PROBE_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


def prepare_process() -> None:
    """What every process of the stack runs before it imports the libraries: the CLI, each Ray worker
    (orchestrate/__init__, and Ray's worker_process_setup_hook on a joined cluster), each local rank.
    Idempotent; imports no library."""
    quiet_library_noise()
    cache_packages_distributions()
