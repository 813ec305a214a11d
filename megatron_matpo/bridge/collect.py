"""Buckets of HF tensors assembled on actor rank 0 from every rank's own slices (`reshard.py`).

`resharded_buckets` is a collective generator: every actor rank iterates it to the end; rank 0 gets
each `Bucket` (valid until it asks for the next), the others get None. Two ways for the slices to meet:

- "shared_memory" (CPU, every actor rank on rank 0's host): one named shared-memory buffer, made by
  rank 0 and mapped by every rank; each rank copies its slices straight into it, then a barrier.
  Nothing crosses a socket, the ranks copy in parallel, and the buffer is the tensor transport's
  payload as it is (the engine maps the same memory). It stays mapped across syncs.
- "p2p" (GPU, or ranks on several hosts): each rank packs its slices of the bucket into one message
  and sends it to rank 0 (one send per rank per bucket), which unpacks them into the bucket.

Either way rank 0 holds one bucket (at least the largest tensor) plus, for p2p, the staging of the
other ranks' slices of it; no rank ever holds a full tensor it does not own.
"""
from __future__ import annotations

import shutil
import socket
from typing import Iterator

import torch

from megatron_matpo.bridge.buckets import Bucket, plan_buckets, ring_starts
from megatron_matpo.bridge.reshard import HFTensor, Resharder
from megatron_matpo.bridge.sync_config import COLLECT


def choose(collect: str, cuda: bool, nbytes: int) -> str:
    """The collection `auto` means here (collective: every rank must call it). Shared memory needs every
    actor rank on one host, CPU buckets, and room for the `nbytes` buffer in /dev/shm (a container's
    default is 64 MB; a full /dev/shm would kill the ranks with SIGBUS when they touch the buffer)."""
    if collect not in COLLECT:
        raise ValueError(f"sync.collect: {collect!r}, expected one of {', '.join(COLLECT)}")
    hosts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    one_host = len(set(hosts)) == 1
    try:
        room = shutil.disk_usage("/dev/shm").free
    except OSError:
        room = 0
    if collect == "auto":
        return "shared_memory" if one_host and not cuda and room >= nbytes else "p2p"
    if collect == "shared_memory" and (cuda or not one_host or room < nbytes):
        raise ValueError(f"sync.collect='shared_memory' needs CPU buckets, every actor rank on one host and "
                         f"{nbytes / 2**20:.0f} MiB free in /dev/shm; hosts {sorted(set(hosts))}, cuda={cuda}, "
                         f"/dev/shm free {room / 2**20:.0f} MiB (use 'p2p' or 'auto')")
    return collect


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer in named shared memory, the same pages on every rank (collective)."""
    import torch.multiprocessing as mp

    rank0 = torch.distributed.get_rank() == 0
    handle = [None]
    if rank0:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        prev = mp.get_sharing_strategy()
        mp.set_sharing_strategy("file_system")  # scoped: the rest of the process keeps the default
        try:
            buf.share_memory_()
        finally:
            mp.set_sharing_strategy(prev)
        manager, name, size = buf.untyped_storage()._share_filename_cpu_()
        handle = [(manager, name, size)]
    torch.distributed.broadcast_object_list(handle, src=0)
    if rank0:
        return buf
    manager, name, size = handle[0]
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, name, size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def bucket_layout(rs: Resharder, max_bytes: int) -> list[list[tuple[HFTensor, int]]]:
    plan = plan_buckets([(t.nbytes, t.dtype.itemsize) for t in rs.tensors], max_bytes)
    return [[(rs.tensors[i], off) for i, off in b] for b in plan]


def buffer_bytes(rs: Resharder, max_bytes: int) -> int:
    """One bucket, or the largest tensor where it is larger (it travels alone)."""
    return max([max_bytes] + [t.nbytes for t in rs.tensors])


def _view(buf: torch.Tensor, t: HFTensor, off: int) -> torch.Tensor:
    return buf[off:off + t.nbytes].view(t.dtype).view(t.shape)


def bucket_bytes(layout: list[tuple[HFTensor, int]]) -> int:
    return max(off + t.nbytes for t, off in layout)


def _bucket(buf: torch.Tensor, layout: list[tuple[HFTensor, int]], start: int = 0) -> Bucket:
    return Bucket([t.name for t, _ in layout], [t.dtype for t, _ in layout],
                  [torch.Size(t.shape) for t, _ in layout], buf[start:start + bucket_bytes(layout)], start=start)


def _release(b: Bucket | None) -> None:
    if b is not None and b.release is not None:
        release, b.release = b.release, None
        release()


def resharded_buckets(rs: Resharder, layout: list[list[tuple[HFTensor, int]]], how: str,
                      buf: torch.Tensor | None) -> Iterator[Bucket | None]:
    """Collective: see the module docstring. `buf` is the bucket buffer (shared memory for
    "shared_memory", on every rank; rank 0's CPU or device buffer for "p2p", None elsewhere).

    Shared memory: the buffer is a ring (`ring_starts`): while rank 0's consumer still sends bucket k
    (it set `Bucket.release`), every rank fills bucket k+1 beside it, and one barrier per bucket says
    both "every slice of k+1 is in" and "rank 0 has released k" (k+2 may then reuse k's bytes)."""
    rank0 = torch.distributed.get_rank() == 0
    if how != "shared_memory":
        prev = None
        for bucket in layout:
            if rank0:
                _release(prev)  # one buffer: the previous bucket must be gone before it is refilled
            _p2p_fill(rs, bucket, buf)
            prev = _bucket(buf, bucket) if rank0 else None
            yield prev
        if rank0:
            _release(prev)
        return
    starts = ring_starts([bucket_bytes(b) for b in layout], buf.numel())
    prev = None
    for bucket, (start, clear) in zip(layout, starts):
        if prev is not None and not clear:  # this bucket reuses the bytes of the one rank 0 may still send
            if rank0:
                _release(prev)
            torch.distributed.barrier()
        sub = buf[start:]
        for t, off in bucket:
            rs.fill(t, _view(sub, t, off))
        if rank0:
            _release(prev)  # (the previous bucket went out while this one was filled)
        torch.distributed.barrier()  # every rank's slices are in; rank 0 has released the previous bucket
        prev = _bucket(buf, bucket, start)
        yield prev if rank0 else None
    if rank0:
        _release(prev)


def ring_layout(layout: list[list[tuple[HFTensor, int]]], capacity: int) -> list[int]:
    """The byte offset of each bucket in the shared-memory ring (what the tensor path tells the engine)."""
    return [start for start, _ in ring_starts([bucket_bytes(b) for b in layout], capacity)]


def _p2p_fill(rs: Resharder, bucket: list[tuple[HFTensor, int]], buf: torch.Tensor | None) -> None:
    """Rank 0 receives each other rank's slices of this bucket as one message, in plan order."""
    rank = torch.distributed.get_rank()
    if rank == 0:
        device = buf.device
        staged = {}
        for r in sorted({q.rank for t, _ in bucket for q in t.pieces if q.rank != 0}):
            n = sum(q_bytes(t, q) for t, _ in bucket for q in t.pieces if q.rank == r)
            staged[r] = (torch.empty(n, dtype=torch.uint8, device=device), None)
            staged[r] = (staged[r][0], torch.distributed.irecv(staged[r][0], src=r))
        for t, off in bucket:
            rs.fill(t, _view(buf, t, off))
        for r, (flat, work) in staged.items():
            work.wait()
            pos = 0
            for t, off in bucket:
                dest = _view(buf, t, off)
                for q in t.pieces:
                    if q.rank != r:
                        continue
                    out = dest if q.dim is None else dest.narrow(q.dim, q.start, q.length)
                    n = out.numel() * out.element_size()
                    out.copy_(flat[pos:pos + n].view(t.dtype).view(out.shape))
                    pos += n
        return
    parts = [rs.source(q).contiguous().reshape(-1).view(torch.uint8) for t, _ in bucket for q in rs.mine(t)]
    if parts:
        torch.distributed.send(torch.cat(parts), dst=0)


def q_bytes(t: HFTensor, q) -> int:
    """Bytes of piece `q` of tensor `t`."""
    if q.dim is None:
        return t.nbytes
    return t.nbytes // t.shape[q.dim] * q.length
