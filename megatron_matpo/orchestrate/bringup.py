"""A training run's processes on Ray, one `Stack` per policy (MATPO and shared-model MAPoRL have
one; MAPoRL with distinct models one per agent).

`plan_bundles` is the placement arithmetic (pure). `Cluster.start` reserves the placement group and
starts every stack's engines and the tool server and every stack's actor (and critic) ranks (all at
once when the engines' KV pools have a fixed size, else in the order engines sizing their pool from
free memory need), and connects each actor to its engines. `Cluster.close` stops
whatever was started, in reverse order, also after a start that failed part way.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_matpo.orchestrate.actor_group import ActorGroup
    from megatron_matpo.orchestrate.services import Services
    from megatron_matpo.train.config import TrainConfig


@dataclasses.dataclass
class Stack:
    """One policy: the engines that sample from it and its Megatron actor (and critic) ranks."""
    name: str
    model: str
    root: Path  # its checkpoints/ and hf/ live here
    services: "Services | None" = None
    actors: "ActorGroup | None" = None
    critic: "ActorGroup | None" = None  # advantage.estimator=gae: its value model (checkpoints in root/critic)


def policy_stacks(cfg: "TrainConfig") -> list[Stack]:
    """The run's policies, nothing started: one "actor" at run_dir, or (MAPoRL, distinct models) one
    per agent, "agent<k>" at run_dir/agent<k>, each checkpointed on its own."""
    run_dir = Path(cfg.run_dir)
    if cfg.algorithm != "maporl" or cfg.maporl.stacks == 1:
        return [Stack("actor", cfg.model, run_dir)]
    return [Stack(f"agent{k}", cfg.maporl.model_of(k, cfg.model), run_dir / f"agent{k}")
            for k in range(cfg.maporl.stacks)]


@dataclasses.dataclass(frozen=True)
class BundlePlan:
    """Per stack: a bundle per actor rank, then per critic rank, then one per engine (its TP GPUs;
    none when colocated: the engines share the actor's GPUs); stack 0 adds one for the tool server."""
    bundles: list[dict]
    sizes: list[int]  # bundles per stack
    ranks: int  # actor (+ critic) ranks per stack
    engine_gpus: float  # GPUs of each engine's bundle
    what: str  # what the bundles are for, in words (error messages)

    def offset(self, stack: int) -> int:
        return sum(self.sizes[:stack])

    def total(self, resource: str) -> float:
        return float(sum(b.get(resource, 0) for b in self.bundles))


def plan_bundles(stacks: int, world: int, critic: bool, engines: int, engine_tp: int, gpus_per_rank: float,
                 colocate: bool, tool_server: bool, verifier_engine: bool = False) -> BundlePlan:
    """`verifier_engine`: stack 0 also serves MAPoRL's score-model verifier (one GPU when not colocated)."""
    ranks = world * (2 if critic else 1)
    eng_gpus = 0.0 if colocate else gpus_per_rank * engine_tp
    rank_b = {"CPU": 1, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
    eng_b = {"CPU": 1, **({"GPU": eng_gpus} if eng_gpus else {})}
    ver_b = {"CPU": 1, **({"GPU": gpus_per_rank} if gpus_per_rank and not colocate else {})}
    extra = [{"CPU": 1}] * tool_server + [ver_b] * verifier_engine
    sizes = [ranks + engines + (len(extra) if k == 0 else 0) for k in range(stacks)]
    bundles = [b for k in range(stacks) for b in [rank_b] * ranks + [eng_b] * engines + (extra if k == 0 else [])]
    what = (f"{stacks} x ({ranks} {'actor + critic' if critic else 'actor'} ranks + {engines} engine(s))"
            + (" + the tool server" if tool_server else "") + (" + the verifier's engine" if verifier_engine else ""))
    return BundlePlan(bundles, sizes, ranks, eng_gpus, what)


def plan_for(cfg: "TrainConfig", gpus_per_rank: float) -> BundlePlan:
    """The placement of `cfg`'s run (preflight checks it against a local cluster, `Cluster.start` reserves it)."""
    from megatron_matpo.rollout.runner import toolbox_server_config

    ro = cfg.rollout
    tools = cfg.algorithm != "maporl" and toolbox_server_config(ro.toolbox, cfg.corpus) is not None
    verifier = cfg.algorithm == "maporl" and cfg.maporl.verifier.served_model() is not None
    return plan_bundles(len(policy_stacks(cfg)), cfg.actor.layout.world_size, cfg.advantage.estimator == "gae",
                        ro.engine.num_engines, ro.engine.tp_size, gpus_per_rank, cfg.orchestrate.colocate, tools,
                        verifier)


def _check_fits(plan: BundlePlan) -> None:
    """Refuse at once a placement the Ray cluster cannot hold (it would wait out placement_timeout_s)."""
    import ray

    from megatron_matpo.config import ConfigError

    have = ray.cluster_resources()
    short = [f"{plan.total(k):g} {k}s, the cluster has {have.get(k, 0.0):g}" for k in ("CPU", "GPU")
             if plan.total(k) > have.get(k, 0.0) + 1e-9]
    if short:
        raise ConfigError(f"orchestrate: the placement ({plan.what}) needs {'; '.join(short)}: lower actor.tp/pp/dp "
                          "or rollout.engine.num_engines, or give the cluster more (orchestrate.num_cpus, nodes)")


def verifier_engine_config(cfg: "TrainConfig", engines: int, log_dir: str):
    """The SGLang engine of MAPoRL's served score-model verifier (`maporl.verifier.engine`), or None."""
    from megatron_matpo import config
    from megatron_matpo.rollout.runner import EngineSection

    served = cfg.maporl.verifier.served_model() if cfg.algorithm == "maporl" else None
    if served is None:
        return None
    section = config.build(EngineSection, cfg.maporl.verifier.engine, "maporl.verifier.engine")
    # SGLang serves a *ForSequenceClassification as a pooled-output model (`/classify`) by its architecture
    return section.engine_config(served, engines, str(Path(log_dir) / "verifier"), cfg.seed)


class Cluster:
    """Ray, the placement group and the stacks of one run."""

    def __init__(self) -> None:
        self.pg = None
        self.stacks: list[Stack] = []

    def start(self, cfg: "TrainConfig", stacks: list[Stack], log_dir: str, timer=None) -> "Cluster":
        """Start everything `cfg` asks for into `stacks` (kept as they fill, so `close` after a failed
        start stops what did start). `timer(name)` times each part (a context manager)."""
        from megatron_matpo.compat import engine_memory_release_supported
        from megatron_matpo.orchestrate.actor_group import ActorGroup, gpus_per_rank
        from megatron_matpo.orchestrate.cluster import placement_group, placement_nodes, start_ray
        from megatron_matpo.orchestrate.services import Services
        from megatron_matpo.rollout.runner import toolbox_server_config
        from megatron_matpo.train.worker import WorkerSpec

        bt = timer or (lambda name: nullcontext())
        self.stacks = stacks
        layout, ro, n = cfg.actor.layout, cfg.rollout, len(stacks)
        gae = cfg.advantage.estimator == "gae"
        tools = None if cfg.algorithm == "maporl" else toolbox_server_config(ro.toolbox, cfg.corpus)
        gpu = gpus_per_rank()
        plan = plan_for(cfg, gpu)
        with bt("ray"):
            start_ray(cfg.orchestrate, needed_cpus=max(n * (plan.ranks + ro.engine.num_engines) + 1,
                                                       int(plan.total("CPU"))))
        _check_fits(plan)
        with bt("placement"):
            self.pg = placement_group(plan.bundles, cfg.orchestrate.placement_timeout_s, "matpo")
        where = placement_nodes(self.pg)
        print(f"placement: {len(plan.bundles)} bundles on {len(set(where))} Ray node(s): actor ranks on "
              f"{', '.join(sorted(set(where[:plan.ranks])))}, engines/tools on "
              f"{', '.join(sorted(set(where[plan.ranks:plan.sizes[0]])))}", flush=True)
        # seeded, batch-invariant sampling; cached prefixes would change numerics
        extra = ["--enable-deterministic-inference", "--disable-radix-cache"] if cfg.deterministic else []
        if cfg.orchestrate.colocate and engine_memory_release_supported():
            extra.append("--enable-memory-saver")  # engines give the GPU back while the actor trains
        # An SGLang engine sizes its KV cache from the memory free while it profiles: processes starting
        # beside it (other engines, actor ranks) made that fail on CPU ("Loaded weights leave no GPU memory
        # for the KV cache", 2 stacks on 2 cores). So engines start one stack after another and the ranks
        # after them, unless the pool has a fixed size (rollout.engine.max_total_tokens, with the headroom
        # of mem_fraction_static): then everything starts at once.
        together = ro.engine.max_total_tokens is not None

        verifier = verifier_engine_config(cfg, n * ro.engine.num_engines + 1, log_dir)

        def start_engines(k: int, st: Stack) -> None:
            ecfg = ro.engine.engine_config(st.model, n * ro.engine.num_engines + (verifier is not None), log_dir,
                                           cfg.seed, extra)
            with bt("engines_tools"):
                st.services = Services(ecfg, ro.engine.num_engines, tools if k == 0 else None, self.pg,
                                       plan.offset(k) + plan.ranks, plan.engine_gpus,
                                       verifier if k == 0 else None, 0.0 if cfg.orchestrate.colocate else gpu)

        with ThreadPoolExecutor(max_workers=3 * n) as pool:
            parts: dict = {}
            for k, st in enumerate(stacks):
                if together:
                    parts[k, "engines"] = pool.submit(start_engines, k, st)
                else:
                    start_engines(k, st)
            with bt("ranks"):
                a = cfg.actor
                for k, st in enumerate(stacks):
                    spec = WorkerSpec(model=st.model, layout=layout, dtype=cfg.resolved_dtype(),
                                      max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, recompute=a.recompute,
                                      optim=cfg.optim, loss=cfg.loss, sync=cfg.sync,
                                      use_reference=cfg.loss.kl_coef > 0, seed=a.seed,
                                      total_steps=cfg.steps * a.mini_batches,
                                      temperature=cfg.sampling_temperature())
                    parts[k, "actors"] = pool.submit(ActorGroup, spec, self.pg, plan.offset(k), gpu)
                    if gae:  # same layout and packing, its own optimizer; no engines, no reference
                        cspec = dataclasses.replace(spec, model=cfg.critic.model or st.model,
                                                    optim=cfg.critic.optim, sync=None, use_reference=False)
                        parts[k, "critic"] = pool.submit(ActorGroup, cspec, self.pg,
                                                         plan.offset(k) + layout.world_size, gpu, kind="critic")
                errors = []
                for (k, attr), fut in parts.items():  # every group is kept, so a failed start tears all down
                    if attr != "engines":
                        try:
                            setattr(stacks[k], attr, fut.result())
                        except BaseException as e:
                            errors.append(e)
            for (k, attr), fut in parts.items():  # engines started beside the ranks (timed on their own)
                if attr == "engines":
                    try:
                        fut.result()  # start_engines set the stack's services
                    except BaseException as e:
                        errors.append(e)
            if errors:
                raise errors[0]
        for st in stacks:
            print(f"{st.name} engines: {st.services.engine_urls}; tool server: "
                  f"{st.services.toolbox_url or ro.toolbox.url}"
                  + (f"; verifier: {st.services.verifier_url}" if st.services.verifier_url else ""), flush=True)
            with bt("connect_engines"):
                st.actors.connect_engines(st.services.engine_urls)
        return self

    def close(self) -> None:
        """Every stack's actor and critic ranks, then its engines and tool server; then Ray. A part that
        fails to stop is reported and the rest still stopped (an error may already be propagating)."""
        from megatron_matpo.orchestrate.cluster import stop_ray

        try:
            for st in self.stacks:
                for name, obj, stop in [("actors", st.actors, "shutdown"), ("critic", st.critic, "shutdown"),
                                        ("engines", st.services, "stop")]:
                    if obj is not None:
                        try:
                            getattr(obj, stop)()
                        except Exception as e:
                            print(f"warning: stopping {st.name} {name} failed: {e!r}")
        finally:
            stop_ray()
