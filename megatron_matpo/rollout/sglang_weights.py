"""Streamed weight updates: a whole sync in one engine call (the second hook of our SGLang plugin).

Why: SGLang 0.5.23 loads one bucket per HTTP call (`/update_weights_from_distributed`,
`/update_weights_from_tensor`), inside a `begin_weight_update` / `end_weight_update` session, and a
cache flush is one more call. Each call crosses HTTP → tokenizer manager → ZMQ → scheduler and back:
~5-10 ms on a CPU host, more than moving a bucket of tens of MiB (benchmarks/weight_sync.py).

Here one call carries the plan of the whole sync (every tensor's name, dtype and shape, and how many
tensors each bucket holds, in `load_format` = "matpo_stream:<n0>,<n1>,...;direct_min=<bytes>"). The
scheduler opens the session, then for each bucket, in order:
- distributed: receives the bucket by broadcasts from group rank 0, one per `segments` (each tensor
  of >= `sync.direct_min_kib` alone, each run of smaller ones together): a tensor whose whole load is one
  copy into a contiguous slice of a parameter of its dtype (`direct_targets`) is received straight
  into that slice, the rest into a receive ring (`ring_starts`) whose views are loaded into the model,
  receiving the next bucket meanwhile;
- tensor: waits for rank 0's doorbell (a one-element broadcast: the bucket is in the shared-memory
  buffer the call mapped once), loads views of the shared buffer in place, then a barrier tells rank 0
  it may refill it.
It then flushes the cache and closes the session, and appends its profile to the answer (`read_profile`:
seconds waiting for buckets, loading them, flushing; MiB received straight into parameters). The actor side is `bridge/sync.py` (`sync.stream`).
A call it cannot start (no such group, a bad plan) is refused before the first bucket, so rank 0 stops
at once; a failed load does not stop the receiving (rank 0 keeps sending the plan to its end): the rest
is drained and the call answers the first error. Either way the scheduler never sees an exception.

Written against SGLang 0.5.23's `SchedulerWeightUpdaterManager` (its session, runner selection, cache
flush and weight-version bookkeeping are called, not copied); tests/test_bridge.py syncs through it.

Why straight into the parameters: on the broadcast path SGLang's load is one more full copy of every
byte (a third of a sync's CPU time at 982 MiB on 2 cores, docs/benchmarks.md); where the model's own
loader would only copy the tensor into a slice of a parameter, receiving into that slice is the same
result without the copy. Which tensors qualify is asked of the model's `load_weights` itself, per sync
inside the session (a parameter may be re-created between syncs): each candidate is loaded as a
storage-less probe and the writes it would make are recorded instead of done (`direct_targets`).

Memory on the engine: the receive ring (distributed: the largest bucket) or none (tensor: the shared
buffer is the actor's). Layout: tensors back to back in a bucket, no padding
(SGLang's `FlattenedTensorBucket`, `bridge/buckets.py`).

Engine processes import this module: no megatron imports (see sglang_plugin.py).
"""
from __future__ import annotations

import math
import re
import time

import torch

STREAM = "matpo_stream:"
PROFILE = " [matpo_stream wait_s={wait_s:.4f} load_s={load_s:.4f} flush_s={flush_s:.4f} direct_mib={direct_mib:.2f}]"
# the default of sync.direct_min_kib: a tensor this large travels in its own broadcast (so it can land in a
# parameter); smaller ones share one per run: a collective costs ~0.1-1 ms on gloo, more than copying 64 KiB
DIRECT_MIN_BYTES = 1 << 16
SCHEDULER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"


def stream_format(counts: list[int], direct_min_bytes: int = DIRECT_MIN_BYTES) -> str:
    """The `load_format` naming a streamed sync of buckets holding `counts` tensors each, tensors of
    `direct_min_bytes` or more travelling alone (`segments`)."""
    return f"{STREAM}{','.join(str(int(c)) for c in counts)};direct_min={int(direct_min_bytes)}"


def is_stream(load_format: str | None) -> bool:
    return bool(load_format) and load_format.startswith(STREAM)


def parse_plan(load_format: str) -> tuple[list[int], int]:
    """Tensors per bucket of a streamed sync, and its `direct_min_bytes`."""
    body, _, opt = load_format[len(STREAM):].partition(";direct_min=")
    counts = [int(x) for x in body.split(",") if x]
    if not counts or min(counts) < 1:
        raise ValueError(f"load_format {load_format!r}: every bucket needs >= 1 tensor")
    direct_min = int(opt) if opt else DIRECT_MIN_BYTES
    if direct_min < 1:
        raise ValueError(f"load_format {load_format!r}: direct_min must be >= 1")
    return counts, direct_min


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


def ring_starts(sizes: list[int], capacity: int) -> list[tuple[int, bool]]:
    """Where each bucket of `sizes` bytes goes in a buffer of `capacity` bytes used as a ring, and whether
    it is clear of the bucket before it (so it can be filled while that one is still being sent): after
    the previous bucket if it fits there, else at the start if it ends before the previous one begins,
    else at the start once the previous one is released. Two buckets are never in flight beside a third:
    the one before the previous is released before this one is filled."""
    out: list[tuple[int, bool]] = []
    prev = None
    for n in sizes:
        if n > capacity:
            raise ValueError(f"a {n}-byte bucket does not fit the {capacity}-byte buffer")
        if prev is None:
            start, clear = 0, True
        elif prev[1] + n <= capacity:
            start, clear = prev[1], True
        else:
            start, clear = 0, n <= prev[0]
        out.append((start, clear))
        prev = (start, start + n)
    return out


def segments(spans, min_bytes: int) -> list[list[tuple]]:
    """A bucket's broadcasts (both ends cut it the same way): each span of >= `min_bytes` alone, each run
    of smaller ones together; a segment's bytes are [first span's start, last span's end)."""
    out: list[list[tuple]] = []
    for sp in spans:
        if sp[4] - sp[3] >= min_bytes:
            out.append([sp])
        elif out and out[-1][-1][4] - out[-1][-1][3] < min_bytes:
            out[-1].append(sp)
        else:
            out.append([sp])
    return out


def _sid(t: torch.Tensor) -> int:
    """Identifies a tensor's storage (a view of a probe shares its probe's)."""
    return t.untyped_storage()._cdata


class _Probe(torch.Tensor):
    """A storage-less (meta) stand-in for a received tensor. A `copy_` from it into a real tensor is
    recorded as (probe storage, destination, source), not done; any other in-place write involving it is
    recorded with destination None, not done."""
    writes: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (func is torch.Tensor.copy_ and len(args) >= 2 and isinstance(args[1], _Probe)
                and not isinstance(args[0], _Probe)):
            cls.writes.append((_sid(args[1]), args[0], args[1]))
            return args[0]
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):
            for a in (*args, *(kwargs or {}).values()):
                if isinstance(a, _Probe):
                    cls.writes.append((_sid(a), None, a))
            return args[0] if args else None
        return super().__torch_function__(func, types, args, kwargs or {})


def _probe_writes(model, named: list[tuple[str, torch.Tensor]]) -> list:
    _Probe.writes = []
    try:
        model.load_weights(named)
        return _Probe.writes
    finally:
        _Probe.writes = []


def direct_targets(model, names: list[str], dtypes: list, shapes: list, indices) -> dict[int, torch.Tensor]:
    """For each tensor index in `indices` whose load by `model.load_weights` is exactly one copy of the
    whole tensor (no narrowing, cast, transpose or second destination, e.g. a tied head) into a
    contiguous slice of one parameter of its dtype: that slice, shaped as the tensor. Nothing is
    written to the model. One call of the loader for all of them (it rebuilds its parameter table per
    call); if that raises, one call per tensor, and a tensor whose own call raises is not direct."""
    probes: dict[int, torch.Tensor] = {}
    for j in indices:
        dt = dtypes[j] if isinstance(dtypes[j], torch.dtype) else getattr(torch, dtypes[j])
        probes[j] = torch.empty(tuple(shapes[j]), dtype=dt, device="meta").as_subclass(_Probe)
    owner = {_sid(p): j for j, p in probes.items()}
    by_j: dict[int, list | None] = {j: [] for j in probes}  # None: its loader raised
    try:
        writes = _probe_writes(model, [(names[j], p) for j, p in probes.items()])
        if any(w[0] not in owner for w in writes):  # from a tensor computed from a probe: whose is unknown
            raise LookupError("a write from a derived tensor")
        for w in writes:
            by_j[owner[w[0]]].append(w)
    except Exception:  # noqa: BLE001 (ask per tensor)
        for j, p in probes.items():
            try:
                by_j[j] = _probe_writes(model, [(names[j], p)])
            except Exception:  # noqa: BLE001 (this tensor is loaded the usual way)
                by_j[j] = None
    out: dict[int, torch.Tensor] = {}
    for j, writes in by_j.items():
        if writes is None or len(writes) != 1 or writes[0][1] is None:  # raised; none or several writes; in place
            continue
        _, dst, src = writes[0]
        probe = probes[j]
        whole = (_sid(src) == _sid(probe) and src.shape == probe.shape and src.stride() == probe.stride()
                 and src.storage_offset() == 0)
        if (whole and isinstance(dst, torch.Tensor) and not isinstance(dst, _Probe) and dst.dtype == probe.dtype
                and dst.is_contiguous() and dst.numel() == probe.numel() and dst.device.type != "meta"):
            out[j] = dst.detach().view(probe.shape)  # the same memory, outside autograd (written by a collective)
    return out


def _group(updater, name: str):
    groups = updater._model_update_group
    if name not in groups:
        raise KeyError(f"no weight-update group {name!r} on this engine (it has {sorted(groups)}): "
                       "it was destroyed, or the engine restarted")
    return groups[name]


def _refused(e: BaseException) -> str:
    return f"streamed weight update refused before its first bucket: {type(e).__name__}: {e}"


def views(flat: torch.Tensor, names: list[str], spans) -> list[tuple[str, torch.Tensor]]:
    return [(names[j], flat[a:b].view(dt).view(shape)) for j, dt, shape, a, b in spans]


def _streamed(manager, recv_req, source: str, buckets, out_cls, direct: list | None = None):
    """Open the session, load every bucket `buckets` yields (an iterator of named tensor lists that
    receives as it goes), flush, close; drain the rest after a failure. Returns `out_cls`. `direct`:
    where `buckets` counts the bytes it received straight into parameters (for the profile)."""
    from sglang.srt.managers.io_struct import BeginWeightUpdateReqInput, EndWeightUpdateReqInput

    opened = manager._session is None
    if opened:
        r = manager.begin_weight_update(BeginWeightUpdateReqInput(selector=recv_req.selector))
        if not r.success:
            for _ in buckets:  # rank 0 sends the whole plan whatever we answer
                pass
            return out_cls(success=False, message=r.message)
    success, message = True, "Succeeded to update parameter online."
    wait_s = load_s = 0.0  # the engine's profile: waiting for the next bucket, loading buckets
    try:
        with manager._observe_weight_load(source):
            runners = manager._select_runners(recv_req.selector)
            it = iter(buckets)
            while True:
                t0 = time.perf_counter()
                tensors = next(it, None)
                t1 = time.perf_counter()
                wait_s += t1 - t0
                if tensors is None:
                    break
                if not success or not tensors:
                    continue  # drain; or every tensor of the bucket landed in its parameter (no load call:
                    # SGLang's walks the model's modules and parameters each time, ~1 ms on a CPU host)
                try:
                    for _, runner in runners:
                        success, message = runner.weight_updater.load_weights_from_distributed(tensors)
                        if not success:
                            break
                except Exception as e:  # noqa: BLE001 (answered to the caller; the stream is drained)
                    success, message = False, f"streamed weight update failed: {type(e).__name__}: {e}"
                load_s += time.perf_counter() - t1
            if success:
                import msgspec

                manager._session = msgspec.structs.replace(manager._session, loaded_weights=True)
                manager.record_weight_version_after_update(recv_req.weight_version)
    finally:
        if opened:
            manager.end_weight_update(EndWeightUpdateReqInput())
    if success:
        t0 = time.perf_counter()
        success, message = manager.flush_cache_after_weight_update(recv_req, success, message)
        message += PROFILE.format(wait_s=wait_s, load_s=load_s, flush_s=time.perf_counter() - t0,
                                  direct_mib=sum(direct or []) / 2**20)
    return out_cls(success=success, message=message)


def read_profile(message: str) -> dict[str, float]:
    """The engine's profile a streamed call appends to its answer: wait_s, load_s, flush_s, direct_mib."""
    m = re.search(r"\[matpo_stream wait_s=([0-9.]+) load_s=([0-9.]+) flush_s=([0-9.]+) direct_mib=([0-9.]+)\]",
                  message or "")
    return {"wait_s": float(m[1]), "load_s": float(m[2]), "flush_s": float(m[3]),
            "direct_mib": float(m[4])} if m else {}


def update_from_distributed(original, manager, recv_req):
    """AROUND `SchedulerWeightUpdaterManager.update_weights_from_distributed`."""
    if not is_stream(recv_req.load_format):
        return original(manager, recv_req)
    from sglang.srt.managers.io_struct import UpdateWeightsFromDistributedReqOutput

    try:  # refused before any bucket: rank 0 sees the failed call and stops sending
        target = manager.tp_worker.model_runner.weight_updater
        group = _group(target, recv_req.group_name)
        counts, direct_min = parse_plan(recv_req.load_format)
        plan = bucket_spans(recv_req.dtypes, recv_req.shapes, counts)
        cuts = [segments(spans, direct_min) for spans in plan]  # each bucket's broadcasts
        sizes = [spans[-1][4] for spans in plan]
        buf = torch.empty(max(sizes), dtype=torch.uint8, device=target.device)  # SGLang's own receive size
    except Exception as e:  # noqa: BLE001 (answered to the caller, never raised into the scheduler)
        return UpdateWeightsFromDistributedReqOutput(success=False, message=_refused(e))

    received_direct: list[int] = []

    def buckets():
        # runs inside the session: the parameters asked for are the ones this sync loads into
        solo = [seg[0][0] for segs in cuts for seg in segs if len(seg) == 1 and seg[0][4] - seg[0][3] >= direct_min]
        try:
            # one model only (a tensor received into the target's parameter would never reach a draft model),
            # and not quantized (its loaders keep state across shards that a probe must not disturb)
            runners = manager._select_runners(recv_req.selector)
            plain = len(runners) == 1 and getattr(getattr(runners[0][1], "model_config", None), "quantization",
                                                   None) is None
            direct = (direct_targets(runners[0][1].weight_updater.get_model(), recv_req.names, recv_req.dtypes,
                                     recv_req.shapes, solo) if plain else {})
        except Exception:  # noqa: BLE001 (every tensor is then received into the ring and loaded)
            direct = {}
        # the receive buffer as a ring: bucket k+1 is received (gloo's background thread) while the caller
        # loads bucket k where it fits beside it, else k is loaded first
        pending = None
        for spans, segs, (start, clear) in zip(plan, cuts, ring_starts(sizes, buf.numel())):
            if pending is not None and not clear:
                yield pending
                pending = None
            flat = buf[start:start + spans[-1][4]]
            works, loads = [], []
            for seg in segs:
                into = direct.get(seg[0][0]) if len(seg) == 1 else None
                if into is not None:
                    received_direct.append(seg[0][4] - seg[0][3])
                    into = into.view(-1).view(torch.uint8)
                else:
                    into = flat[seg[0][3]:seg[-1][4]]
                    loads += views(flat, recv_req.names, seg)
                works.append(torch.distributed.broadcast(into, src=0, group=group, async_op=True))
            if pending is not None:
                yield pending
            for work in works:
                work.wait()
            pending = loads
        if pending is not None:
            yield pending

    return _streamed(manager, recv_req, "distributed", buckets(), UpdateWeightsFromDistributedReqOutput,
                     received_direct)


def update_from_tensor(original, manager, recv_req):
    """AROUND `SchedulerWeightUpdaterManager.update_weights_from_tensor`: the payload is a dict with the
    shared buffer ("buffer"), "names", "dtypes", "shapes", each bucket's byte offset in the buffer
    ("starts": the actor fills it as a ring) and the doorbell group's name ("group")."""
    if not is_stream(recv_req.load_format):
        return original(manager, recv_req)
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqOutput

    try:  # refused before any bucket: rank 0 sees the failed call and stops sending
        payload = manager.tp_worker.deserialize_own_rank(recv_req.serialized_named_tensors)
        group = _group(manager.tp_worker.model_runner.weight_updater, payload["group"])
        shared = payload["buffer"]
        plan = bucket_spans(payload["dtypes"], payload["shapes"], parse_plan(recv_req.load_format)[0])
    except Exception as e:  # noqa: BLE001 (answered to the caller, never raised into the scheduler)
        torch.distributed.barrier(group=manager.tp_cpu_group)
        return UpdateWeightsFromTensorReqOutput(success=False, message=_refused(e))
    bell = torch.zeros(1, dtype=torch.int64)

    def buckets():
        for k, spans in enumerate(plan):
            torch.distributed.broadcast(bell, src=0, group=group)  # bucket k is in the shared buffer
            if int(bell) != k:
                raise RuntimeError(f"streamed tensor sync out of step: doorbell {int(bell)} for bucket {k}")
            start = payload["starts"][k]
            yield views(shared[start:start + spans[-1][4]], payload["names"], spans)
            torch.distributed.barrier(group=group)  # loaded: rank 0 may refill the buffer

    out = _streamed(manager, recv_req, "tensor", buckets(), UpdateWeightsFromTensorReqOutput)
    torch.distributed.barrier(group=manager.tp_cpu_group)
    return out


def register(registry, hook_type) -> None:
    registry.register(f"{SCHEDULER}.update_weights_from_distributed", update_from_distributed, hook_type.AROUND)
    registry.register(f"{SCHEDULER}.update_weights_from_tensor", update_from_tensor, hook_type.AROUND)
