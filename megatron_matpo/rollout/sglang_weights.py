"""Streamed weight updates: a whole sync in one engine call (the second hook of our SGLang plugin).

Why: SGLang 0.5.23 loads one bucket per HTTP call (`/update_weights_from_distributed`,
`/update_weights_from_tensor`), inside a `begin_weight_update` / `end_weight_update` session, and a
cache flush is one more call. Each call crosses HTTP → tokenizer manager → ZMQ → scheduler and back:
~5-10 ms on a CPU host, more than moving a bucket of tens of MiB (benchmarks/weight_sync.py).

Here one call carries the plan of the whole sync (every tensor's name, dtype and shape, and how many
tensors each bucket holds, in `load_format` = "matpo_stream:<n0>,<n1>,..."). The scheduler opens the
session, then for each bucket, in order:
- distributed: receives the bucket's flat bytes by one broadcast from group rank 0 into a receive
  ring (`Ring`) and loads views of it into the model, receiving the next bucket meanwhile;
- tensor: waits for rank 0's doorbell (a one-element broadcast: the bucket is in the shared-memory
  buffer the call mapped once), loads views of the shared buffer in place, then a barrier tells rank 0
  it may refill it.
It then flushes the cache and closes the session. The actor side is `bridge/sync.py` (`sync.stream`).
A failed load does not stop the receiving (rank 0 keeps sending the plan to its end): the rest is
drained and the call answers the first error.

Memory on the engine: the receive ring (distributed: the largest bucket) or none (tensor: the shared
buffer is the actor's). Layout: tensors back to back in a bucket, no padding
(SGLang's `FlattenedTensorBucket`, `bridge/buckets.py`).

Engine processes import this module: no megatron imports (see sglang_plugin.py).
"""
from __future__ import annotations

import math

import torch

STREAM = "matpo_stream:"
SCHEDULER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"


def stream_format(counts: list[int]) -> str:
    """The `load_format` naming a streamed sync of buckets holding `counts` tensors each."""
    return STREAM + ",".join(str(int(c)) for c in counts)


def parse_counts(load_format: str | None) -> list[int] | None:
    """Tensors per bucket of a streamed sync, or None for any other load format."""
    if not load_format or not load_format.startswith(STREAM):
        return None
    counts = [int(x) for x in load_format[len(STREAM):].split(",") if x]
    if not counts or min(counts) < 1:
        raise ValueError(f"load_format {load_format!r}: every bucket needs >= 1 tensor")
    return counts


def bucket_spans(dtypes: list, shapes: list, counts: list[int]) -> list[list[tuple[int, torch.dtype, tuple, int, int]]]:
    """Per bucket: (tensor index, dtype, shape, start byte, end byte), back to back from byte 0."""
    if sum(counts) != len(dtypes) or len(dtypes) != len(shapes):
        raise ValueError(f"a streamed sync of {sum(counts)} tensors in {len(counts)} buckets got "
                         f"{len(dtypes)} dtypes and {len(shapes)} shapes")
    out, i = [], 0
    for c in counts:
        spans, off = [], 0
        for j in range(i, i + c):
            dt = dtypes[j] if isinstance(dtypes[j], torch.dtype) else getattr(torch, dtypes[j])
            n = math.prod(shapes[j]) * dt.itemsize
            if off % dt.itemsize:
                raise ValueError(f"tensor {j} would start unaligned at byte {off} of its bucket")
            spans.append((j, dt, tuple(shapes[j]), off, off + n))
            off += n
        out.append(spans)
        i += c
    return out


def views(flat: torch.Tensor, names: list[str], spans) -> list[tuple[str, torch.Tensor]]:
    return [(names[j], flat[a:b].view(dt).view(shape)) for j, dt, shape, a, b in spans]


def _streamed(manager, recv_req, source: str, buckets, out_cls):
    """Open the session, load every bucket `buckets` yields (an iterator of named tensor lists that
    receives as it goes), flush, close; drain the rest after a failure. Returns `out_cls`."""
    from sglang.srt.managers.io_struct import BeginWeightUpdateReqInput, EndWeightUpdateReqInput

    opened = manager._session is None
    if opened:
        r = manager.begin_weight_update(BeginWeightUpdateReqInput(selector=recv_req.selector))
        if not r.success:
            for _ in buckets:  # rank 0 sends the whole plan whatever we answer
                pass
            return out_cls(success=False, message=r.message)
    success, message = True, "Succeeded to update parameter online."
    try:
        with manager._observe_weight_load(source):
            runners = manager._select_runners(recv_req.selector)
            for tensors in buckets:
                if not success:
                    continue  # drain
                try:
                    for _, runner in runners:
                        success, message = runner.weight_updater.load_weights_from_distributed(tensors)
                        if not success:
                            break
                except Exception as e:  # noqa: BLE001 (answered to the caller; the stream is drained)
                    success, message = False, f"streamed weight update failed: {type(e).__name__}: {e}"
            if success:
                import msgspec

                manager._session = msgspec.structs.replace(manager._session, loaded_weights=True)
                manager.record_weight_version_after_update(recv_req.weight_version)
    finally:
        if opened:
            manager.end_weight_update(EndWeightUpdateReqInput())
    if success:
        success, message = manager.flush_cache_after_weight_update(recv_req, success, message)
    return out_cls(success=success, message=message)


def update_from_distributed(original, manager, recv_req):
    """AROUND `SchedulerWeightUpdaterManager.update_weights_from_distributed`."""
    counts = parse_counts(recv_req.load_format)
    if counts is None:
        return original(manager, recv_req)
    from sglang.srt.managers.io_struct import UpdateWeightsFromDistributedReqOutput

    target = manager.tp_worker.model_runner.weight_updater
    group = target._model_update_group[recv_req.group_name]
    plan = bucket_spans(recv_req.dtypes, recv_req.shapes, counts)
    ring = Ring([spans[-1][4] for spans in plan], target.device)

    def buckets():
        # bucket k+1 is received (gloo's background thread) while the caller loads bucket k, when both fit
        # in the ring; else k is loaded first
        pending = None
        for k, spans in enumerate(plan):
            start = ring.place(k)
            if start is None:  # no room beside the bucket being loaded: finish it first
                yield pending
                pending, start = None, ring.place(k, alone=True)
            flat = ring.buf[start:start + spans[-1][4]]
            work = torch.distributed.broadcast(flat, src=0, group=group, async_op=True)
            if pending is not None:
                yield pending
            work.wait()
            pending = views(flat, recv_req.names, spans)
        if pending is not None:
            yield pending

    try:
        return _streamed(manager, recv_req, "distributed", buckets(), UpdateWeightsFromDistributedReqOutput)
    finally:
        del ring


class Ring:
    """The receive buffer of a streamed broadcast, the size of the largest bucket (what SGLang's own
    per-bucket receive allocates): where the next bucket fits beside the one being loaded (bundled
    buckets next to a larger lone tensor's), it is received meanwhile; else it waits for that load."""

    def __init__(self, sizes: list[int], device) -> None:
        self.sizes = sizes
        self.buf = torch.empty(max(sizes), dtype=torch.uint8, device=device)
        self.prev: tuple[int, int] | None = None  # the region of the bucket in flight

    def place(self, k: int, alone: bool = False) -> int | None:
        n, cap = self.sizes[k], self.buf.numel()
        if alone or self.prev is None:
            start = 0
        elif self.prev[1] + n <= cap:
            start = self.prev[1]
        elif n <= self.prev[0]:
            start = 0
        else:
            return None
        self.prev = (start, start + n)
        return start


def update_from_tensor(original, manager, recv_req):
    """AROUND `SchedulerWeightUpdaterManager.update_weights_from_tensor`: the payload is a dict with the
    shared buffer ("buffer"), "names", "dtypes", "shapes" and the doorbell group's name ("group")."""
    counts = parse_counts(recv_req.load_format)
    if counts is None:
        return original(manager, recv_req)
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqOutput

    payload = manager.tp_worker.deserialize_own_rank(recv_req.serialized_named_tensors)
    target = manager.tp_worker.model_runner.weight_updater
    group = target._model_update_group[payload["group"]]
    shared = payload["buffer"]
    plan = bucket_spans(payload["dtypes"], payload["shapes"], counts)
    bell = torch.zeros(1, dtype=torch.int64)

    def buckets():
        for k, spans in enumerate(plan):
            torch.distributed.broadcast(bell, src=0, group=group)  # bucket k is in the shared buffer
            if int(bell) != k:
                raise RuntimeError(f"streamed tensor sync out of step: doorbell {int(bell)} for bucket {k}")
            yield views(shared[:spans[-1][4]], payload["names"], spans)
            torch.distributed.barrier(group=group)  # loaded: rank 0 may refill the buffer

    out = _streamed(manager, recv_req, "tensor", buckets(), UpdateWeightsFromTensorReqOutput)
    torch.distributed.barrier(group=manager.tp_cpu_group)
    return out


def register(registry, hook_type) -> None:
    registry.register(f"{SCHEDULER}.update_weights_from_distributed", update_from_distributed, hook_type.AROUND)
    registry.register(f"{SCHEDULER}.update_weights_from_tensor", update_from_tensor, hook_type.AROUND)
