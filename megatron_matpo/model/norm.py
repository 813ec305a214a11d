"""Norm layers for megatron-core's local (non-TransformerEngine) spec under sequence parallelism.

megatron-core 0.19's `WrappedTorchNorm` refuses `sequence_parallel` (only TE's and Apex's norms
take it). Under SP each TP rank normalizes its own slice of the sequence with the full (replicated)
weight, so that weight's gradient is a partial sum per rank; megatron's `finalize_model_grads` sums it
over the TP group for every parameter marked `sequence_parallel`. This is the same torch norm with
that mark, nothing else.
"""
from __future__ import annotations

import torch


class SequenceParallelNorm:
    """`WrappedTorchNorm`'s contract (a module factory), for LayerNorm and RMSNorm with SP allowed."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise NotImplementedError("zero-centered gamma / memory-efficient layer norm need TE or Apex")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise NotImplementedError(f"normalization={config.normalization!r}: LayerNorm or RMSNorm")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
