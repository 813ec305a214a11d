"""Core attention for megatron-core's local (non-TransformerEngine) layer spec that also accepts
packed THD batches (`PackedSeqParams(qkv_format="thd")`), so packed planner/worker sequences train on
CPU exactly as TE's fused attention trains them on GPU.

megatron-core 0.19's `DotProductAttention` refuses packed sequences; here each `cu_seqlens` segment
runs causal `scaled_dot_product_attention` on its own, so no token attends across a sequence boundary.
Unpacked causal batches use the same SDPA call; an explicit attention mask falls back to megatron's
own implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            if attention_mask is not None or attention_bias is not None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, None)
            return self._causal_bshd(query, key, value)
        assert attention_bias is None, "attention_bias is not supported with packed sequences"
        # query: [t, np, hn]; key/value: [t, ng, hn] (megatron squeezed the dummy batch dim)
        cu_q = packed_seq_params.cu_seqlens_q_padded
        if cu_q is None:
            cu_q = packed_seq_params.cu_seqlens_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is None:
            cu_kv = packed_seq_params.cu_seqlens_kv
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        dropout = self.attention_dropout.p if self.training else 0.0
        bounds_q, bounds_kv = cu_q.tolist(), cu_kv.tolist()
        out = torch.empty_like(query)
        for i in range(len(bounds_q) - 1):
            qs, qe, ks, ke = bounds_q[i], bounds_q[i + 1], bounds_kv[i], bounds_kv[i + 1]
            if qe == qs:
                continue
            q = query[qs:qe].transpose(0, 1)  # [np, L, hn]
            k = key[ks:ke].transpose(0, 1)
            v = value[ks:ke].transpose(0, 1)
            if rep > 1:
                k = k.repeat_interleave(rep, dim=0)
                v = v.repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                               scale=self.softmax_scale)
            out[qs:qe] = o.transpose(0, 1)
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
