"""The one place that knows which hardware we run on.

`capabilities()` detects CUDA / NCCL / TransformerEngine; `activate()` prepares the process: on a
GPU box it does nothing beyond choosing the device; on a CPU box it redirects megatron-core's
CUDA-only calls so the same megatron-core code runs on gloo. Everything else in the package asks
this module (`device()`, `dist_backend()`, `use_transformer_engine()`, ...) and never checks
`torch.cuda` itself.

CPU redirects, written for megatron-core 0.19.2 with torch 2.14.1 (re-check on upgrades):
- `torch.cuda.current_device/synchronize/empty_cache/set_device/device_count/Stream/Event/stream/
  current_stream/memory_*`: megatron calls them unconditionally (schedules, DDP buckets,
  optimizer, timers); on CPU they become no-ops or return CPU-meaningful values.
- `torch.cuda.get_rng_state/set_rng_state/manual_seed` and megatron's
  `tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`: the "device" generator is a
  dedicated CPU `torch.Generator`, so `CudaRNGStatesTracker` keeps its bookkeeping (add/fork) but
  forks do not disturb the default CPU stream (dropout is 0 in every model we train).
- Hard-coded `device="cuda"` / `torch.cuda.current_device()` tensors (pipeline schedules,
  `transformer/utils.py` causal masks, rotary `inv_freq`), `.cuda()`, `.pin_memory()`: a
  `TorchFunctionMode` rewrites CUDA devices to CPU.
- `torch.autograd.backward` called through the mode (activation recompute) runs its engine with the
  mode pushed again, so the layers' backward it starts is rewritten too (`_backward_under_mode`).
- `Tensor.type()` answers `torch.cuda.FloatTensor`-style names, because megatron's optimizers
  (`optimizer.py`, `distrib_optimizer.py`) accept only those strings for fp32/bf16 params.
- `import megatron.core` imports triton (`transformer/moe/ops/paged_stash.py`); torch's CUDA
  wheel brings triton, and where it is missing a module placeholder is registered for that import.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    nccl: bool
    transformer_engine: bool
    bf16: bool
    device_name: str

    @property
    def device_type(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.nccl else "gloo"


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    force_cpu = os.environ.get("MATPO_FORCE_CPU", "0") == "1"
    cuda = torch.cuda.is_available() and not force_cpu
    nccl = cuda and torch.distributed.is_nccl_available()
    te = False
    if cuda and importlib.util.find_spec("transformer_engine") is not None:
        try:
            import transformer_engine.pytorch  # noqa: F401

            te = True
        except Exception:  # a broken TE build must not stop the local-spec path
            te = False
    bf16 = cuda and torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    return Capabilities(cuda=cuda, nccl=nccl, transformer_engine=te, bf16=bf16, device_name=name)


def device() -> torch.device:
    if capabilities().cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    return capabilities().dist_backend


def use_transformer_engine() -> bool:
    return capabilities().transformer_engine and os.environ.get("MATPO_DISABLE_TE", "0") != "1"


_ACTIVE = False


def activate(local_rank: int = 0) -> Capabilities:
    """Prepare this process for megatron-core. Idempotent; call before importing megatron."""
    global _ACTIVE
    caps = capabilities()
    if _ACTIVE:
        return caps
    _ACTIVE = True
    if caps.cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return caps
    _register_triton_placeholder()
    _patch_torch_cuda()
    _CudaToCpuMode().__enter__()  # process-wide, never exited
    from megatron_matpo.compat import lean_cpu_imports

    with lean_cpu_imports():
        _patch_megatron_rng()  # imports megatron.core
    return caps


def _register_triton_placeholder() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    mod = types.ModuleType("triton")
    mod.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # decorator used at import
    mod.language = types.ModuleType("triton.language")
    mod.language.constexpr = int
    sys.modules["triton"] = mod
    sys.modules["triton.language"] = mod.language


class _NullStream:
    def __init__(self, *a, **kw):
        pass

    def wait_stream(self, *a, **kw):
        pass

    def wait_event(self, *a, **kw):
        pass

    def record_event(self, *a, **kw):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *a, **kw):
        pass

    def record(self, *a, **kw):
        pass

    def wait(self, *a, **kw):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


# The "CUDA" generator on CPU: a separate stream so megatron's RNG tracker can fork it freely.
_DEVICE_GENERATOR = torch.Generator()


def _patch_torch_cuda() -> None:
    c = torch.cuda
    c.current_device = lambda: 0
    c.device_count = lambda: 1
    c.set_device = lambda *a, **kw: None
    c.synchronize = lambda *a, **kw: None
    c.empty_cache = lambda: None
    c.is_initialized = lambda: False
    c.Stream = _NullStream
    c.Event = _NullEvent
    c.current_stream = lambda *a, **kw: _NullStream()
    c.default_stream = lambda *a, **kw: _NullStream()
    c.stream = lambda *a, **kw: contextlib.nullcontext()
    c.set_stream = lambda *a, **kw: None
    c.is_current_stream_capturing = lambda: False
    c.memory_allocated = lambda *a, **kw: 0
    c.max_memory_allocated = lambda *a, **kw: 0
    c.memory_reserved = lambda *a, **kw: 0
    c.max_memory_reserved = lambda *a, **kw: 0
    c.reset_peak_memory_stats = lambda *a, **kw: None
    c.get_rng_state = lambda *a, **kw: _DEVICE_GENERATOR.get_state()
    c.set_rng_state = lambda state, *a, **kw: _DEVICE_GENERATOR.set_state(state)
    c.manual_seed = lambda seed: _DEVICE_GENERATOR.manual_seed(int(seed))
    c.manual_seed_all = c.manual_seed
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state
    c.random.manual_seed = c.manual_seed


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **kw: _DEVICE_GENERATOR.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **kw: _DEVICE_GENERATOR.set_state(state)


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


_CPU = torch.device("cpu")
_PASSTHROUGH = {torch.Tensor.cuda, torch.Tensor.pin_memory}


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites every CUDA device argument to CPU (see the module docstring for why)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PASSTHROUGH:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is torch.autograd.backward:
            return _backward_under_mode(*args, **kwargs)
        return func(*args, **kwargs)


def _backward_under_mode(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """`torch.autograd.backward` after its torch-function dispatch, with the rewrite on.

    torch 2.14.1's `torch.autograd.backward` dispatches to torch-function modes, and a mode is off
    while its own handler runs: the backward that megatron's activation recompute starts inside its
    `CheckpointFunction.backward` would run the layers' backward without the rewrite (with sequence
    parallelism that backward allocates on `torch.cuda.current_device()`). This is the rest of
    torch's function (grads made, the engine run) inside a fresh instance of the mode; the engine
    call itself does not dispatch, so the mode is not re-entered."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
    with _CudaToCpuMode():
        _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                             tuple(inputs) if inputs is not None else (), allow_unreachable=True,
                             accumulate_grad=True)
