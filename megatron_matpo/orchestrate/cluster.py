"""Ray bring-up and placement: one placement group holds a bundle per actor rank; engines take their
own bundles (disaggregated) or share the actor's GPUs (colocated)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_matpo import platform


@dataclass
class OrchestrateSection:
    ray_address: str | None = None  # join a running cluster ("auto" inside a Slurm job); None = start local
    colocate: bool = False  # engines on the actor's GPUs (sync by tensors) vs their own (broadcast)
    num_cpus: int | None = None  # logical CPUs of a local cluster (default: enough for every process)
    placement_timeout_s: float = 300.0


# what every Ray worker process needs (the driver's own environment is not inherited by actors)
_WORKER_ENV = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "MATPO_WORK_DIR", "HF_HUB_OFFLINE",
               "TRANSFORMERS_OFFLINE", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME",
               "NCCL_SOCKET_IFNAME")


def start_ray(cfg: OrchestrateSection, needed_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    kw: dict = dict(runtime_env={"env_vars": env}, log_to_driver=True, include_dashboard=False,
                    configure_logging=True, logging_level="warning")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kw)
        return
    # a local cluster: logical CPUs (processes, not cores — the CPU ranks run one thread each)
    kw["num_cpus"] = cfg.num_cpus or max(os.cpu_count() or 1, needed_cpus)
    if platform.capabilities().cuda:
        import torch

        kw["num_gpus"] = torch.cuda.device_count()
    ray.init(**kw)


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


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
