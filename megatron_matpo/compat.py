"""Workarounds for bugs in pinned third-party libraries, all in one place.

Each entry names the library version it is for; delete it when the pin moves past the bug.
(The setup-time workaround, uninstalling `sgl-flash-mla`, lives in tools/setup_venv.sh.)
"""
from __future__ import annotations

import importlib.util
import sys
import types


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
        from megatron.bridge import AutoBridge
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]
    return AutoBridge


def sglang_cpu_pythonpath() -> str:
    """Directory to prepend to PYTHONPATH/sys.path for SGLang engines on CPU.

    SGLang 0.5.23's generic CPU path (no Intel `sgl_kernel` CPU build on PyPI) imports
    `vllm._custom_ops.rotary_embedding` for RoPE; without it the scheduler process dies and takes
    the parent down with exit 137. `compat_shims/vllm` provides just that function in pure torch.
    """
    from pathlib import Path

    return str(Path(__file__).parent / "compat_shims")
