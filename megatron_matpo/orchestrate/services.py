"""SGLang engines and the MCP tool server as Ray actors: each owns its server process on the node
Ray placed it on and reports the URL; the controller's rollout session talks to them over HTTP."""
from __future__ import annotations

import contextlib

from megatron_matpo.rollout.engine import EngineConfig


class EngineHost:
    def __init__(self, cfg: EngineConfig):
        import dataclasses

        import ray

        from megatron_matpo.rollout.engine import EngineServer

        gpus = [int(g) for g in ray.get_gpu_ids()] or None
        # Ray already narrowed CUDA_VISIBLE_DEVICES to this actor's GPUs: index them from 0
        cfg = dataclasses.replace(cfg, host=ray.util.get_node_ip_address())  # reachable from other nodes
        self.server = EngineServer(cfg, list(range(len(gpus))) if gpus else None)

    def start(self) -> str:
        self.server.start().wait_ready()
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


class ToolboxHost:
    def __init__(self, server: dict):
        import ray

        from megatron_matpo.toolbox.server import RunningServer, ToolboxConfig

        self.cm = RunningServer(ToolboxConfig(**{**server, "host": ray.util.get_node_ip_address()}))

    def start(self) -> str:
        return self.cm.__enter__().url

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cm.__exit__(None, None, None)


class Services:
    """Engines (one bundle each: tp GPUs, or CPU only) and the tool server, started in parallel."""

    def __init__(self, engine_cfg: EngineConfig, num_engines: int, toolbox: dict | None, pg,
                 bundle_offset: int, gpus_per_engine: float, verifier: EngineConfig | None = None,
                 verifier_gpus: float = 0.0):
        """`verifier`: also serve MAPoRL's score-model verifier, on the bundle after the tool server's."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def at(i: int):
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_offset + i)

        self.engines = [ray.remote(EngineHost).options(num_cpus=1, num_gpus=gpus_per_engine,
                                                       scheduling_strategy=at(i)).remote(engine_cfg)
                        for i in range(num_engines)]
        self.toolbox = None
        starts = [e.start.remote() for e in self.engines]
        if toolbox is not None:
            self.toolbox = ray.remote(ToolboxHost).options(num_cpus=1, scheduling_strategy=at(num_engines)).remote(
                toolbox)
            starts.append(self.toolbox.start.remote())
        self.verifier = None
        if verifier is not None:
            self.verifier = ray.remote(EngineHost).options(
                num_cpus=1, num_gpus=verifier_gpus,
                scheduling_strategy=at(num_engines + (toolbox is not None))).remote(verifier)
            starts.append(self.verifier.start.remote())
        urls = ray.get(starts)
        self.engine_urls = urls[:num_engines]
        self.toolbox_url = urls[num_engines] if toolbox is not None else None
        self.verifier_url = urls[-1] if verifier is not None else None

    def stop(self) -> None:
        import ray

        actors = self.engines + [a for a in (self.toolbox, self.verifier) if a is not None]
        with contextlib.suppress(Exception):
            ray.get([a.stop.remote() for a in actors], timeout=60)
        for a in actors:
            ray.kill(a)
