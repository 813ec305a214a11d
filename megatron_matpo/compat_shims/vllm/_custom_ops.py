"""Pure-torch `rotary_embedding` with vLLM's in-place contract, for SGLang 0.5.23 on CPU."""
import torch


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    pos = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, pos).chunk(2, dim=-1)  # [T, rot/2] each
    rot = cos.shape[-1] * 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for x in (query, key):
        if x is None:
            continue
        v = x.view(pos.shape[0], -1, head_size)
        r = v[..., :rot].float()
        if is_neox:
            x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        v[..., :rot] = out.to(v.dtype)
