"""Core attention for megatron-core's local (non-TransformerEngine) layer spec that also accepts
packed THD batches (`PackedSeqParams(qkv_format="thd")`), so packed planner/worker sequences train on
CPU exactly as TE's fused attention trains them on GPU.

megatron-core 0.19's `DotProductAttention` refuses packed sequences. Here, on CUDA in bf16/fp16,
torch's flash-attention varlen kernel runs all `cu_seqlens` segments in one launch; elsewhere each
segment runs causal `scaled_dot_product_attention` on its own. Either way no token attends across a
sequence boundary. With context parallelism (cp > 1) each rank holds two chunks of every sequence
and attends over the CP group's gathered keys (model/context_parallel.py). Unpacked causal batches
use SDPA too; an explicit attention mask falls back to megatron's own implementation.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = inspect.signature(_varlen_attn).parameters
except ImportError:  # pragma: no cover - older torch
    _varlen_attn, _VARLEN_PARAMS = None, {}


def packed_attention_loop(q, k, v, cu_q: list[int], cu_kv: list[int], scale: float, dropout: float = 0.0):
    """q: [t, nq, d]; k, v: [t, nkv, d]; causal attention per segment. Returns [t, nq, d]."""
    rep = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_kv[i], cu_kv[i + 1]
        if qe == qs:
            continue
        qi, ki, vi = q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
        if rep > 1:
            ki, vi = ki.repeat_interleave(rep, dim=0), vi.repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, dropout_p=dropout, scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def varlen_usable(q: torch.Tensor, dropout: float) -> bool:
    return (_varlen_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and dropout == 0.0)


def packed_attention_varlen(q, k, v, cu_q: torch.Tensor, cu_kv: torch.Tensor, max_q: int, max_kv: int,
                            scale: float):
    """Same contract as `packed_attention_loop`, one flash-attention varlen launch (CUDA, 16-bit)."""
    kw = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:  # torch 2.14 spelling of "causal"
        kw["window_size"] = (-1, 0)
    else:  # torch 2.10-2.11
        kw["is_causal"] = True
    rep = q.size(1) // k.size(1)
    if rep > 1:
        if "enable_gqa" in _VARLEN_PARAMS:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu_q, cu_kv = cu_q.to(device=q.device, dtype=torch.int32), cu_kv.to(device=q.device, dtype=torch.int32)
    return _varlen_attn(q, k, v, cu_q, cu_kv, int(max_q), int(max_kv), **kw)


class PackedDotProductAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        # megatron-core 0.19's DotProductAttention refuses cp > 1 (only TE's attention does CP); this
        # one does it for packed batches, so the parent is built from a copy that says cp = 1
        self.cp = config.context_parallel_size
        parent = copy.copy(config)
        parent.context_parallel_size = 1
        super().__init__(parent, *args, **kwargs)
        self.config = config

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            if self.cp > 1:
                raise NotImplementedError(f"context parallelism (cp={self.cp}) runs packed THD micro-batches "
                                          "only; this batch is padded (BSHD)")
            if attention_mask is not None or attention_bias is not None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, None)
            return self._causal_bshd(query, key, value)
        assert attention_bias is None, "attention_bias is not supported with packed sequences"
        # query: [t, np, hn]; key/value: [t, ng, hn] (megatron squeezed the dummy batch dim)
        p = packed_seq_params
        cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        cu_kv = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
        dropout = self.attention_dropout.p if self.training else 0.0
        if self.cp > 1:
            from megatron.core import parallel_state

            from megatron_matpo.model.context_parallel import cp_packed_attention

            out = cp_packed_attention(query, key, value, cu_q.tolist(), self.softmax_scale,
                                      parallel_state.get_context_parallel_group(), dropout)
        elif varlen_usable(query, dropout):
            out = packed_attention_varlen(query, key, value, cu_q, cu_kv, p.max_seqlen_q, p.max_seqlen_kv,
                                          self.softmax_scale)
        else:
            out = packed_attention_loop(query, key, value, cu_q.tolist(), cu_kv.tolist(), self.softmax_scale,
                                        dropout)
        return out.reshape(out.size(0), -1)

    def _causal_bshd(self, query, key, value):
        """Causal attention on [s, b, n, hn] through SDPA (flash/efficient kernels on CUDA), so a
        padded batch runs the same kernel family as a packed one."""
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale)
        return o.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)
