"""Process-group bring-up for Megatron ranks, and a local launcher for multi-process jobs.

`init_megatron(layout)` is what every Megatron rank calls (whether started by `launch_local`, by Ray
actors, or by Slurm): torch.distributed on the platform's backend, then megatron-core's model-parallel
groups and RNG seeds. `launch_local` spawns `layout.world_size` processes on this machine and returns
rank 0's result (used by `matpo convert` and the tests).
"""
from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

from megatron_matpo import platform
from megatron_matpo.compat import prepare_process
from megatron_matpo.model.layout import ParallelLayout
from megatron_matpo.ports import free_port


def init_megatron(layout: ParallelLayout, seed: int = 1234) -> None:
    """Join the torch.distributed world (env:// variables) and build megatron's parallel groups."""
    platform.activate(int(os.environ.get("LOCAL_RANK", "0")))
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=platform.dist_backend(), timeout=timedelta(minutes=10))
    world = torch.distributed.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"torch.distributed world size {world} != tp*pp*cp*dp = {layout.world_size}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_megatron() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # oversubscribed CPU ranks slow down ~40x without it
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    prepare_process()
    try:
        result = fn(*args)
        queue.put((rank, "ok", result if rank == 0 else None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def launch_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 1800) -> Any:
    """Run `fn(*args)` in `world_size` fresh processes (env:// rendezvous on loopback).

    `fn` must be importable (module-level). Returns rank 0's return value; raises with the failing
    rank's traceback if any rank fails.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline, failed = time.monotonic() + timeout_s, False
    try:
        while len(results) < world_size:
            try:  # short waits: a rank killed before it could report (OOM, a signal) fails the launch at once
                rank, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"local launch {'timed out' if not dead else 'lost ranks'} (exit codes: "
                                       f"{[p.exitcode for p in procs]}, ranks gone without a result {dead})") from None
                continue
            results[rank] = (status, payload)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
    except BaseException:
        failed = True  # the other ranks get 5 s to finish, not 60
        raise
    finally:
        for p in procs:
            p.join(timeout=5 if failed else 60)
            if p.is_alive():
                p.kill()
    return results[0][1]
