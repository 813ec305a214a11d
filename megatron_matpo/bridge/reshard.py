"""Megatron shards → HF tensors for the weight sync, written by each rank straight into the bucket.

megatron-bridge's `export_hf_weights` gathers every full HF tensor onto every rank (one TP all-gather
or PP broadcast per parameter, a concatenation, then the fused QKV / gate-up split): the export was
35–75 % of a sync and held ~4× the largest tensor (docs/benchmarks.md). Here every rank copies only
the slices of the HF tensors it holds into the destination (a view of the bucket), with no gather:

- which HF tensor a Megatron parameter becomes, and whether it is fused, comes from megatron-bridge's
  own mapping table (`mapping_registry()`: `AutoMapping`-like 1:1, `QKVMapping`, `GatedMLPMapping`);
- how it is split over TP comes from megatron-core's parameter attributes (`tensor_model_parallel`,
  `partition_dim`); a replicated parameter is written by TP rank 0 of its stage, a DP replica never;
- a stage writes its own layers (global layer number = the layer module's `layer_number` − 1);
- the vocabulary's padding rows (model/vocab.py) are never written, so the HF shapes are the model's.

The plan (which rank writes which slice of which tensor) is static: built once, collectively, with one
`all_gather_object`; it is the same on every rank. A model it cannot describe (experts, permuted or
strided mappings, a mapping kind not listed above) raises `Unsupported` at construction and the sync
falls back to megatron-bridge's export (`bridge/sync.py`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_FUSED_PARTS = {"QKVMapping": ("q", "k", "v"), "GatedMLPMapping": ("gate", "up")}
_ONE_TO_ONE = ("AutoMapping", "ColumnParallelMapping", "RowParallelMapping", "ReplicatedMapping", "DirectMapping")


class Unsupported(RuntimeError):
    """The model has a parameter this resharder does not describe (the caller falls back)."""


@dataclass(frozen=True)
class Piece:
    """A slice of an HF tensor held by one rank: HF[dim][start:start + length] (dim None: all of it)
    is `part` of that rank's local parameter `param` (the part of a fused tensor; "all" otherwise)."""
    rank: int
    param: str
    part: str
    dim: int | None
    start: int
    length: int


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def _mapping_kind(mapping) -> str:
    for cls in type(mapping).__mro__:
        if cls.__name__ in _FUSED_PARTS or cls.__name__ in _ONE_TO_ONE:
            return cls.__name__
    return type(mapping).__name__


class Resharder:
    """Built collectively on every rank of the model's world (same order as any collective)."""

    def __init__(self, built):
        from megatron.core import parallel_state as ps
        from megatron.core.utils import unwrap_model

        self.built = built
        cfg = built.provider
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.rank = torch.distributed.get_rank()
        self.vocab = int(cfg.vocab_size)
        heads, groups = int(cfg.num_attention_heads), int(cfg.num_query_groups or cfg.num_attention_heads)
        self._qkv = (groups // self.tp, heads // groups, int(cfg.kv_channels or cfg.hidden_size // heads))
        if getattr(cfg, "attention_output_gate", False) or (getattr(cfg, "num_moe_experts", None) or 0) > 0:
            raise Unsupported("gated attention output / experts: not described by the resharder")
        tied = bool(getattr(cfg, "share_embeddings_and_output_weights", False))
        registry = built.bridge._model_bridge.mapping_registry()
        self._params: dict[str, torch.Tensor] = {}
        local: list[tuple[str, tuple, str, list[Piece]]] = []  # (hf name, hf shape, dtype name, pieces)
        error = ""
        writes = ps.get_data_parallel_rank() == 0 and getattr(ps, "get_context_parallel_rank", lambda: 0)() == 0
        for chunk in unwrap_model(built.chunks):
            for name, p in chunk.named_parameters():
                gname = self._global_name(chunk, name)
                mapping = registry.megatron_to_hf_lookup(gname)
                if mapping is None:
                    error = error or f"no HF mapping for {gname}"
                    continue
                try:
                    entries = self._describe(name, p, mapping)
                except Unsupported as e:
                    error = error or str(e)
                    continue
                self._params[name] = p
                for hf_name, shape, piece in entries:
                    if tied and hf_name == "lm_head.weight":
                        continue  # HF checkpoints omit a tied head; engines tie it themselves
                    mine = writes and piece.length > 0 and (piece.dim is not None or self.tp_rank == 0)
                    local.append((hf_name, shape, str(p.dtype).removeprefix("torch."), [piece] if mine else []))
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (error, local))
        errors = [e for e, _ in everyone if e]
        if errors:
            raise Unsupported(errors[0])
        self.tensors = self._merge(everyone)

    # ---- plan ------------------------------------------------------------------------------

    @staticmethod
    def _global_name(chunk, name: str) -> str:
        m = re.match(r"^(.*?\.layers\.)(\d+)(\..*)$", name)
        if not m:
            return name
        layers = chunk.get_submodule(m.group(1).rstrip("."))
        return f"{m.group(1)}{layers[int(m.group(2))].layer_number - 1}{m.group(3)}"

    def _describe(self, name: str, p: torch.Tensor, mapping) -> list[tuple[str, tuple, Piece]]:
        """(HF name, HF shape, this rank's piece) for each HF tensor the parameter contributes to."""
        kind = _mapping_kind(mapping)
        if getattr(mapping, "permute_dims", None) is not None or getattr(mapping, "is_expert", False):
            raise Unsupported(f"{name}: permuted or expert mapping")
        sharded = self.tp > 1 and bool(getattr(p, "tensor_model_parallel", False))
        dim = int(getattr(p, "partition_dim", 0)) if sharded else None
        if kind in _FUSED_PARTS:
            if dim not in (0, None):
                raise Unsupported(f"{name}: fused {kind} split on dim {dim}")
            return self._fused(name, p, mapping, kind)
        if kind not in _ONE_TO_ONE or not isinstance(mapping.hf_param, str):
            raise Unsupported(f"{name}: mapping {kind} is not described by the resharder")
        if sharded and int(getattr(p, "partition_stride", 1)) != 1:  # (a fused gate/up shard has stride 2)
            raise Unsupported(f"{name}: strided TP partition")
        hf = mapping.hf_param
        if dim is None:
            return [(hf, tuple(p.shape), Piece(self.rank, name, "all", None, 0, p.shape[0] if p.dim() else 1))]
        local = p.shape[dim]
        full = local * self.tp
        start, length = self.tp_rank * local, local
        if dim == 0 and full > self.vocab and hf in ("model.embed_tokens.weight", "lm_head.weight"):
            full = self.vocab  # the padding rows stay behind
            length = max(0, min(local, full - start))
        shape = tuple(full if d == dim else s for d, s in enumerate(p.shape))
        return [(hf, shape, Piece(self.rank, name, "all", dim, start, length))]

    def _fused(self, name: str, p: torch.Tensor, mapping, kind: str) -> list[tuple[str, tuple, Piece]]:
        rest = tuple(p.shape[1:])
        if kind == "GatedMLPMapping":
            half = p.shape[0] // 2
            return [(mapping.hf_param[part], (half * self.tp, *rest),
                     Piece(self.rank, name, part, 0, self.tp_rank * half, half)) for part in ("gate", "up")]
        groups, per_group, head_dim = self._qkv
        rows = {"q": groups * per_group * head_dim, "k": groups * head_dim, "v": groups * head_dim}
        if p.shape[0] != groups * (per_group + 2) * head_dim:
            raise Unsupported(f"{name}: QKV rows {p.shape[0]} do not match the config's heads")
        return [(mapping.hf_param[part], (rows[part] * self.tp, *rest),
                 Piece(self.rank, name, part, 0, self.tp_rank * rows[part], rows[part])) for part in ("q", "k", "v")]

    @staticmethod
    def _merge(everyone: list) -> list[HFTensor]:
        """One HFTensor per HF name, in first-seen order over ranks (rank 0's stage first)."""
        order: list[str] = []
        meta: dict[str, tuple[tuple, str]] = {}
        pieces: dict[str, list[Piece]] = {}
        for _, local in everyone:
            for hf_name, shape, dtype, ps in local:
                if hf_name not in meta:
                    order.append(hf_name)
                    meta[hf_name] = (tuple(shape), dtype)
                    pieces[hf_name] = []
                elif meta[hf_name] != (tuple(shape), dtype):
                    raise Unsupported(f"{hf_name}: ranks disagree on its shape/dtype: {meta[hf_name]} vs "
                                      f"{shape}/{dtype}")
                pieces[hf_name] += ps
        out = []
        for hf_name in order:
            shape, dtype = meta[hf_name]
            ps = tuple(sorted(pieces[hf_name], key=lambda q: (q.start, q.rank)))
            covered = sum(q.length for q in ps) if all(q.dim is not None for q in ps) else None
            dims = {q.dim for q in ps}
            if not ps or len(dims) != 1 or (covered is not None and covered != shape[ps[0].dim]) \
                    or (None in dims and len(ps) != 1):
                raise Unsupported(f"{hf_name}: pieces {ps} do not tile shape {shape}")
            out.append(HFTensor(hf_name, shape, getattr(torch, dtype), ps))
        return out

    # ---- fill ------------------------------------------------------------------------------

    def mine(self, t: HFTensor) -> list[Piece]:
        return [q for q in t.pieces if q.rank == self.rank]

    @torch.no_grad()
    def fill(self, t: HFTensor, dest: torch.Tensor) -> int:
        """Copy this rank's pieces of `t` into `dest` (a tensor of t's shape, e.g. a view of a bucket);
        returns the bytes written."""
        n = 0
        for q in self.mine(t):
            out = dest if q.dim is None else dest.narrow(q.dim, q.start, q.length)
            if q.part in ("q", "k", "v"):  # rows of whole heads, per query group: copy group-wise, no temp
                groups, _, head_dim = self._qkv
                out.view(groups, -1, head_dim, *out.shape[1:]).copy_(self._grouped(q))
            else:
                out.copy_(self.source(q))
            n += out.numel() * out.element_size()
        return n

    def source(self, q: Piece) -> torch.Tensor:
        """This rank's values of piece `q`, shaped like its slice of the HF tensor (a view when it can)."""
        p = self._params[q.param].detach()
        if q.part == "all":
            return p if q.dim is None else p.narrow(q.dim, 0, q.length)
        if q.part in ("gate", "up"):
            half = p.shape[0] // 2
            return p[:half] if q.part == "gate" else p[half:]
        return self._grouped(q).reshape(-1, *p.shape[1:])

    def _grouped(self, q: Piece) -> torch.Tensor:
        """Megatron's fused QKV is [q heads of the group, k, v] per query group: `q.part` of each group."""
        p = self._params[q.param].detach()
        groups, per_group, head_dim = self._qkv
        grouped = p.view(groups, per_group + 2, head_dim, *p.shape[1:])
        return grouped[:, {"q": slice(0, per_group), "k": slice(per_group, per_group + 1),
                           "v": slice(per_group + 1, None)}[q.part]]
