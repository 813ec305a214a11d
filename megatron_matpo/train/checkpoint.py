"""Training checkpoints: save, find and resume the whole training state, atomically.

Layout of one checkpoint (`run_dir/checkpoints/step_000123/`):
    matpo_checkpoint.json   format, step, layout, time, optimizer sharding (convert.read_meta reads it)
    hf/                     config + tokenizer of the model (`matpo convert megatron-to-hf` needs them)
    model/                  megatron-core dist_checkpointing of the model (the same as `matpo convert`
                            writes: layout-independent, reshards on load)
    optim/                  dist_checkpointing of the optimizer's sharded state (distributed optimizer:
                            fp32 main params + Adam moments + param groups)
    rng/rank_00000.pt       per-rank RNG states (python, numpy, torch CPU, device, megatron's tracker)
    state.json              scheduler state + the caller's `extra` (data cursor, metrics history, ...)
`run_dir/checkpoints/latest` names the newest checkpoint directory (a pointer for tools and humans).

Atomicity: everything is written into `step_000123.tmp-<nonce>/`; after every rank has written and
synced its files, rank 0 renames it to `step_000123/`. The rename is the commit point: a crash at
any moment leaves either the old set of complete checkpoints or the new one, plus a `*.tmp-*`
directory that is never loaded and is removed by the next successful save. (Re-saving an existing
step moves the old copy aside first; a crash between the two renames leaves the older steps.)

Every public function except `latest_checkpoint` is collective over the actor's torch.distributed
world (all ranks call it with the same arguments) and needs an initialized Megatron world.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from megatron_matpo.convert import (CHECKPOINT_FORMAT, META_FILE, _unwrap, copy_hf_metadata, load_model_dist,
                                    read_meta, save_model_dist)

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
MODEL_DIR, OPTIM_DIR, RNG_DIR, HF_DIR = "model", "optim", "rng", "hf"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".tmp-"
# `dp_reshardable`: every rank writes its own optimizer shard, no gather; reloads at the same TP×PP
# (DP may change). `fully_reshardable`: gathers each DP group's state in model space, so it reloads at
# any TP×PP×DP, at the cost of a DP all-gather of the optimizer state on save.
OPTIM_FORMATS = ("dp_reshardable", "fully_reshardable")
_RESHARDABLE = ("fully_reshardable",)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or cannot be loaded into this run."""


@dataclass(frozen=True)
class _World:
    rank: int
    tp: int
    pp: int
    dp: int
    cp: int = 1

    @property
    def layout(self) -> dict[str, int]:
        # cp only when > 1: a checkpoint written before CP existed has the same layout record
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, **({"cp": self.cp} if self.cp > 1 else {})}


def _world() -> _World:
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized() or not ps.model_parallel_is_initialized():
        raise CheckpointError("training checkpoints need an initialized Megatron world (dist.init_megatron)")
    return _World(torch.distributed.get_rank(), ps.get_tensor_model_parallel_world_size(),
                  ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                  ps.get_context_parallel_world_size())


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ---- finding checkpoints (no collectives) -------------------------------------------------------

def is_complete(ckpt_dir: str | Path) -> bool:
    """All parts present: committed directories always are; this guards against manual damage."""
    d = Path(ckpt_dir)
    return (_STEP_RE.match(d.name) is not None and (d / META_FILE).is_file() and (d / STATE_FILE).is_file()
            and (d / MODEL_DIR / "metadata.json").is_file() and (d / OPTIM_DIR / "metadata.json").is_file()
            and (d / RNG_DIR).is_dir())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `run_dir/checkpoints`, oldest first (temp directories ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_RE.match(d.name)) and is_complete(d)]
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    `latest` is the fast path; when it is missing, unreadable, names a directory that is gone or
    incomplete, or lags behind a newer committed directory (a crash between the rename and the
    pointer update), the directory scan decides.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    complete = list_checkpoints(run_dir)
    newest = complete[-1] if complete else None
    try:
        named = root / pointer.read_text().strip()
    except OSError:
        return newest
    if is_complete(named) and (newest is None or _step_of(named) >= _step_of(newest)):
        return named
    if newest is not None and named.name != newest.name:
        log.warning("%s names %r, which is missing, incomplete or older; using %s", pointer, named.name, newest.name)
    return newest


def _step_of(ckpt_dir: Path) -> int:
    m = _STEP_RE.match(ckpt_dir.name)
    return int(m.group(1)) if m else -1


# ---- save ------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, chunks: list, optimizer, scheduler, extra: dict,
                    keep_last: int, hf_dir: str | Path, *, optim_format: str = "dp_reshardable") -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically, point `latest` at it, prune old ones.

    `extra` must be JSON-serializable; rank 0's copy is stored. `keep_last` counts complete
    checkpoints kept including this one (0 keeps all). Re-saving an existing step replaces it.
    Returns the checkpoint directory.
    """
    if optim_format not in OPTIM_FORMATS:
        raise ValueError(f"optim_format={optim_format!r}: expected one of {', '.join(OPTIM_FORMATS)}")
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if len(chunks) != 1:
        raise CheckpointError(f"{len(chunks)} model chunks: virtual pipeline stages are not supported")
    world = _world()
    hf_src = Path(hf_dir)

    def preflight() -> str:
        if not (hf_src / "config.json").is_file():
            raise FileNotFoundError(f"{hf_src}/config.json not found: hf_dir must hold the model's HF config")
        if _never_stepped(optimizer):
            raise CheckpointError("save_checkpoint before the first optimizer step: there is no optimizer "
                                  "state yet (the weights alone can be written with convert.save_model_dist)")
        scheduler_state = scheduler.state_dict() if scheduler is not None else None
        return json.dumps({"step": step, "scheduler": scheduler_state, "extra": extra}, indent=2)

    state_text = _agreed(preflight)  # nothing is written unless every rank can go ahead
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    nonce = [uuid.uuid4().hex[:12] if world.rank == 0 else None]  # uuid: must not consume `random`
    torch.distributed.broadcast_object_list(nonce, src=0)
    tmp = root / f"{final.name}{_TMP_MARK}{nonce[0]}"
    if world.rank == 0:
        for sub in (MODEL_DIR, OPTIM_DIR, RNG_DIR):
            (tmp / sub).mkdir(parents=True)
    torch.distributed.barrier()

    save_model_dist(chunks, tmp / MODEL_DIR)  # exactly what `matpo convert` reads
    _save_optimizer(chunks, optimizer, tmp / OPTIM_DIR, optim_format)

    def write_own_files() -> None:
        _fsynced_save(_rng_state(world), tmp / RNG_DIR / f"rank_{world.rank:05d}.pt")
        if world.rank == 0:
            copy_hf_metadata(hf_src, tmp / HF_DIR)
            meta = {"format": CHECKPOINT_FORMAT, "kind": "training", "step": step, "layout": world.layout,
                    "world_size": torch.distributed.get_world_size(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time(),
                    "optimizer": {"format": optim_format, "distributed": _is_distributed_optimizer(optimizer)}}
            _write_text(tmp / META_FILE, json.dumps(meta, indent=2))
            _write_text(tmp / STATE_FILE, state_text)

    _agreed(write_own_files)  # also the barrier: every rank's shards and files are on disk

    def commit() -> None:
        if world.rank == 0:
            _fsync_tree(tmp)
            _commit(tmp, final)
            _write_text(root / LATEST_FILE, final.name + "\n", atomic=True)
            _prune(root, keep_last, keep=final)

    _agreed(commit)  # nobody returns before the checkpoint is visible; a failed commit fails everywhere
    return final


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _optim_metadata(optim_format: str) -> dict:
    # chained_optim_avoid_prefix: the keys do not depend on how megatron chains its optimizers
    return {"distrib_optim_sharding_type": optim_format, "chained_optim_avoid_prefix": True}


def _never_stepped(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    # megatron-core 0.19.2 cannot write a torch-Adam distributed optimizer with no state (see
    # compat.init_fresh_distributed_optimizer_state); with Apex/TE it can
    return not HAVE_APEX_OR_TE and any(isinstance(o, DistributedOptimizer) and not o.optimizer.state for o in inner)


def _save_optimizer(chunks: list, optimizer, out: Path, optim_format: str) -> None:
    from megatron.core import dist_checkpointing

    model_sd = _unwrap(chunks[0]).sharded_state_dict()
    sd = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=_optim_metadata(optim_format))
    dist_checkpointing.save(sd, str(out))


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp directory into place (replacing an older copy of the same step)."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}{_TMP_MARK}replaced-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)  # a crash right here leaves older checkpoints to resume from
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Drop complete checkpoints beyond the newest `keep_last` (never `keep`) and stale temp dirs."""
    for d in root.iterdir():
        if _TMP_MARK in d.name and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        elif d.name.startswith(f".{LATEST_FILE}{_TMP_MARK}"):  # a pointer update that never finished
            d.unlink(missing_ok=True)
    if keep_last == 0:
        return
    complete = list_checkpoints(root.parent)
    for d in complete[:-keep_last]:
        if d.name != keep.name:
            shutil.rmtree(d, ignore_errors=True)


# ---- load ------------------------------------------------------------------------------------

def load_checkpoint(ckpt_dir: str | Path, chunks: list, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states from `ckpt_dir`; returns the saved `extra`.

    Same layout: everything is restored exactly. Different TP/PP/CP/DP: the model reshards; optimizer
    state reshards only if it was saved with `optim_format="fully_reshardable"` (DP and CP alone may
    change with the default format: the distributed optimizer shards over DP × CP), otherwise this
    raises — pass `optimizer=None` to load weights only (then build a fresh optimizer, or call
    `optimizer.reload_model_params()` for fp16/bf16 main params). RNG states are restored per rank
    only for the same layout. `scheduler=None` skips it.
    """
    d = Path(ckpt_dir)
    if len(chunks) != 1:
        raise CheckpointError(f"{len(chunks)} model chunks: virtual pipeline stages are not supported")
    world = _world()
    meta, state = _agreed(lambda: _validate_for_load(d, world, optimizer))
    same_layout = meta["layout"] == world.layout
    optim_format = meta["optimizer"]["format"]
    if scheduler is not None and state.get("scheduler") is None:
        raise CheckpointError(f"{d} was saved without a scheduler; pass scheduler=None")

    load_model_dist(chunks, d / MODEL_DIR)
    if optimizer is not None:
        _load_optimizer(chunks, optimizer, d / OPTIM_DIR, optim_format)
    if scheduler is not None:
        # OptimizerParamScheduler.load_state_dict *adds* the saved step count: start from zero
        scheduler.num_steps = 0
        scheduler.load_state_dict(state["scheduler"])
    _restore_rng(d / RNG_DIR, world, same_layout)
    torch.distributed.barrier()
    return state["extra"]


def _validate_for_load(d: Path, world: _World, optimizer) -> tuple[dict, dict]:
    """(meta, state) of a loadable checkpoint, or a clear error."""
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if _TMP_MARK in d.name:
        raise CheckpointError(f"{d} is an unfinished checkpoint (a save was interrupted); use latest_checkpoint()")
    try:
        meta = read_meta(d)
    except ValueError as e:  # unparsable JSON or another format version
        raise CheckpointError(f"{d}: unreadable {META_FILE}: {e}") from e
    if meta.get("kind") != "training":
        raise CheckpointError(f"{d} holds model weights only (written by `matpo convert`?), no training state; "
                              f"load it with convert.load_model_dist or start training from its HF export")
    if not is_complete(d):
        raise CheckpointError(f"{d} is incomplete: expected {META_FILE}, {STATE_FILE}, {MODEL_DIR}/, "
                              f"{OPTIM_DIR}/ and {RNG_DIR}/")
    saved, optim_format = meta["layout"], meta["optimizer"]["format"]
    if optimizer is not None:
        if _is_distributed_optimizer(optimizer) != meta["optimizer"]["distributed"]:
            raise CheckpointError(
                f"{d}: optimizer state was saved with use_distributed_optimizer="
                f"{meta['optimizer']['distributed']}, this run has {not meta['optimizer']['distributed']}")
        if (saved["tp"], saved["pp"]) != (world.tp, world.pp) and optim_format not in _RESHARDABLE:
            raise CheckpointError(
                f"{d} was saved at tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}; this run is "
                f"tp={world.tp} pp={world.pp} dp={world.dp}. Its optimizer state ({optim_format!r}) "
                f"reshards only across DP: resume at tp={saved['tp']} pp={saved['pp']}, or load the "
                f"weights alone (optimizer=None) and start a fresh optimizer")
    return meta, json.loads((d / STATE_FILE).read_text())


def _agreed(check: Callable[[], T]) -> T:
    """Run `check` on every rank; if it raises anywhere, raise everywhere. A rank that failed alone
    (a path one node cannot see, one rank's unserializable `extra`) would leave the others waiting
    in the next collective."""
    result, err = None, None
    try:
        result = check()
    except Exception as e:  # noqa: BLE001 - re-raised below, on this rank or on all of them
        err = e
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise CheckpointError(f"rank {failed[0]} failed: {failed[1]}")
    return result


def _load_optimizer(chunks: list, optimizer, src: Path, optim_format: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_matpo.compat import init_fresh_distributed_optimizer_state, load_distributed_optimizer_state

    init_fresh_distributed_optimizer_state(optimizer)
    model_sd = _unwrap(chunks[0]).sharded_state_dict()
    sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_optim_metadata(optim_format))
    load_distributed_optimizer_state(optimizer, dist_checkpointing.load(sd, str(src)))


# ---- RNG ---------------------------------------------------------------------------------------

def _rng_state(world: _World) -> dict[str, Any]:
    """This rank's generators, as tensors and plain Python values (loadable with weights_only)."""
    from megatron.core import tensor_parallel

    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return {
        "layout": world.layout, "rank": world.rank,
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.copy()), int(np_pos), int(np_gauss), float(np_cached)),
        "torch_cpu": torch.get_rng_state(),
        # On CPU, platform.activate() made torch.cuda's RNG calls a dedicated CPU generator (the
        # one megatron's tracker forks); on GPU this is the real CUDA generator.
        "device": torch.cuda.get_rng_state().clone(),
        # graph-safe trackers hold torch.Generators rather than state tensors
        "tracker": {k: v.get_state() if isinstance(v, torch.Generator) else v.clone()
                    for k, v in tracker.get_states().items()},
    }


def _restore_rng(rng_dir: Path, world: _World, same_layout: bool) -> None:
    from megatron.core import tensor_parallel

    own = rng_dir / f"rank_{world.rank:05d}.pt"
    path = own if own.is_file() else rng_dir / "rank_00000.pt"
    s = torch.load(path, weights_only=True)
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, keys, pos, gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, gauss, cached))
    torch.set_rng_state(s["torch_cpu"])
    if not same_layout:
        # device/tracker streams belong to a TP/PP coordinate that no longer exists: keep the
        # seeds init_megatron gave this layout (exact resume across layouts is impossible anyway)
        log.warning("checkpoint layout %s != run layout %s: megatron's RNG tracker is not restored",
                    s["layout"], world.layout)
        return
    torch.cuda.set_rng_state(s["device"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    live = tracker.get_states()
    restored = {}
    for name, saved in s["tracker"].items():
        if isinstance(live.get(name), torch.Generator):
            live[name].set_state(saved)
            restored[name] = live[name]
        else:
            restored[name] = saved
    tracker.set_states(restored)


# ---- files ------------------------------------------------------------------------------------

def _write_text(path: Path, text: str, atomic: bool = False) -> None:
    target = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}") if atomic else path
    with open(target, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
        _fsync_dir(path.parent)


def _fsynced_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Persist every file and directory entry under `root` before the rename can become durable.
    (The writers already synced their own data; a clean file's fsync costs next to nothing.)"""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
