"""Which HF rotary-embedding configurations our Megatron model reproduces exactly.

megatron-bridge 0.6.2 maps an HF `rope_scaling` / `rope_parameters` onto megatron-core 0.19.2's rotary
embedding, which implements plain RoPE and Llama-3's frequency scaling with the original context
fixed at 8,192 positions (megatron/core/models/common/embeddings/rope_utils.py `apply_rope_scaling`).
Any other variant (linear, dynamic, yarn, longrope, or llama3 with another original context) would
convert and train with logits ~1e-2 away from transformers': a silent mismatch, so it is refused by
name before anything starts. What is accepted here is checked against transformers' logits
(tests/test_megatron_parity.py, the llama model of tests/conftest.py's tiny_models)."""
from __future__ import annotations

from megatron_matpo.model.layout import LayoutError

LLAMA3_ORIGINAL_CONTEXT = 8192  # megatron-core 0.19.2's apply_rope_scaling: original_max_position_embeddings


def rope_parameters(hf_config) -> tuple[str, dict]:
    """(field name as config.json spells it, its dict); ({}) for plain RoPE. transformers 5 writes
    `rope_parameters` (rope_theta inside, rope_type "default" for plain), older configs `rope_scaling`."""
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k: getattr(hf_config, k, None))
    for name in ("rope_scaling", "rope_parameters"):
        value = get(name)
        if isinstance(value, dict) and (value.get("rope_type") or value.get("type")) not in (None, "default"):
            return name, value
    return "rope_parameters", {}


def check_rope(hf_config, model: str = "") -> None:
    """LayoutError naming the field and value unless the Megatron model's logits equal transformers'."""
    field, rp = rope_parameters(hf_config)
    if not rp:
        return
    kind = rp.get("rope_type") or rp.get("type")
    where = f" (model: {model})" if model else ""
    if kind != "llama3":
        raise LayoutError(f"{field}.rope_type: {kind!r} is not supported: megatron-core 0.19.2 implements plain "
                          f"RoPE and llama3 scaling only, so its logits would not equal transformers'{where}")
    orig = rp.get("original_max_position_embeddings")
    if orig != LLAMA3_ORIGINAL_CONTEXT:
        raise LayoutError(f"{field}.original_max_position_embeddings: {orig} is not supported with rope_type "
                          f"'llama3': megatron-core 0.19.2's llama3 scaling assumes {LLAMA3_ORIGINAL_CONTEXT}, so "
                          f"its logits would differ from transformers' (~1e-2){where}")
