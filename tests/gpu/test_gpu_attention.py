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
