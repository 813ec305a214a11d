"""The actor ranks as Ray actors forming one torch.distributed world (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

from typing import Any

from megatron_matpo import platform
from megatron_matpo.train.packing import PackedMicroBatch
from megatron_matpo.train.critic import CriticWorker
from megatron_matpo.train.worker import ActorWorker, WorkerSpec


class _Rendezvous:
    """What only a Ray actor needs: where rank 0 listens. (Ray points CUDA_VISIBLE_DEVICES at the
    actor's own GPU, so its local rank is 0.)"""

    def rendezvous(self) -> tuple[str, int]:
        import ray

        from megatron_matpo.ports import free_port

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

    def _call(self, method: str, *args: Any) -> list:
        """The same collective call on every rank; returns each rank's result."""
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def _reported(self, method: str, *args: Any) -> list:
        """Results of the ranks that report (last pipeline stage, TP rank 0), one per DP rank."""
        return [r for r, i in zip(self._call(method, *args), self.info) if i["reports"]]

    @property
    def reports(self) -> list[bool]:
        """Per rank: whether its results count (last pipeline stage, TP rank 0, CP rank 0; one per DP rank)."""
        return [i["reports"] for i in self.info]

    # ---- the collective calls of the loop (see ActorWorker / CriticWorker for what each does) ------
    def connect_engines(self, engine_urls: list[str]) -> None:
        self._call("connect_engines", engine_urls)

    def sync_weights(self) -> dict[str, float]:
        """Every rank takes part; rank 0's sync stats."""
        return self._call("sync_weights")[0]

    def old_logprobs(self, recompute: bool) -> list[dict[str, float]]:
        return self._reported("old_logprobs", recompute)

    def ref_logprobs(self) -> list[dict[str, float]]:
        return self._reported("ref_logprobs")

    def values(self) -> dict[int, Any]:
        """The critic's per-token values of the loaded batch, by row id."""
        return {rid: v for rep in self._reported("values") for rid, v in rep.items()}

    def train(self, global_token_counts: list[int],
              old_from_forward: bool | None = None) -> list[list[dict[str, float]]]:
        """One update per mini-batch; each rank's per-mini-batch stats (`reports` says which count).
        `old_from_forward`: the actor's fused old-logprob path (a critic takes no such argument)."""
        extra = () if old_from_forward is None else (old_from_forward,)
        return self._call("train", global_token_counts, *extra)

    def parity(self, token_ids: list[list[int]], engine_url: str) -> dict[str, float]:
        """Engine-vs-actor prompt-logprob parity, from the rank that computed it."""
        found = [r for r in self._call("parity", token_ids, engine_url) if r]
        if not found:
            raise RuntimeError("no actor rank returned the parity check")
        return found[0]

    def save(self, root: str, step: int, extra: dict, keep_last: int) -> None:
        self._call("save", root, step, extra, keep_last)

    def load(self, ckpt_dir: str) -> dict:
        """Rank 0's restored extra state (step, data cursor, ...)."""
        return self._call("load", ckpt_dir)[0]

    def export_hf(self, out_dir: str) -> None:
        self._call("export_hf", out_dir)

    def load_batch(self, mini_batches: list[list[list[PackedMicroBatch]]]) -> None:
        """`mini_batches[m][dp]` → every rank gets its DP slice of each mini-batch (shipped once per DP rank)."""
        import ray

        refs = [ray.put([mb[dp] for mb in mini_batches]) for dp in range(self.dp_size)]
        ray.get([w.load_batch.remote(refs[i["dp_rank"]]) for w, i in zip(self.workers, self.info)])

    def shutdown(self) -> None:
        import ray

        try:
            self._call("shutdown")
        finally:
            for w in self.workers:
                ray.kill(w)


def gpus_per_rank() -> float:
    return 1.0 if platform.capabilities().cuda else 0.0
