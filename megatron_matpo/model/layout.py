"""Parallel layout (TP (+SP) × PP × CP × DP) and its validation against a HuggingFace model config (a vocabulary
TP does not divide is padded: model/vocab.py).

Validation runs in the launching process, before any worker starts, so a bad layout costs nothing
and the message names the field and the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that does not divide the model or the world."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1  # context parallel: each packed sequence split over `cp` ranks (model/context_parallel.py)
    sp: bool = False  # sequence parallel: activations outside attention/MLP split over the TP ranks

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def tag(self) -> str:
        """e.g. tp2pp1dp1, tp2pp1cp2dp1sp: a layout in result keys and log lines."""
        return (f"tp{self.tp}pp{self.pp}" + (f"cp{self.cp}" if self.cp > 1 else "") + f"dp{self.dp}"
                + ("sp" if self.sp else ""))

    def validate(self, hf_config, section: str = "parallel") -> "ParallelLayout":
        """`section`: how the messages name the layout's fields (`actor` in a training config)."""
        for name in ("tp", "pp", "dp", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{section}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.sp and self.tp == 1:
            raise LayoutError(f"{section}.sequence_parallel: splits activations over the TP ranks; it needs "
                              f"{section}.tp > 1, got tp=1")
        heads = hf_config.num_attention_heads
        kv = getattr(hf_config, "num_key_value_heads", None) or heads
        layers = hf_config.num_hidden_layers
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        if heads % self.tp:
            raise LayoutError(f"{section}.tp: {self.tp} does not divide num_attention_heads={heads} of {arch}")
        if kv % self.tp:
            raise LayoutError(f"{section}.tp: {self.tp} does not divide num_key_value_heads={kv} of {arch}")
        if hf_config.intermediate_size % self.tp:
            raise LayoutError(f"{section}.tp: {self.tp} does not divide intermediate_size="
                              f"{hf_config.intermediate_size} of {arch}")
        if layers % self.pp:
            raise LayoutError(f"{section}.pp: {self.pp} does not divide num_hidden_layers={layers} of {arch}")
        return self
