"""The actor ranks as Ray actors forming one torch.distributed world (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

from typing import Any

from megatron_matpo import platform
from megatron_matpo.data.packing import PackedMicroBatch
from megatron_matpo.train.critic import CriticWorker
from megatron_matpo.train.worker import ActorWorker, WorkerSpec


class _Rendezvous:
    """What only a Ray actor needs: where rank 0 listens. (Ray points CUDA_VISIBLE_DEVICES at the
    actor's own GPU, so its local rank is 0.)"""

    def rendezvous(self) -> tuple[str, int]:
        import ray

        from megatron_matpo.dist import free_port

        return ray.util.get_node_ip_address(), free_port()


class _RankActor(ActorWorker, _Rendezvous):
    pass


class _RankCritic(CriticWorker, _Rendezvous):
    pass


WORKERS = {"actor": _RankActor, "critic": _RankCritic}


class ActorGroup:
    def __init__(self, spec: WorkerSpec, pg, bundle_offset: int = 0, gpus_per_rank: float = 0.0, kind: str = "actor"):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = spec.layout.world_size
        remote = ray.remote(WORKERS[kind])
        self.workers = [remote.options(
            num_cpus=1, num_gpus=gpus_per_rank, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_offset + r),
        ).remote(spec) for r in range(world)]
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        self.info = ray.get([w.setup.remote(r, world, addr, port) for r, w in enumerate(self.workers)])
        self.dp_size = spec.layout.dp

    def call(self, method: str, *args: Any) -> list:
        """The same collective call on every rank; returns each rank's result."""
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def reported(self, method: str, *args: Any) -> list:
        """Results of the ranks that report (last pipeline stage, TP rank 0), one per DP rank."""
        return [r for r, i in zip(self.call(method, *args), self.info) if i["reports"]]

    def load_batch(self, mini_batches: list[list[list[PackedMicroBatch]]]) -> None:
        """`mini_batches[m][dp]` → every rank gets its DP slice of each mini-batch (shipped once per DP rank)."""
        import ray

        refs = [ray.put([mb[dp] for mb in mini_batches]) for dp in range(self.dp_size)]
        ray.get([w.load_batch.remote(refs[i["dp_rank"]]) for w, i in zip(self.workers, self.info)])

    def shutdown(self) -> None:
        import ray

        try:
            self.call("shutdown")
        finally:
            for w in self.workers:
                ray.kill(w)


def gpus_per_rank() -> float:
    return 1.0 if platform.capabilities().cuda else 0.0
