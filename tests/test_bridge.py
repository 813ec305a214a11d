"""Weight sync Megatron actor → SGLang engine.

Bucketing (no processes): bounded sizes, stream order, oversized tensors alone, SGLang's flat layout.
Sync (slow: a real engine and TP=2, PP=2 and TP=2 x PP=2 actor worlds): the actor's weights are perturbed so the
engine is stale, synced with each transport, and then the engine's prefill logprobs must equal the
actor's own megatron logprobs (fp32, ≤ 1e-4) and differ from the engine's logprobs before the sync.
The shared engine gets its original weights back at the end (checked).
"""
from __future__ import annotations

import time
import zlib

import pytest
import torch

from megatron_matpo.bridge import SyncConfig, iter_buckets, logprob_gap
from megatron_matpo.model.layout import ParallelLayout as L

PARITY_TOL = 1e-4  # fp32 engine (torch-native attention) vs megatron on CPU
STALE_MIN = 1e-2  # the perturbation moves logprobs by far more than this
ROWS = [[5, 17, 99, 250, 3, 700, 12, 41], [700, 12, 41, 9, 1000, 2], list(range(100, 124))]
SMALL_BUCKET_MB = 0.05  # ~52 KB: many buckets, and the 360 KB embedding/lm_head travel alone
# (mode, bucket MiB, perturbation seed, other SyncConfig fields) per sync; a repeated (mode, bucket, fields)
# reuses its WeightSync: the broadcast group is formed once for steps 0 and 1, and later groups coexist with
# it. Every path on our resharded export (each rank's slices into shared memory), then its p2p collection
# and megatron-bridge's export (the reference path), then one engine call per bucket (sync.stream=false; the
# others stream the whole sync through one call). A streamed broadcast receives each tensor of at least
# `direct_min_kib` (default 64: the embedding and lm_head here) straight into its engine parameter; step 5's
# 8 KiB sends every matrix that way, so the fused QKV and gate/up slices are written in place too
PLAN = [("broadcast", SMALL_BUCKET_MB, 1, {}), ("broadcast", SMALL_BUCKET_MB, 2, {}),
        ("tensor", SMALL_BUCKET_MB, 3, {}), ("disk", 64.0, 4, {}), ("broadcast", 64.0, 5, {"direct_min_kib": 8}),
        ("tensor", 64.0, 6, {}),
        ("broadcast", SMALL_BUCKET_MB, 7, {"collect": "p2p"}), ("tensor", SMALL_BUCKET_MB, 8, {"collect": "p2p"}),
        ("tensor", SMALL_BUCKET_MB, 9, {"export": "megatron_bridge"}),
        ("broadcast", SMALL_BUCKET_MB, 10, {"export": "megatron_bridge"}),
        ("broadcast", SMALL_BUCKET_MB, 11, {"stream": False}), ("tensor", SMALL_BUCKET_MB, 12, {"stream": False})]
STEPS = [f"{i}-{mode}" for i, (mode, _, _, _) in enumerate(PLAN)]


# ---------------------------------------------------------------- bucketing (no processes)


def _tensors(sizes: list[int], dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"t{i}", torch.randn(n, generator=g).to(dtype)) for i, n in enumerate(sizes)]


def _consume(stream, max_bytes: int) -> list[tuple[list[str], int, list[torch.Tensor]]]:
    """Copy each bucket out as it comes: the builder reuses its buffer for the next one."""
    return [(list(b.names), b.nbytes, [t.clone() for _, t in b.tensors()]) for b in iter_buckets(stream, max_bytes)]


def test_buckets_bounded_ordered_and_exact():
    tensors = _tensors([10, 100, 60, 3, 250, 40, 40, 1, 90])  # fp32: 40 .. 1000 bytes
    out = _consume(tensors, max_bytes=512)
    assert [n for names, _, _ in out for n in names] == [n for n, _ in tensors]  # order preserved
    for names, nbytes, _ in out:
        assert nbytes <= 512 or len(names) == 1
    flat = [t for _, _, ts in out for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(flat, (t for _, t in tensors)))
    # greedy: a bucket is closed only when the next tensor would not fit
    for (names, nbytes, _), (nxt, _, _) in zip(out, out[1:]):
        first_next = dict(tensors)[nxt[0]]
        assert nbytes + first_next.numel() * 4 > 512


def test_oversized_tensor_travels_alone():
    tensors = _tensors([10, 20, 500, 5])  # 2000 bytes > 256
    out = _consume(tensors, max_bytes=256)
    assert [names for names, _, _ in out] == [["t0", "t1"], ["t2"], ["t3"]]
    assert out[1][1] == 2000
    assert torch.equal(out[1][2][0], tensors[2][1])


def test_mixed_dtypes_stay_aligned():
    """The engine views each tensor in place, so a tensor never starts at an offset that is not a
    multiple of its element size: a 3-element bf16 tensor (6 bytes) closes the bucket before fp32."""
    tensors = [("a", torch.ones(3, dtype=torch.bfloat16)), ("b", torch.arange(4, dtype=torch.float32)),
               ("c", torch.ones(2, dtype=torch.bfloat16)), ("d", torch.arange(2, dtype=torch.float32))]
    out = _consume(tensors, max_bytes=1024)
    assert [names for names, _, _ in out] == [["a"], ["b", "c", "d"]]
    assert torch.equal(out[1][2][2], tensors[3][1])


def test_bucket_layout_is_sglang_flattened_bucket():
    """Same bytes and offsets as SGLang's own FlattenedTensorBucket (what the engine rebuilds from)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    tensors = [("w", torch.randn(4, 8)), ("b", torch.randn(8)), ("h", torch.randn(2, 3).to(torch.bfloat16))]
    (bucket,) = iter_buckets(tensors, 1 << 20)
    ref = FlattenedTensorBucket(named_tensors=tensors)
    assert torch.equal(bucket.flat, ref.get_flattened_tensor())
    assert [(m.name, m.start_idx, m.end_idx) for m in ref.get_metadata()] == \
        [(n, a, b) for n, _, _, a, b in bucket.spans()]
    empty = FlattenedTensorBucket.empty(bucket.names, bucket.dtype_names, [list(s) for s in bucket.shapes], "cpu")
    assert empty.get_flattened_tensor().numel() == bucket.nbytes


def test_bucket_rejects_nonpositive_size_and_small_buffer():
    with pytest.raises(ValueError, match="max_bytes"):
        list(iter_buckets(_tensors([1]), 0))
    with pytest.raises(ValueError, match="buffer"):
        list(iter_buckets(_tensors([1]), 64, buffer=torch.empty(32, dtype=torch.uint8)))


@pytest.mark.parametrize("max_bytes", [1, 64, 512, 1 << 20])
def test_plan_buckets_groups_as_iter_buckets(max_bytes):
    """The resharded sync plans its buckets from sizes alone (bridge/collect.py): same groups, same offsets."""
    from megatron_matpo.bridge.buckets import plan_buckets

    tensors = _tensors([10, 100, 60, 3, 250, 40, 40, 1, 90]) + [("h", torch.ones(3, dtype=torch.bfloat16)),
                                                               ("f", torch.ones(5))]
    plan = plan_buckets([(t.numel() * t.element_size(), t.element_size()) for _, t in tensors], max_bytes)
    got = [[tensors[i][0] for i, _ in b] for b in plan]
    assert got == [names for names, _, _ in _consume(tensors, max_bytes)]
    for b in plan:  # back to back from 0
        offs = [off for _, off in b]
        sizes = [tensors[i][1].numel() * tensors[i][1].element_size() for i, _ in b]
        assert offs == [sum(sizes[:k]) for k in range(len(b))]


def test_caller_buffer_is_reused():
    buf = torch.empty(64, dtype=torch.uint8)
    for b in iter_buckets(_tensors([4, 4, 8]), 64, buffer=buf):
        assert b.flat.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("kwargs,match", [({"mode": "nccl"}, "sync.mode"), ({"bucket_mb": 0}, "bucket_mb"),
                                          ({"parity_every": -1}, "parity_every"), ({"parity_rows": 0}, "parity_rows"),
                                          ({"timeout_s": 0}, "timeout_s"), ({"master_port": 70000}, "master_port"),
                                          ({"direct_min_kib": 0}, "direct_min_kib")])
def test_sync_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyncConfig(**kwargs)


def test_logprob_gap_skips_position_zero():
    gap = logprob_gap([[None, -1.0, -2.0]], [[0.0, -1.5, -2.0]])
    assert gap == {"max_abs": 0.5, "mean_abs": 0.25, "tokens": 2.0}
    with pytest.raises(ValueError, match="row 0"):
        logprob_gap([[None, -1.0]], [[0.0]])


# ---------------------------------------------------------------- actor worlds (run in each rank)


@torch.no_grad()
def _perturb(built, seed: int) -> None:
    """Seeded noise on every parameter. Replicated parameters (norms) get the same noise on every
    TP rank, sharded ones a different draw per shard: the actor stays one consistent model."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in built.chunks[0].named_parameters():
        shard = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * shard)
        p.add_(torch.randn(p.shape, generator=g) * 0.02)


@torch.no_grad()
def _actor_logprobs(built, rows: list[list[int]]) -> list[list[float]]:
    """The actor's log p(token j | < j) per row (row convention, entry 0 = 0), from one packed
    micro-batch through megatron's schedule and the vocab-parallel `token_logprobs`; every rank
    gets them (broadcast from its pipeline's last stage)."""
    from megatron.core import parallel_state

    from megatron_matpo import platform
    from megatron_matpo.model.forward import pack_sequences, run_schedule
    from megatron_matpo.train.actor import token_logprobs

    mb = pack_sequences([torch.tensor(r) for r in rows])
    labels = torch.tensor([t for r in rows for t in r[1:] + [0]]).unsqueeze(0)  # position i predicts i+1
    kept = {}

    def keep(out, _mb):
        kept["lp"] = token_logprobs(out, labels).detach().float().cpu().reshape(-1)
        return torch.zeros((), device=out.device), {}

    for c in built.chunks:
        c.eval()
    run_schedule(built.chunks, [mb], keep, forward_only=True, device=platform.device())
    n = labels.shape[1]
    lp = kept["lp"] if parallel_state.is_pipeline_last_stage() else torch.empty(n)
    torch.distributed.broadcast(lp, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    out, off = [], 0
    for r in rows:
        out.append([0.0] + lp[off:off + len(r) - 1].tolist())
        off += len(r)
    return out


def _run_plan(built, engine_url: str, hf_dir: str, disk_dir: str, plan: list) -> dict:
    """perturb → sync → engine vs actor logprobs for each plan step; rank 0 then restores the
    engine's original weights and checks them (whatever happened)."""
    import asyncio

    from megatron_matpo.bridge import WeightSync, engine_logprobs
    from megatron_matpo.rollout.engine import EngineClient

    rank0 = torch.distributed.get_rank() == 0

    def on_engine() -> list[list[float | None]]:
        return asyncio.run(engine_logprobs(engine_url, ROWS))

    original = on_engine() if rank0 else None
    res: dict = {"steps": {}}
    syncs: dict[tuple, WeightSync] = {}
    try:
        for i, (mode, bucket_mb, seed, fields) in enumerate(plan):
            _perturb(built, seed)
            actor = _actor_logprobs(built, ROWS)
            stale = on_engine() if rank0 else None
            key = (mode, bucket_mb, tuple(fields.items()))  # a repeated key reuses its WeightSync (and group)
            if key not in syncs:
                cfg = SyncConfig(mode=mode, bucket_mb=bucket_mb, disk_dir=disk_dir, timeout_s=120, **fields)
                syncs[key] = WeightSync(cfg, built, [engine_url])
            ws = syncs[key]
            stats = ws.sync()
            if rank0:
                res["steps"][f"{i}-{mode}"] = {"stats": stats, "after": logprob_gap(on_engine(), actor),
                                               "before": logprob_gap(stale, actor),
                                               "groups_formed": ws.groups_formed}
        # an engine that lost the broadcast group (destroyed, or the engine restarted): the streamed call is
        # refused before its first bucket and the sync fails fast with the engine's reason; the next sync
        # forms a new group and lands
        ws = syncs[(PLAN[0][0], PLAN[0][1], ())]
        if rank0:
            ws._run_engines("destroy_weights_update_group", ws._group_name)
        t0, error = time.perf_counter(), None
        try:
            ws.sync()
        except RuntimeError as e:
            error = str(e)
        failed_s = time.perf_counter() - t0
        _perturb(built, 99)
        actor = _actor_logprobs(built, ROWS)
        stats = ws.sync()
        if rank0:
            res["lost_group"] = {"error": error, "failed_s": failed_s, "stats": stats,
                                 "groups_formed": ws.groups_formed, "after": logprob_gap(on_engine(), actor)}
    finally:
        for ws in syncs.values():
            ws.close()
        if rank0:
            async def restore():
                c = EngineClient(engine_url)
                try:
                    await c.update_weights_from_disk(hf_dir)
                    await c.flush_cache()
                finally:
                    await c.aclose()

            asyncio.run(restore())
    if rank0:
        res["restored"] = logprob_gap(on_engine(), [[x or 0.0 for x in r] for r in original])
    return res


def bridge_world(hf_dir: str, engine_url: str, layouts: dict[str, L], disk_dir: str, plan: list) -> dict:
    """Runs on every rank of one launched world: the whole plan for each layout in turn, megatron's
    groups re-formed per layout (process start-up dominates on CPU, so one world serves all)."""
    import time

    from megatron.core import parallel_state

    from megatron_matpo.dist import init_megatron
    from megatron_matpo.model.builder import build_model
    from megatron_matpo.train.optim import OptimConfig, ddp_config

    out = {}
    for name, layout in layouts.items():
        t0 = time.perf_counter()
        init_megatron(layout)
        built = build_model(hf_dir, layout, load_weights=True, ddp_config=ddp_config(OptimConfig()))
        t1 = time.perf_counter()
        out[name] = _run_plan(built, engine_url, hf_dir, f"{disk_dir}/{name}", plan)
        out[name]["build_s"], out[name]["plan_s"] = t1 - t0, time.perf_counter() - t1
        del built
        parallel_state.destroy_model_parallel()
    return out


# ---------------------------------------------------------------- sync into the real engine (slow)


@pytest.fixture(scope="module")
def sync_worlds(tiny_models, engine, tmp_path_factory) -> dict[str, dict]:
    # (not named `worlds`: that would override conftest's autouse session fixture in this module and make
    # every test here, the unit tests too, wait for these worlds)
    """TP=2 and PP=2 actors (one 2-process world), then TP=2 x PP=2 (a 4-process world), synced into the
    shared engine."""
    from megatron_matpo.dist import launch_local

    disk = tmp_path_factory.mktemp("weight-sync")
    out = launch_local(bridge_world, 2, tiny_models["qwen3"], engine.url, {"tp2": L(tp=2), "pp2": L(pp=2)},
                       str(disk), PLAN)
    return {**out, **launch_local(bridge_world, 4, tiny_models["qwen3"], engine.url, {"tp2pp2": L(tp=2, pp=2)},
                                  str(disk), PLAN)}


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("world", ["tp2", "pp2", "tp2pp2"])
def test_engine_scores_like_actor_after_sync(sync_worlds, world, step):
    r = sync_worlds[world]["steps"][step]
    assert r["before"]["max_abs"] > STALE_MIN, r  # the engine really was stale
    assert r["after"]["max_abs"] <= PARITY_TOL, r


@pytest.mark.slow
@pytest.mark.parametrize("world", ["tp2", "pp2", "tp2pp2"])
def test_sync_streams_every_tensor_in_bounded_buckets(sync_worlds, world, tiny_models):
    from safetensors.torch import load_file

    hf = load_file(f"{tiny_models['qwen3']}/model.safetensors")
    sizes = [t.numel() * t.element_size() for t in hf.values()]
    total, largest = sum(sizes), max(sizes)
    small = int(SMALL_BUCKET_MB * 1024 * 1024)
    alone = [n for n in sizes if n > small]  # embedding and lm_head travel as their own buckets
    min_buckets = len(alone) + -(-(total - sum(alone)) // small)
    steps = sync_worlds[world]["steps"]
    for step, (mode, bucket_mb, _, fields) in zip(STEPS, PLAN):
        s = steps[step]["stats"]
        assert s["bytes"] == total and s["tensors"] == len(hf), (step, s)
        assert s["resharded"] == (fields.get("export", "reshard") == "reshard"), (step, s)
        assert s["streamed"] == (mode != "disk" and s["resharded"] == 1 and fields.get("stream", True)), (step, s)
        if s["streamed"]:  # the engine's own profile came back with its answer
            assert s["engine_load_s"] > 0 and s["engine_wait_s"] > 0, (step, s)
            # broadcast: every tensor of >= direct_min_kib landed straight in its parameter (a TP=1 engine's
            # loader copies each whole into one slice: the layer norms stay below the threshold and are loaded)
            direct_min = SyncConfig(**fields).direct_min_bytes
            direct = sum(n for n in sizes if n >= direct_min) if mode == "broadcast" else 0
            assert abs(s["engine_direct_mib"] - direct / 2**20) < 0.006, (step, s, direct)
        assert s["seconds"] > 0 and s["bytes_per_s"] > 0
        if mode == "disk":
            assert s["buckets"] == 1  # one safetensors shard
        elif bucket_mb == SMALL_BUCKET_MB:
            assert s["buckets"] >= min_buckets and s["max_bucket_bytes"] == largest > small, (step, s)
        else:
            assert s["buckets"] == 1 and s["max_bucket_bytes"] == total, (step, s)
    assert steps["1-broadcast"]["groups_formed"] == 1  # the group of step 0 was reused


@pytest.mark.slow
@pytest.mark.parametrize("world", ["tp2", "pp2", "tp2pp2"])
def test_streamed_sync_refused_fails_fast_then_recovers(sync_worlds, world):
    lost = sync_worlds[world]["lost_group"]
    assert lost["error"] and "no weight-update group" in lost["error"], lost
    assert lost["failed_s"] < 30  # not the 120 s timeout: the refusal ends the wait
    assert lost["stats"]["streamed"] == 1 and lost["groups_formed"] == 2, lost
    assert lost["after"]["max_abs"] <= PARITY_TOL, lost


@pytest.mark.slow
@pytest.mark.parametrize("world", ["tp2", "pp2", "tp2pp2"])
def test_engine_weights_restored(sync_worlds, world):
    assert sync_worlds[world]["restored"]["max_abs"] <= 1e-6


def test_ring_starts_by_hand():
    from megatron_matpo.bridge.buckets import ring_starts

    # capacity 10: 4 after 0 (clear), 4 after that (clear, ends at 8), 3 wraps to 0 and ends before 4 (clear),
    # 6 fits after 3 at 3..9 but overlaps nothing in flight (clear), 5 neither fits after 9 nor before 3
    assert ring_starts([4, 4, 3, 6, 5], 10) == [(0, True), (4, True), (0, True), (3, True), (0, False)]
    assert ring_starts([10, 10], 10) == [(0, True), (0, False)]  # a full-size bucket waits for its predecessor
    with pytest.raises(ValueError, match="does not fit"):
        ring_starts([11], 10)


def test_stream_plan_and_segments_by_hand():
    from megatron_matpo.rollout.sglang_weights import parse_plan, segments, stream_format

    assert parse_plan(stream_format([3, 1, 2], 4096)) == ([3, 1, 2], 4096)
    with pytest.raises(ValueError, match=">= 1 tensor"):
        parse_plan(stream_format([2, 0]))
    # (index, dtype, shape, start, end): bytes 10, 100, 5, 5, 200, 3 with a 50-byte threshold: the large ones
    # alone, each run of small ones together (a small one after a large one starts a new run)
    sizes = [10, 100, 5, 5, 200, 3]
    spans, off = [], 0
    for j, n in enumerate(sizes):
        spans.append((j, torch.uint8, (n,), off, off + n))
        off += n
    assert [[sp[0] for sp in seg] for seg in segments(spans, 50)] == [[0], [1], [2, 3], [4], [5]]
    assert [[sp[0] for sp in seg] for seg in segments(spans, 1000)] == [[0, 1, 2, 3, 4, 5]]


def test_direct_targets_are_the_loaders_own_single_whole_copies():
    """The probe asks the model's own `load_weights` where each tensor would go: only a loader that copies
    the whole tensor, unchanged, into one contiguous slice of a parameter of its dtype gives a target, and
    probing writes nothing (the parameters stay 1)."""
    from megatron_matpo.rollout.sglang_weights import direct_targets

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Parameter(torch.ones(12, 4))  # fused: q rows 0-7, k 8-9, v 10-11
            self.head = torch.nn.Parameter(torch.ones(6, 4))  # 5 rows + a padding row
            self.other = torch.nn.Parameter(torch.ones(5, 4))
            self.sq = torch.nn.Parameter(torch.ones(4, 4))
            self.bf = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))

        def load_weights(self, weights):
            self.calls = getattr(self, "calls", 0) + 1
            for name, w in weights:
                if name in ("q", "k", "v"):  # as SGLang's QKV loader at TP=1: narrows both, the loaded one fully
                    off, n = {"q": (0, 8), "k": (8, 2), "v": (10, 2)}[name]
                    self.qkv.data.narrow(0, off, n).copy_(w.narrow(0, 0, n))
                elif name == "head":  # as the vocabulary loader: rows, then zero the padding
                    self.head.data[:5].copy_(w)
                    self.head.data[5:].fill_(0)
                elif name == "tied":  # two destinations
                    self.head.data[:5].copy_(w)
                    self.other.data.copy_(w)
                elif name == "shard":  # a TP=2 loader: half of the tensor
                    self.sq.data[:2].copy_(w.narrow(0, 2, 2))
                elif name == "transposed":
                    self.sq.data.copy_(w.t())
                elif name == "scaled":
                    self.sq.data.copy_(w * 2)
                elif name == "cast":
                    self.bf.data.copy_(w)
                elif name == "columns":  # a strided slice of the parameter
                    self.qkv.data[:, :2].copy_(w)
                elif name == "in_place":
                    self.sq.data.add_(w)
                elif name == "fails":
                    raise KeyError(name)

    m = Model()
    spec = {"q": (8, 4), "k": (2, 4), "v": (2, 4), "head": (5, 4), "tied": (5, 4), "shard": (4, 4),
            "transposed": (4, 4), "scaled": (4, 4), "cast": (4, 4), "columns": (12, 2), "in_place": (4, 4),
            "fails": (4, 4)}
    names = list(spec)
    dtypes, shapes = ["float32"] * len(names), [list(s) for s in spec.values()]
    out = direct_targets(m, names, dtypes, shapes, range(len(names)))
    assert m.calls == 1 + len(names)  # "fails" raises (and "scaled" writes a computed tensor): asked per tensor
    assert sorted(names[j] for j in out) == ["head", "k", "q", "v"]
    some = [j for j, n in enumerate(names) if n not in ("fails", "scaled")]
    again = direct_targets(m, names, dtypes, shapes, some)
    assert m.calls == 2 + len(names)  # one loader call for all of them, with the same answer
    assert {j: t.data_ptr() for j, t in again.items()} == {j: t.data_ptr() for j, t in out.items()}
    for name, param, row in (("q", m.qkv, 0), ("k", m.qkv, 8), ("v", m.qkv, 10), ("head", m.head, 0)):
        t = out[names.index(name)]
        assert t.shape == spec[name] and t.data_ptr() == param[row].data_ptr()
    assert all(bool((p[:5] == 1).all()) for p in (m.qkv, m.head, m.other, m.sq, m.bf))  # nothing written
    out[names.index("k")].fill_(7)  # a target is the parameter's own memory
    assert bool((m.qkv[8:10] == 7).all()) and bool((m.qkv[:8] == 1).all())
