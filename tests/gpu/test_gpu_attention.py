"""The CUDA varlen (flash) path of packed attention equals the per-segment SDPA path."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_varlen_matches_segment_loop():
    from megatron_matpo.model.attention import packed_attention_loop, packed_attention_varlen, varlen_usable

    torch.manual_seed(0)
    lens = [37, 300, 5, 1024, 129]
    t, nq, nkv, d = sum(lens), 8, 2, 128
    q, k, v = (torch.randn(t, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (nq, nkv, nkv))
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lens), 0)), dtype=torch.int32)
    assert varlen_usable(q, 0.0)
    ref = packed_attention_loop(q, k, v, cu.tolist(), cu.tolist(), d ** -0.5)
    out = packed_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_context_parallel_attention_matches_varlen_in_bf16():
    """The CP attention's kernel path on CUDA in bf16 (every CP rank's part computed here from the gathered
    keys: one process cannot hold several NCCL ranks on one GPU) equals the flash varlen reference."""
    from megatron_matpo.model.attention import packed_attention_varlen
    from megatron_matpo.model.context_parallel import shard, zigzag_attention, zigzag_index

    torch.manual_seed(0)
    cp, lens = 4, [64, 1024, 8, 4096]  # multiples of 2 * cp
    t, nq, nkv, d = sum(lens), 8, 2, 128
    q, k, v = (torch.randn(t, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (nq, nkv, nkv))
    cu = [0] + torch.cumsum(torch.tensor(lens), 0).tolist()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    ref = packed_attention_varlen(q, k, v, cu_t, cu_t, max(lens), max(lens), d ** -0.5)
    ks = torch.stack([shard(k, cu, cp, r, dim=0) for r in range(cp)])
    vs = torch.stack([shard(v, cu, cp, r, dim=0) for r in range(cp)])
    out = torch.zeros_like(ref)
    for r in range(cp):
        part = zigzag_attention(shard(q, cu, cp, r, dim=0), ks, vs, cu, r, d ** -0.5)
        out = out.index_copy(0, zigzag_index(cu, cp, r).cuda(), part)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
