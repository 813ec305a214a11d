"""Grouping a stream of named tensors into flat byte buckets of bounded size.

A bucket is one contiguous uint8 tensor holding its tensors back to back, in stream order, with no
padding: exactly SGLang's `FlattenedTensorBucket` layout (`load_format="flattened_bucket"`), so the
receiving engine rebuilds the tensors from (names, dtypes, shapes) alone. One flat tensor per bucket
means one broadcast / one shared-memory handle per bucket instead of one per tensor.

Memory: the builder owns a single reusable buffer of `max_bytes`; each incoming tensor is copied in
and can then be freed by the producer. A tensor larger than the buffer becomes a bucket of its own,
sent from its own storage. Peak extra memory is therefore ≈ one bucket + the largest tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

# the ring placement both the actor's collection and the engine's receive use (engine-safe module)
from megatron_matpo.rollout.sglang_weights import ring_starts  # noqa: F401 (re-exported)


@dataclass
class Bucket:
    """Tensors packed back to back in `flat` (uint8). Valid until the next bucket is requested:
    the builder reuses its buffer, so a consumer must finish with a bucket before pulling another,
    unless it sets `release`: then the builder may fill the next bucket beside this one (a ring,
    `ring_starts`) and calls `release()` (which waits until the consumer is done) before it reuses
    these bytes. `release` must not raise: the builder may be a collective iteration (collect.py)
    that every rank must walk to its end; the consumer keeps a failure and raises it itself."""
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[torch.Size]
    flat: torch.Tensor
    release: Callable[[], None] | None = None
    start: int = 0  # byte offset of `flat` in the builder's buffer

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    @property
    def dtype_names(self) -> list[str]:
        """dtypes as SGLang's update routes name them (`getattr(torch, name)` on the engine)."""
        return [str(d).removeprefix("torch.") for d in self.dtypes]

    def spans(self) -> list[tuple[str, torch.dtype, torch.Size, int, int]]:
        """(name, dtype, shape, start byte, end byte) of each tensor in `flat`."""
        out, off = [], 0
        for name, dtype, shape in zip(self.names, self.dtypes, self.shapes):
            n = shape.numel() * dtype.itemsize
            out.append((name, dtype, shape, off, off + n))
            off += n
        return out

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views of the packed tensors (for checks; engines rebuild them on their side)."""
        return [(name, self.flat[a:b].view(dtype).reshape(shape)) for name, dtype, shape, a, b in self.spans()]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def iter_buckets(stream: Iterable[tuple[str, torch.Tensor]], max_bytes: int,
                 device: torch.device | str = "cpu", buffer: torch.Tensor | None = None) -> Iterator[Bucket]:
    """Yield buckets of at most `max_bytes` (a larger tensor alone), preserving stream order.

    A bucket is also closed early when the next tensor would start at a byte offset that is not a
    multiple of its element size: the engine's receive buffer views each tensor in place and
    refuses unaligned ones (only happens with mixed dtypes). `device` is where buckets live (the
    broadcast device on NCCL). `buffer` (uint8, at least `max_bytes`) is used instead of a fresh
    allocation, so a caller can keep one buffer across calls.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if buffer is not None and (buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < max_bytes):
        raise ValueError(f"buffer must be a 1-D uint8 tensor of at least {max_bytes} bytes, got "
                         f"{buffer.dtype} {tuple(buffer.shape)}")
    buf = buffer  # else allocated on the first tensor that fits, then reused for every bucket
    names: list[str] = []
    dtypes: list[torch.dtype] = []
    shapes: list[torch.Size] = []
    used = 0

    def take() -> Bucket:
        nonlocal names, dtypes, shapes, used
        b = Bucket(names, dtypes, shapes, buf[:used])
        names, dtypes, shapes, used = [], [], [], 0
        return b

    for name, t in stream:
        n = t.numel() * t.element_size()
        if names and (used + n > max_bytes or used % t.element_size()):
            yield take()
        if n > max_bytes:  # its own bucket, straight from its own storage (no copy on CPU)
            yield Bucket([name], [t.dtype], [t.shape], _as_bytes(t.to(device)))
            continue
        if buf is None:
            buf = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        buf[used:used + n].copy_(_as_bytes(t))
        names.append(name)
        dtypes.append(t.dtype)
        shapes.append(t.shape)
        used += n
    if names:
        yield take()


def plan_buckets(items: Sequence[tuple[int, int]], max_bytes: int) -> list[list[tuple[int, int]]]:
    """The grouping `iter_buckets` makes, from sizes alone: for items (nbytes, element size) in order,
    the buckets as lists of (item index, byte offset in the bucket). Same rules: a bucket closes when
    the next item would overflow it or start unaligned; an item over `max_bytes` is a bucket alone."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    out: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    used = 0
    for i, (n, itemsize) in enumerate(items):
        if cur and (used + n > max_bytes or used % itemsize):
            out.append(cur)
            cur, used = [], 0
        if n > max_bytes:
            out.append([(i, 0)])
            continue
        cur.append((i, used))
        used += n
    if cur:
        out.append(cur)
    return out

