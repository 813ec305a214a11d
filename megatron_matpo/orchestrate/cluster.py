"""Ray bring-up and placement: one placement group holds a bundle per actor rank; engines take their
own bundles (disaggregated) or share the actor's GPUs (colocated)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from megatron_matpo import platform


@dataclass
class OrchestrateSection:
    # join a running cluster (host:port; launch/ray_cluster.sh exports RAY_ADDRESS, which is used when
    # this is unset); None and no RAY_ADDRESS = start a local one
    ray_address: str | None = None
    colocate: bool = False  # engines on the actor's GPUs (sync by tensors) vs their own (broadcast)
    num_cpus: int | None = None  # logical CPUs of a local cluster (default: enough for every process)
    placement_timeout_s: float = 300.0
    # the cluster's shape (the Slurm scripts pass the allocation's): the layout is checked against it
    # before anything starts; None = not checked (one machine)
    nodes: int | None = None
    gpus_per_node: int | None = None


# what every Ray worker process needs (the driver's own environment is not inherited by actors)
_WORKER_ENV = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "MATPO_WORK_DIR", "HF_HUB_OFFLINE",
               "TRANSFORMERS_OFFLINE", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME",
               "NCCL_SOCKET_IFNAME")


def start_ray(cfg: OrchestrateSection, needed_cpus: int) -> None:
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        # ray 2.60 turns token authentication on for a new local cluster and warns on the console that it
        # did, unless RAY_AUTH_MODE names the mode: we name the same mode. Ray reads it when it is imported,
        # hence only before that; a cluster we join keeps the mode it was started with.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    kw: dict = dict(log_to_driver=True, include_dashboard=False, configure_logging=True, logging_level="warning")
    if address:
        # a cluster started elsewhere (`ray start`): the workers' environment travels as the job's runtime
        # env; the hook prepares each worker before it imports anything (compat.prepare_process)
        ray.init(address=address, runtime_env={"env_vars": env, "worker_process_setup_hook":
                                               "megatron_matpo.compat.prepare_process"}, **kw)
        return
    # a local cluster of our own: ray.init() without an address joins the last `ray start` cluster on this
    # machine (/tmp/ray/ray_current_cluster, ray 2.60), e.g. another user's or a Slurm job's; "local" never does.
    # Logical CPUs: processes, not cores (the CPU ranks run one thread each)
    kw["address"] = "local"
    kw["num_cpus"] = cfg.num_cpus or max(os.cpu_count() or 1, needed_cpus)
    if platform.capabilities().cuda:
        import torch

        kw["num_gpus"] = torch.cuda.device_count()
    # No runtime env here: ray 2.60 starts every worker of a job with one through `setup_worker.py`, a
    # second interpreter that imports ray (~1 s of CPU per worker) before exec'ing the worker, which
    # imports it again. The raylet started now inherits this environment and hands it to its workers;
    # they are prepared when they import megatron_matpo.orchestrate (its __init__).
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(**kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def placement_group(bundles: list[dict], timeout_s: float, name: str):
    """Reserve the bundles (PACK: fill nodes in order, keeping TP groups inside a node) or fail with
    what was asked and what the cluster has."""
    import ray
    from ray.util.placement_group import placement_group as make_pg

    pg = make_pg(bundles, strategy="PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise TimeoutError(f"placement group {name!r} ({len(bundles)} bundles, e.g. {bundles[0]}) not placed in "
                           f"{timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}")
    return pg


def placement_nodes(pg) -> list[str]:
    """Node of each bundle, in bundle order, by its address (what a user sees in `ray status` and
    Slurm's node list; two Ray nodes on one host, as the local Slurm's, also have one id each)."""
    import ray
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    addr = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    names = {nid: addr.get(nid, nid[:8]) for nid in table.values()}
    if len(set(names.values())) < len(names):  # several nodes on one address: tell them apart
        names = {nid: f"{names[nid]}/{nid[:6]}" for nid in names}
    return [names[table[i]] for i in sorted(table)]


def wait_for_cluster(address: str, nodes: int, gpus: int = 0, timeout_s: float = 300.0,
                     poll_s: float = 2.0) -> dict:
    """Block until the Ray cluster at `address` answers and has `nodes` alive nodes and `gpus` GPUs in
    total; TimeoutError naming what is missing otherwise. Returns {nodes, gpus, cpus}."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.is_initialized():  # the head may still be starting
        try:
            ray.init(address=address, logging_level="error", log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray head answers at {address} after {timeout_s:.0f}s: {e}") from e
            time.sleep(poll_s)
    try:
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            have = {"nodes": len(alive), "gpus": int(sum(n["Resources"].get("GPU", 0) for n in alive)),
                    "cpus": int(sum(n["Resources"].get("CPU", 0) for n in alive))}
            if have["nodes"] >= nodes and have["gpus"] >= gpus:
                return have
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Ray cluster at {address} has {have['nodes']}/{nodes} nodes and {have['gpus']}/{gpus} GPUs "
                    f"after {timeout_s:.0f}s (alive: {sorted(n['NodeManagerAddress'] for n in alive)}); a worker "
                    "node did not join: see its `ray start` log")
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
