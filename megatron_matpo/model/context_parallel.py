"""Context parallelism (CP) for packed THD micro-batches on our attention (gloo on CPU, NCCL on GPU).

Layout (the one TransformerEngine and megatron-core's THD rotary embedding use, so the same packed
batch runs either attention): every sequence of a packed micro-batch has a length divisible by
2·cp (`train.packing.pack_rows(cp_size=...)` pads each row) and is cut into 2·cp equal chunks; CP
rank r holds chunks r and 2·cp−1−r of every sequence, in sequence order. Pairing an early chunk
with a late one gives every rank the same causal-attention work (load balance), whatever the
sequence lengths. `cu_seqlens` stay the *global* boundaries on every rank: megatron's rotary code
divides them by cp to find each rank's chunks, and so does the attention here.

Attention: each rank all-gathers the keys and values of the CP group (one collective per layer, a
differentiable one: the backward sums the key/value gradients back onto their owners), rebuilds each
sequence's keys in order, and runs its own query chunks against them under the causal mask of their
global positions: each chunk against the keys up to its own end, so every rank computes its balanced
share of the causal scores. Memory per rank is O(t·kv) for the gathered keys, not a ring's O(t/cp);
at the context lengths this serves (agent rollouts, 40k tokens) that is the simple and exact choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def zigzag_index(cu_seqlens: list[int], cp: int, rank: int) -> torch.Tensor:
    """Global packed positions held by CP `rank`, in local order (a [t / cp] long tensor)."""
    if cp == 1:
        return torch.arange(cu_seqlens[-1])
    parts = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        n = e - s
        if n % (2 * cp):
            raise ValueError(f"a packed sequence of {n} tokens cannot be split over cp={cp}: every sequence "
                             f"must be padded to a multiple of 2*cp={2 * cp} (pack_rows(cp_size=...))")
        c = n // (2 * cp)
        parts += [torch.arange(s + rank * c, s + (rank + 1) * c),
                  torch.arange(s + (2 * cp - 1 - rank) * c, s + (2 * cp - rank) * c)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def shard(x: torch.Tensor, cu_seqlens: list[int], cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a per-position tensor of the whole packed micro-batch (positions on `dim`)."""
    return x if cp == 1 else x.index_select(dim, zigzag_index(cu_seqlens, cp, rank).to(x.device))


def unshard(local: torch.Tensor, cu_seqlens: list[int], cp: int, group, dim: int = 1) -> torch.Tensor:
    """The whole micro-batch's per-position tensor from every CP rank's part (a collective, no grad)."""
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    order = torch.cat([zigzag_index(cu_seqlens, cp, r) for r in range(cp)]).to(local.device)
    gathered = torch.cat(parts, dim)
    return torch.empty_like(gathered).index_copy_(dim, order, gathered)


class _GatherFromCP(torch.autograd.Function):
    """[t_local, ...] -> [cp, t_local, ...]; backward: each rank gets the sum over the group of the
    gradient of its own slice (a reduce-scatter; gloo has none, so an all-reduce and a slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        group, rank = ctx.group, ctx.group.rank()
        grad = grad.contiguous()
        if grad.is_cuda:
            out = torch.empty_like(grad[rank])
            torch.distributed.reduce_scatter_tensor(out, grad.flatten(0, 1), group=group)
            return out, None
        torch.distributed.all_reduce(grad, group=group)
        return grad[rank].clone(), None


def cp_packed_attention(q, k, v, cu_seqlens: list[int], scale: float, group, dropout: float = 0.0):
    """Causal attention of this rank's queries against the whole sequences' keys.

    q: [t/cp, nq, d], k, v: [t/cp, nkv, d] (this rank's chunks, `zigzag_index` order); `cu_seqlens`:
    the global boundaries. Returns [t/cp, nq, d].
    """
    ks, vs = _GatherFromCP.apply(k, group), _GatherFromCP.apply(v, group)  # [cp, t/cp, nkv, d]
    return zigzag_attention(q, ks, vs, cu_seqlens, group.rank(), scale, dropout)


def zigzag_attention(q, ks, vs, cu_seqlens: list[int], rank: int, scale: float, dropout: float = 0.0):
    """The local part of `cp_packed_attention`, given every CP rank's keys and values ([cp, t/cp, nkv, d],
    as gathered): rank `rank`'s queries [t/cp, nq, d] against each whole sequence, causal on global
    positions."""
    cp = ks.size(0)
    rep = q.size(1) // ks.size(2)
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        n = e - s
        if n == 0:
            continue
        c, lo = n // (2 * cp), s // cp  # chunk length; the sequence's offset in every rank's local layout
        # chunk m of the sequence: rank m's first half (m < cp), else rank 2cp-1-m's second half
        order = [(m, 0) if m < cp else (2 * cp - 1 - m, 1) for m in range(2 * cp)]
        kf = torch.cat([ks[r, lo + h * c: lo + (h + 1) * c] for r, h in order]).transpose(0, 1)  # [nkv, n, d]
        vf = torch.cat([vs[r, lo + h * c: lo + (h + 1) * c] for r, h in order]).transpose(0, 1)
        if rep > 1:
            kf, vf = kf.repeat_interleave(rep, dim=0), vf.repeat_interleave(rep, dim=0)
        # each query chunk against the keys up to its own end only: (2cp + 1) c^2 scores per rank, the
        # balanced share of the causal n^2 / 2
        for j, m in enumerate((rank, 2 * cp - 1 - rank)):
            end = (m + 1) * c
            mask = torch.ones(c, end, dtype=torch.bool, device=q.device).tril(end - c)  # causal, bottom-right
            qi = q[lo + j * c: lo + (j + 1) * c].transpose(0, 1)
            o = F.scaled_dot_product_attention(qi, kf[:, :end], vf[:, :end], attn_mask=mask, dropout_p=dropout,
                                               scale=scale)
            out[lo + j * c: lo + (j + 1) * c] = o.transpose(0, 1)
    return out
