"""Megatron `GPTModel` from a HuggingFace config directory (Qwen3, Qwen2, Llama).

megatron-bridge's `AutoBridge` is the seam: it maps the HF config to a megatron `TransformerConfig`
(its provider) and maps weights both ways. We pick the layer spec (TransformerEngine on CUDA when TE
imports, the local spec with packed-sequence attention otherwise), the parallel layout, dtype, and
turn off fusions that have no CPU kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_matpo import platform
from megatron_matpo.model.layout import LayoutError, ParallelLayout
from megatron_matpo.model.rope import check_rope

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


class UnsupportedArchitecture(ValueError):
    pass


def load_hf_config(hf_dir: str | Path):
    from transformers import AutoConfig

    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found: expected a HuggingFace model directory")
    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedArchitecture(
            f"{path}/config.json declares architectures={archs}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


def check_layout(hf_dir: str | Path, layout: ParallelLayout) -> ParallelLayout:
    """Validate before launching anything: raises LayoutError / UnsupportedArchitecture."""
    return layout.validate(load_hf_config(hf_dir))


def layer_spec(config, vp_stage: int | None = None):
    """TE spec where TE runs; else megatron's local spec with THD-capable core attention (and, with
    sequence parallelism, norms that take it: the block spec then names its final norm too)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    if platform.use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron_matpo.model.attention import PackedDotProductAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    if not config.sequence_parallel:
        return spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock, TransformerBlockSubmodules, get_num_layers_to_build)

    from megatron_matpo.model.norm import SequenceParallelNorm

    layer, attn = spec.submodules, spec.submodules.self_attention.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelNorm
    if config.qk_layernorm:  # per head, after the QKV projection gathered the sequence
        attn.q_layernorm = attn.k_layernorm = SequenceParallelNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=SequenceParallelNorm))


@dataclass
class BuiltModel:
    chunks: list  # megatron model chunks on this rank (one per virtual stage; we use one)
    bridge: Any  # megatron-bridge AutoBridge (HF name mapping, weight streaming)
    provider: Any  # megatron-bridge GPT provider == the model's TransformerConfig
    layout: ParallelLayout


def make_bridge(hf_dir: str | Path, config=None):
    from megatron_matpo.compat import import_auto_bridge

    config = config or load_hf_config(hf_dir)  # clear error before megatron-bridge's own
    auto_bridge = import_auto_bridge()
    if any(Path(hf_dir).glob("*.safetensors")):
        return auto_bridge.from_hf_pretrained(str(hf_dir), dtype=torch.float32)
    # config and tokenizer only (a Megatron checkpoint's hf/ dir): weights come from elsewhere
    return auto_bridge.from_hf_config(config)


def build_model(hf_dir: str | Path, layout: ParallelLayout, *, load_weights: bool = True,
                dtype: torch.dtype = torch.float32, seq_length: int = 4096, ddp_config=None,
                bridge=None, recompute: str = "none", head: str = "lm") -> BuiltModel:
    """Build this rank's model chunks. Requires `dist.init_megatron(layout)` to have run.

    With `ddp_config`, the chunks come wrapped in megatron's DistributedDataParallel (training);
    without, they are bare modules (inference, reference model, conversion). `recompute="full"`
    checkpoints every transformer layer (inputs kept, activations recomputed in backward): what lets
    40k-token micro-batches of a 14B model fit in 80 GB. `head="value"` swaps the LM head for a
    zero-initialized scalar value head after loading the weights (the PPO critic); `head="score"` for
    the same head without a bias (a verifier: an HF sequence-classification score head).
    """
    from megatron.core import parallel_state

    hf_config = load_hf_config(hf_dir)
    layout.validate(hf_config)
    check_rope(hf_config, str(hf_dir))
    bridge = bridge or make_bridge(hf_dir, hf_config)
    if (parallel_state.get_tensor_model_parallel_world_size() != layout.tp
            or parallel_state.get_pipeline_model_parallel_world_size() != layout.pp
            or parallel_state.get_context_parallel_world_size() != layout.cp):
        raise LayoutError(f"megatron parallel state is tp={parallel_state.get_tensor_model_parallel_world_size()} "
                          f"pp={parallel_state.get_pipeline_model_parallel_world_size()} "
                          f"cp={parallel_state.get_context_parallel_world_size()}, layout asks {layout}")
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.context_parallel_size = layout.cp
    provider.sequence_parallel = layout.sp
    provider.params_dtype = provider.pipeline_dtype = dtype
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    provider.seq_length = seq_length
    # a vocabulary TP does not divide gets padding rows, and only then (model/vocab.py)
    provider.should_pad_vocab = provider.vocab_size % layout.tp != 0
    provider.make_vocab_size_divisible_by = 1
    if recompute == "full":
        provider.recompute_granularity, provider.recompute_method, provider.recompute_num_layers = "full", "uniform", 1
    elif recompute != "none":
        raise LayoutError(f"recompute={recompute!r}: expected 'none' or 'full'")
    if layout.pp > 1:  # packed micro-batches differ in length: the pipeline exchanges shapes first
        from megatron_matpo.compat import enable_variable_seq_lengths

        enable_variable_seq_lengths(provider)
    provider.transformer_layer_spec = layer_spec
    provider.attention_softmax_in_fp32 = True
    if not platform.use_transformer_engine():  # these fused kernels come from TE (or Apex)
        provider.gradient_accumulation_fusion = False
        provider.masked_softmax_fusion = False
        provider.apply_rope_fusion = False
        provider.persist_layer_norm = False
        provider.cross_entropy_loss_fusion = False
    if not platform.capabilities().cuda:  # torch.jit-fused bias ops are CUDA-only
        provider.bias_activation_fusion = False
        provider.bias_dropout_fusion = False
    if not platform.use_transformer_engine():
        from megatron.core.transformer.enums import AttnBackend

        provider.attention_backend = AttnBackend.auto  # `local` would swap our attention back out
    provider.finalize()
    hooks = [bridge.load_hf_weights] if load_weights else []
    if head in ("value", "score"):  # the critic's value head; a verifier's bias-free score head
        from megatron_matpo.model.value_head import attach_value_heads

        hooks.append(lambda chunks: attach_value_heads(chunks, bias=head == "value"))
    elif head == "lm":
        from megatron_matpo.model.vocab import mask_padded_logits

        hooks.append(lambda chunks: mask_padded_logits(chunks, provider.vocab_size, layout.tp))
    else:
        raise LayoutError(f"head={head!r}: expected 'lm', 'value' or 'score'")
    chunks = provider.provide_distributed_model(
        ddp_config=ddp_config, wrap_with_ddp=ddp_config is not None,
        use_cpu_initialization=not platform.capabilities().cuda,
        mixed_precision_wrapper=None if dtype == torch.float32 else _float16_module(),
        pre_wrap_hook=lambda chunks: _run_hooks(hooks, chunks),
    )
    if ddp_config is not None:
        _wire_grad_sync(chunks)
    return BuiltModel(chunks=chunks, bridge=bridge, provider=provider, layout=layout)


def _run_hooks(hooks: list, chunks: list) -> list:
    for h in hooks:  # each edits the chunks in place (load_hf_weights returns None)
        h(chunks)
    return chunks


def _wire_grad_sync(chunks: list) -> None:
    """Make megatron's schedules finish DDP grad reduction (DP all-reduce / reduce-scatter, tied
    embedding and layernorm grads across PP/TP) at the end of each forward_backward call, and skip
    the reduction on all but the last micro-batch, as megatron's own training loop wires them."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
    config.grad_sync_func = None  # no overlap of grad reduction with backward


def _float16_module():
    from megatron.core.transformer.module import Float16Module

    return Float16Module
