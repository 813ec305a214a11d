"""Weight sync: the Megatron actor's weights, resharded to HF layout, into every SGLang engine.

`WeightSync` runs collectively on every actor rank. megatron-bridge's `export_hf_weights` gathers
each HF-named full tensor over TP and PP (all ranks take part); actor rank 0 alone talks to the
engines, in buckets of at most `bucket_mb`, reusing one buffer (see `buckets.py`). Three transports:

- broadcast (disaggregated engines): actor rank 0 and every engine TP rank form a process group
  through the engines' `/init_weights_update_group` (gloo on CPU, NCCL on CUDA), set up on the first
  sync and reused. Per bucket, every engine gets `/update_weights_from_distributed` (names, dtypes,
  shapes, `load_format="flattened_bucket"`) while rank 0 broadcasts the bucket's flat bytes; the HTTP
  calls return only once the broadcast has landed, so they run concurrently with it.
- tensor (engines on this host): `/update_weights_from_tensor` with a `MultiprocessingSerializer`
  payload. torch's default CPU sharing passes a file descriptor through `multiprocessing`'s
  resource sharer, which authenticates with the *sender's* process authkey: an unrelated SGLang
  process fails with `AuthenticationError` (and in 0.5.23 that kills the engine). We share buckets
  through named shared memory instead (torch's "file_system" strategy, `rebuild_storage_filename`,
  which SGLang's safe unpickler allows): zero bytes of weights over HTTP.
- disk (fallback, any topology with a shared filesystem): rank 0 writes an HF safetensors directory
  (`convert.SafetensorsShardWriter`), then every engine gets `/update_weights_from_disk`.

Streamed (`sync.stream`, the default with our resharded export): broadcast and tensor make one call per
engine for the whole sync instead of one per bucket. The call carries the plan (every tensor's name,
dtype, shape, and the tensors per bucket); the engine opens the session, takes each bucket as rank 0
hands it over (broadcast: its bytes; tensor: a doorbell broadcast for the shared bucket buffer it mapped
once, then a barrier once loaded), flushes and closes (`rollout/sglang_weights.py`, our plugin's hooks).
Per call ~5-10 ms on a CPU host: the per-bucket calls cost more than the bytes at tens of MiB.

SGLang 0.5.23 refuses tensor and distributed updates outside a `begin_weight_update` /
`end_weight_update` session; disk updates need none. Every path flushes the engines' radix/KV cache
afterwards (cached prefixes were computed with the old weights). Engines must be idle during a
sync: SGLang refuses to flush a cache with requests in flight, and the sync then fails.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import timedelta
from pathlib import Path
from typing import Any, Coroutine, Iterable
from urllib.parse import urlparse

import torch

from megatron_matpo import platform
from megatron_matpo.bridge.buckets import Bucket, iter_buckets
from megatron_matpo.bridge.sync_config import MODES, SyncConfig  # noqa: F401 (MODES re-exported)
from megatron_matpo.rollout.engine import EngineClient

_DISK_SUBDIR = "matpo-weight-sync"


class _EngineLoop:
    """An asyncio loop on a daemon thread for rank 0's engine calls, so they can be in flight while
    the main thread broadcasts (an update call returns only after the broadcast it waits for)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="weight-sync-http", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_all(self, coros: Iterable[Coroutine], timeout_s: float) -> list[Any]:
        """Run concurrently; wait for all (first error raised once all have finished)."""
        futs = [self.submit(c) for c in coros]
        wait_futures(futs, timeout=timeout_s)
        return [f.result(timeout=0) for f in futs]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _host(url: str) -> str:
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"engine url {url!r} has no host")
    return host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _is_this_host(host: str) -> bool:
    if _is_loopback(host):
        return True
    try:
        ip = socket.gethostbyname(host)
        mine = {socket.gethostbyname(socket.gethostname()), socket.gethostbyname(socket.getfqdn())}
        # an address of one of this host's interfaces is its own source address on the route to it
        # (the hostname may resolve to loopback only, as in many /etc/hosts)
        return ip in mine or _address_towards(ip) == ip
    except OSError:
        return False


def _address_towards(host: str) -> str:
    """This host's address on the route to `host` (a UDP connect sends nothing)."""
    if _is_loopback(host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return s.getsockname()[0]


@contextlib.contextmanager
def _named_shared_memory():
    """Pickle CPU storages as named shared memory (torch's "file_system" sharing) for the duration.
    Scoped: the strategy is process-global and the rest of the trainer keeps the default."""
    import torch.multiprocessing as mp

    prev = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        mp.set_sharing_strategy(prev)


def _shared_memory_payload(bucket: Bucket) -> str:
    """A `flattened_bucket` payload: the flat bytes as a shared-memory name, the layout as SGLang's
    `FlattenedTensorMetadata`. One payload per receiving process: torch hands one shared-memory
    reference to each pickle, and each unpickle consumes one."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    meta = [FlattenedTensorMetadata(name=n, shape=s, dtype=d, start_idx=a, end_idx=b, numel=b - a)
            for n, d, s, a, b in bucket.spans()]
    return _pickled_shared({"flattened_tensor": bucket.flat, "metadata": meta})


def _pickled_shared(payload: dict) -> str:
    """A base64 `MultiprocessingSerializer` payload whose CPU tensors travel as named shared memory."""
    from multiprocessing.reduction import ForkingPickler

    with _named_shared_memory():
        data = ForkingPickler.dumps(payload)
    return base64.b64encode(data).decode("ascii")


def _slowest_engine(answers: list[dict]) -> dict[str, float]:
    """The streamed calls' engine profiles (rollout/sglang_weights.py), the slowest engine's per part."""
    from megatron_matpo.rollout.sglang_weights import read_profile

    profiles = [read_profile(a.get("message", "")) for a in answers if isinstance(a, dict)]
    if not profiles:
        return {}
    out = {k: max(p.get(k, 0.0) for p in profiles) for k in ("wait_s", "load_s", "flush_s")}
    out["direct_mib"] = min(p.get("direct_mib", 0.0) for p in profiles)  # received into parameters, every engine
    return out


class _AllOf:
    """Several collectives' works awaited as one (a bucket's segments)."""

    def __init__(self, works: list) -> None:
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True


def _explain(exc: BaseException) -> str:
    """An engine error with SGLang's own message when the HTTP layer hid it."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"{exc} -- {exc.response.text.strip()[:500]}"
    return f"{type(exc).__name__}: {exc}"


class WeightSync:
    """Pushes the actor's current weights into every engine. Collective: every actor rank builds
    one with the same arguments and calls `sync()` / `close()` in the same order; rank 0 talks to
    the engines and returns the stats, other ranks only take part in the gathers and return {}."""

    def __init__(self, cfg: SyncConfig, built, engine_urls: list[str]):
        if not engine_urls:
            raise ValueError("WeightSync needs at least one engine url")
        self.cfg = cfg
        self.built = built
        self.engine_urls = list(engine_urls)
        self.rank0 = torch.distributed.get_rank() == 0
        self.syncs = 0
        self.groups_formed = 0  # broadcast groups set up so far (1 when the group is reused)
        self._closed = False
        self._group = None  # actor side of the broadcast group (rank 0, broadcast mode)
        self._group_name = f"{cfg.group_name}-{uuid.uuid4().hex[:8]}"
        self._disk_root: Path | None = None
        self._own_disk_root = False
        self._loop: _EngineLoop | None = None
        self._clients: list[EngineClient] = []
        self._tp: list[int] | None = None  # engines' TP sizes, asked once
        self._buffer: torch.Tensor | None = None  # the bucket buffer kept across syncs (shared memory when shared)
        self._resharder = None  # bridge/reshard.py's plan, built on the first sync
        self._fallback = False  # the model is not one the resharder describes: megatron-bridge's export
        self._collect = ""
        self._layout: list = []
        self._parts: dict[str, float] = {}  # this sync's time per part (rank 0)
        if not self.rank0:
            return
        if cfg.mode == "tensor":
            remote = [u for u in self.engine_urls if not _is_this_host(_host(u))]
            if remote:
                raise ValueError(f"sync.mode='tensor' shares host memory, so engines must run on this host; "
                                 f"{remote} do not (use 'broadcast' or 'disk')")
        self._loop = _EngineLoop()
        self._clients = [EngineClient(u, timeout_s=cfg.timeout_s) for u in self.engine_urls]

    # ---- public ------------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """One full weight push. Rank 0 returns bytes, seconds, buckets, max_bucket_bytes,
        bytes_per_s, tensors, held_bytes (bucket buffer kept across syncs), resharded (1 when
        bridge/reshard.py wrote the buckets, 0 for megatron-bridge's export) and the profile:
        produce_s (export + fill), send_s (transport + engine load), session_s, flush_s (bucketed
        paths; a streamed sync has neither: its one engine call opens and flushes), streamed (1 when
        the whole sync was one engine call) and then the engine's own profile (engine_wait_s: waiting
        for buckets, engine_load_s: loading them, engine_flush_s; the slowest engine's; engine_direct_mib:
        MiB every engine received straight into its parameters, broadcast only); other ranks {}."""
        if self._closed:
            raise RuntimeError("WeightSync.sync() after close()")
        t0 = time.perf_counter()
        buckets, counts = self._buckets()
        if not self.rank0:
            for _ in buckets:  # collective: the other ranks write their slices / take part in the gathers
                pass
            self.syncs += 1
            return {}
        self._parts = {}
        try:
            if self.cfg.mode == "disk":
                n, max_bucket = self._sync_disk(buckets)
            elif self._streams():
                n, max_bucket = self._stream_buckets(buckets)  # flushes in the same engine call
            else:
                n, max_bucket = self._sync_buckets(buckets)
            if not self._streams():
                with self._clock("flush_s"):
                    self._run_engines("flush_cache")
        except BaseException:
            with contextlib.suppress(Exception):
                for _ in buckets:  # let the other ranks finish their part before we raise
                    pass
            raise
        self.syncs += 1
        secs = time.perf_counter() - t0
        nbytes, ntensors = counts()
        held = self._buffer.numel() if self._buffer is not None else 0
        return {"bytes": float(nbytes), "seconds": secs, "buckets": float(n), "max_bucket_bytes": float(max_bucket),
                "bytes_per_s": nbytes / max(secs, 1e-9), "tensors": float(ntensors), "held_bytes": float(held),
                "resharded": float(self._resharder is not None), "streamed": float(self._streams()), **self._parts}

    def _buckets(self):
        """This sync's buckets (a collective iterator; Buckets on rank 0) and a callable giving
        (bytes, tensors) once they have been consumed."""
        from megatron_matpo.bridge import collect

        if self.cfg.export == "reshard" and self._resharder is None and not self._fallback:
            from megatron_matpo.bridge.reshard import Resharder, Unsupported

            try:
                self._resharder = Resharder(self.built)  # collective, once
            except Unsupported as e:
                self._fallback = True
                if self.rank0:
                    warnings.warn(f"weight sync: {e}; using megatron-bridge's export instead", stacklevel=3)
            else:
                size = collect.buffer_bytes(self._resharder, self.cfg.bucket_bytes)
                self._collect = collect.choose(self.cfg.collect, self._device_buckets(), size)
                self._layout = collect.bucket_layout(self._resharder, self.cfg.bucket_bytes)
        rs = self._resharder
        if rs is not None:
            size = collect.buffer_bytes(rs, self.cfg.bucket_bytes)
            if self._collect == "shared_memory":
                if self._buffer is None:  # mapped once on every rank, kept across syncs
                    self._buffer = collect.shared_buffer(size)
                buf = self._buffer
            elif not self.rank0:
                buf = None
            elif self._device_buckets():
                buf = torch.empty(size, dtype=torch.uint8, device=platform.device())  # back to training after
            else:
                if self._buffer is None:  # kept: the tensor path shares it (moved to shared memory once)
                    self._buffer = torch.empty(size, dtype=torch.uint8)
                buf = self._buffer
            nbytes = sum(t.nbytes for t in rs.tensors)
            return collect.resharded_buckets(rs, self._layout, self._collect, buf), lambda: (nbytes, len(rs.tensors))
        from megatron_matpo.convert import hf_tensors

        stream = hf_tensors(self.built, self.cfg.show_progress)
        if not self.rank0:
            return stream, None
        stream = _Counted(stream)
        device = platform.device() if self._device_buckets() else torch.device("cpu")  # NCCL needs device buffers
        if not self._device_buckets() and self._buffer is None:
            # kept across syncs: sharing a buffer moves it into shared memory (a copy), once
            self._buffer = torch.empty(self.cfg.bucket_bytes, dtype=torch.uint8)
        # a device buffer is allocated per sync, so device memory goes back to training after
        buffer = None if self._device_buckets() else self._buffer
        return iter_buckets(stream, self.cfg.bucket_bytes, device, buffer), lambda: (stream.nbytes, stream.count)

    def _device_buckets(self) -> bool:
        return self.cfg.mode == "broadcast" and platform.capabilities().cuda

    @property
    def collection(self) -> str:
        """How the buckets were assembled: "shared_memory" / "p2p" (resharded), "megatron_bridge", or ""
        before the first sync."""
        return self._collect or ("megatron_bridge" if self.syncs and self._resharder is None else "")

    def close(self) -> None:
        """Leave the broadcast group (engines and actor), stop rank 0's HTTP loop, delete the temp
        disk directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.rank0:
            return
        try:
            if self._group is not None:
                self._drop_group(tell_engines=True)
            self._loop.run_all((c.aclose() for c in self._clients), self.cfg.timeout_s)
        finally:
            self._loop.close()
            if self._own_disk_root and self._disk_root is not None:
                shutil.rmtree(self._disk_root, ignore_errors=True)

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- bucketed transports (broadcast, tensor) -------------------------------------------------

    def _sync_buckets(self, buckets: Iterable[Bucket]) -> tuple[int, int]:
        if self.cfg.mode == "broadcast" and self._group is None:
            self._init_group()
        n = max_bucket = 0
        clock = self._clock
        with clock("session_s"):
            self._run_engines("begin_weight_update")
        ok = False
        it = iter(buckets)
        try:
            while True:
                with clock("produce_s"):  # export + bucket fill (every rank's part, on the reshard path)
                    bucket = next(it, None)
                if bucket is None:
                    break
                with clock("send_s"):  # transport + the engine's load of the bucket
                    if self.cfg.mode == "broadcast":
                        self._broadcast_bucket(bucket)
                    else:
                        self._tensor_bucket(bucket)
                n += 1
                max_bucket = max(max_bucket, bucket.nbytes)
            ok = True
        finally:
            with clock("session_s"):
                if ok:
                    self._run_engines("end_weight_update")
                else:  # close the session anyway so the next sync can open one; the first error wins
                    with contextlib.suppress(Exception):
                        self._run_engines("end_weight_update")
        return n, max_bucket

    def _streams(self) -> bool:
        """One engine call per sync (rollout/sglang_weights.py): needs the plan up front, i.e. our
        resharded export (megatron-bridge's streams tensors it has not described yet)."""
        return self.cfg.stream and self.cfg.mode != "disk" and self._resharder is not None

    def _stream_buckets(self, buckets: Iterable[Bucket]) -> tuple[int, int]:
        """The whole sync in one call per engine: the plan goes first, then rank 0 hands over each
        bucket as it is produced (broadcast: its bytes; tensor: a doorbell for the shared buffer and
        a barrier once the engines have loaded it). Neither is waited for here: the bucket's `release`
        waits, and the collection calls it only before it reuses those bytes, so the next bucket is
        filled while this one is sent and loaded."""
        from megatron_matpo.rollout.sglang_weights import segments, stream_format

        if self._group is None:  # the tensor path uses the group for its doorbells only
            self._init_group()
        names, dtypes, shapes, counts = [], [], [], []
        for bucket in self._layout:
            counts.append(len(bucket))
            for t, _ in bucket:
                names.append(t.name)
                dtypes.append(str(t.dtype).removeprefix("torch."))
                shapes.append(list(t.shape))
        fmt = stream_format(counts, self.cfg.direct_min_bytes)
        if self.cfg.mode == "broadcast":
            calls = [c.update_weights_from_distributed(names, dtypes, shapes, self._group_name, load_format=fmt,
                                                       flush_cache=True) for c in self._clients]
        else:
            from megatron_matpo.bridge import collect

            # where each bucket lies in the shared buffer (a ring for shared-memory collection)
            starts = (collect.ring_layout(self._layout, self._buffer.numel()) if self._collect == "shared_memory"
                      else [0] * len(counts))
            meta = {"names": names, "dtypes": dtypes, "shapes": shapes, "starts": starts, "group": self._group_name}
            # the whole shared bucket buffer, mapped once per sync by each engine TP rank, and the plan
            calls = [c.update_weights_from_tensor([_pickled_shared({"buffer": self._buffer, **meta}) for _ in range(tp)],
                                                  load_format=fmt, flush_cache=True)
                     for c, tp in zip(self._clients, self._tp_sizes())]
        futs = [self._loop.submit(c) for c in calls]
        n = max_bucket = 0
        aborted = False
        errors: list[BaseException] = []

        def released_by(work, nbytes: int):
            # the bucket builder calls it (inside its collective iteration) before reusing the bucket's
            # bytes (bridge/buckets.py): a failure is kept for this loop to raise, never raised in there,
            # so that every rank still walks the collection to its end
            def release() -> None:
                if not aborted and not errors:
                    try:
                        self._await(work, futs, nbytes)
                    except BaseException as e:  # noqa: BLE001 (raised below, outside the collection)
                        errors.append(e)
            return release

        it = iter(buckets)
        try:
            while True:
                with self._clock("produce_s"):  # export + fill, and waiting for the previous bucket's release
                    bucket = next(it, None)
                if errors:
                    raise errors[0]
                if bucket is None:
                    break
                with self._clock("send_s"):
                    if self.cfg.mode == "broadcast":
                        # one broadcast per segment, cut as the engine cuts it: large tensors alone, so
                        # each can land straight in its parameter there
                        work = _AllOf([torch.distributed.broadcast(bucket.flat[seg[0][3]:seg[-1][4]], src=0,
                                                                   group=self._group, async_op=True)
                                       for seg in segments(bucket.spans(), self.cfg.direct_min_bytes)])
                    else:
                        bell = torch.tensor([n], dtype=torch.int64)
                        self._await(torch.distributed.broadcast(bell, src=0, group=self._group, async_op=True),
                                    futs, bucket.nbytes)
                        work = torch.distributed.barrier(group=self._group, async_op=True)  # the engines' "loaded"
                    bucket.release = released_by(work, bucket.nbytes)
                n += 1
                max_bucket = max(max_bucket, bucket.nbytes)
            with self._clock("send_s"):
                wait_futures(futs, timeout=self.cfg.timeout_s)
                answers = []
                for f in futs:
                    if not f.done():
                        raise TimeoutError(f"engine not done {self.cfg.timeout_s:.0f}s after the last bucket")
                    answers.append(f.result(timeout=0))
            for part, secs in _slowest_engine(answers).items():
                self._parts[f"engine_{part}"] = secs
        except BaseException as e:
            aborted = True
            with contextlib.suppress(Exception):
                for _ in it:  # the other ranks finish their part of the collection
                    pass
            self._drop_group(tell_engines=False)  # a half-done stream leaves the group unusable
            raise RuntimeError(f"streamed {self.cfg.mode} weight update failed: {_explain(e)}") from e
        return n, max_bucket

    def _await(self, work, futs: list[Future], nbytes: int) -> None:
        """Wait for a collective with the engines, failing fast when an engine call has failed (it
        never joins) and after `timeout_s`. Polls from 50 µs up to 2 ms: a bucket lands in well under
        a millisecond at small sizes, so a fixed 2 ms sleep would dominate."""
        deadline = time.monotonic() + self.cfg.timeout_s
        nap = 5e-5
        while not work.is_completed():
            failed = [f for f in futs if f.done() and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            if time.monotonic() > deadline:
                raise TimeoutError(f"a {nbytes}-byte bucket not taken by the engines after {self.cfg.timeout_s:.0f}s")
            time.sleep(nap)
            nap = min(nap * 2, 2e-3)
        try:
            work.wait()
        except Exception as e:
            # an engine that refused the call may drop its end first (a broken pipe here): its own reason
            # says more, so give its answer a moment to arrive
            wait_futures(futs, timeout=min(5.0, self.cfg.timeout_s))
            failed = [f for f in futs if f.done() and f.exception() is not None]
            if failed:
                raise failed[0].exception() from e
            raise

    @contextlib.contextmanager
    def _clock(self, part: str):
        """Adds the block's wall time to this sync's `part` (returned in the stats: a sync's profile)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._parts[part] = self._parts.get(part, 0.0) + time.perf_counter() - t0

    def _broadcast_bucket(self, bucket: Bucket) -> None:
        shapes = [list(s) for s in bucket.shapes]
        futs = [self._loop.submit(c.update_weights_from_distributed(
            bucket.names, bucket.dtype_names, shapes, self._group_name, load_format="flattened_bucket"))
            for c in self._clients]
        try:
            self._await(torch.distributed.broadcast(bucket.flat, src=0, group=self._group, async_op=True), futs,
                        bucket.nbytes)
            wait_futures(futs, timeout=self.cfg.timeout_s)
            for f in futs:
                f.result(timeout=0)
        except BaseException as e:
            self._drop_group(tell_engines=False)  # a half-done broadcast leaves the group unusable
            raise RuntimeError(f"broadcast weight update failed: {_explain(e)}") from e

    def _tensor_bucket(self, bucket: Bucket) -> None:
        coros = []
        for c, tp in zip(self._clients, self._tp_sizes()):
            coros.append(c.update_weights_from_tensor([_shared_memory_payload(bucket) for _ in range(tp)],
                                                      load_format="flattened_bucket"))
        # every engine has copied the bucket out of shared memory when this returns: safe to refill
        self._gather("update_weights_from_tensor", coros)

    # ---- disk transport ----------------------------------------------------------------------

    def _sync_disk(self, buckets: Iterable[Bucket]) -> tuple[int, int]:
        from megatron_matpo.convert import SafetensorsShardWriter

        out = self._disk_dir()
        for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")) \
                + list(out.glob(".shard-*.partial")):
            f.unlink()  # this directory is ours: last sync's shards
        writer = SafetensorsShardWriter(out)
        for bucket in buckets:
            for name, tensor in bucket.tensors():
                writer.add(name, tensor)  # (copied: the bucket's buffer is refilled next)
        files = writer.close()
        self._run_engines("update_weights_from_disk", str(out))
        return len(files), max(f.stat().st_size for f in files)

    def _disk_dir(self) -> Path:
        if self._disk_root is None:
            if self.cfg.disk_dir:
                self._disk_root = Path(self.cfg.disk_dir)
            else:
                self._disk_root = Path(tempfile.mkdtemp(prefix="matpo-sync-"))
                self._own_disk_root = True
        out = self._disk_root / _DISK_SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        return out

    # ---- engines and the broadcast group -------------------------------------------------------

    def _gather(self, what: str, coros: Iterable[Coroutine]) -> list[Any]:
        try:
            return self._loop.run_all(coros, self.cfg.timeout_s)
        except BaseException as e:
            raise RuntimeError(f"engine {what} failed: {_explain(e)}") from e

    def _run_engines(self, method: str, *args) -> list[Any]:
        return self._gather(method, (getattr(c, method)(*args) for c in self._clients))

    def _tp_sizes(self) -> list[int]:
        if self._tp is None:
            infos = self._run_engines("server_info")
            for url, info in zip(self.engine_urls, infos):
                if int(info.get("dp_size", 1)) != 1 or int(info.get("pp_size", 1)) != 1:
                    raise ValueError(f"engine {url} runs dp_size={info.get('dp_size')} pp_size={info.get('pp_size')}; "
                                     "weight sync supports engines with TP only (start one engine per replica)")
            self._tp = [int(info["tp_size"]) for info in infos]
        return self._tp

    def _init_group(self) -> None:
        """Actor rank 0 (group rank 0) + every engine TP rank (ranks 1..) in one broadcast group."""
        from sglang.srt.utils import init_custom_process_group

        tps = self._tp_sizes()
        world = 1 + sum(tps)
        offsets = [1 + sum(tps[:i]) for i in range(len(tps))]
        address = self.cfg.master_address or _address_towards(_host(self.engine_urls[0]))
        if self.cfg.master_port is not None:
            port = self.cfg.master_port
        else:
            from megatron_matpo.ports import free_port

            port = free_port()
        backend = "nccl" if platform.capabilities().cuda else "gloo"
        joins = [self._loop.submit(c.init_weights_update_group(address, port, off, world, self._group_name, backend))
                 for c, off in zip(self._clients, offsets)]
        # rank 0 hosts the rendezvous store; it and the engines' calls block until all have joined,
        # so ours runs on a helper thread and an engine refusing to join fails fast
        with ThreadPoolExecutor(1) as pool:
            ours = pool.submit(init_custom_process_group, backend=backend, init_method=f"tcp://{address}:{port}",
                               world_size=world, rank=0, group_name=self._group_name,
                               timeout=timedelta(seconds=self.cfg.timeout_s))
            done, _ = wait_futures([ours, *joins], timeout=self.cfg.timeout_s, return_when=FIRST_EXCEPTION)
            for f in [*joins, ours]:
                if f in done and f.exception() is not None:
                    raise RuntimeError(f"broadcast group {self._group_name} ({backend}, {address}:{port}, "
                                       f"world {world}) failed: {_explain(f.exception())}") from f.exception()
            wait_futures([ours, *joins], timeout=self.cfg.timeout_s)
            if not all(f.done() for f in [ours, *joins]):
                raise TimeoutError(f"broadcast group {self._group_name} not formed after {self.cfg.timeout_s:.0f}s")
            for f in joins:
                f.result(timeout=0)
            self._group = ours.result(timeout=0)
            self.groups_formed += 1

    def _drop_group(self, tell_engines: bool) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        try:
            if tell_engines:
                self._run_engines("destroy_weights_update_group", self._group_name)
        finally:
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group(group)
            # the engines may still hold the old name; a fresh one avoids a clash on re-creation
            self._group_name = f"{self.cfg.group_name}-{uuid.uuid4().hex[:8]}"


class _Counted:
    """Iterator wrapper counting tensors and bytes as they stream past."""

    def __init__(self, stream: Iterable[tuple[str, torch.Tensor]]):
        self._it = iter(stream)
        self.count = 0
        self.nbytes = 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, t = next(self._it)
        self.count += 1
        self.nbytes += t.numel() * t.element_size()
        return name, t
