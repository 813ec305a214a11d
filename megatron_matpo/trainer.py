"""The RL controller: one process drives the loop of ../shared/DESIGN.md.

  rollout (engines + tools) → reward → advantage (workers inherit) → pack → old/ref logprobs →
  train (PPO) → sync weights into the engines (+ parity check) → log, checkpoint, eval → next step
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from megatron_matpo.agents.workflow import derive_seed
from megatron_matpo.config import ConfigError, to_dict
from megatron_matpo.data.loader import PromptLoader
from megatron_matpo.data.packing import pack_rows, packing_stats
from megatron_matpo.train import preemption
from megatron_matpo.train import stats as S
from megatron_matpo.train.preemption import Preempted
from megatron_matpo.train.config import TrainConfig
from megatron_matpo.train.rows import build_rows, rollout_metrics


class Timer(dict):
    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self[f"time/{name}_s"] = self.get(f"time/{name}_s", 0.0) + time.perf_counter() - t0


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from megatron_matpo.train.checkpoint import latest_checkpoint

        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.run_dir)
        preemption.install()  # SIGUSR1: checkpoint and stop at the next step boundary
        self.resume_from = latest_checkpoint(self.run_dir)
        if self.resume_from is not None and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints ({self.resume_from.name}); pass --resume to "
                              "continue that run or choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---- bring-up ---------------------------------------------------------------------------------
    def __enter__(self) -> "Trainer":
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)  # a failed start must not leave Ray, engines or ranks behind
            raise

    def _start(self) -> "Trainer":
        from megatron_matpo.compat import engine_memory_release_supported
        from megatron_matpo.data.parquet import read_dataset
        from megatron_matpo.orchestrate.actor_group import ActorGroup, gpus_per_rank
        from megatron_matpo.orchestrate.cluster import placement_group, placement_nodes, start_ray
        from megatron_matpo.orchestrate.services import Services
        from megatron_matpo.rollout.engine import EngineConfig
        from megatron_matpo.rollout.runner import RolloutSession, toolbox_server_config
        from megatron_matpo.train.bootstrap import ensure_inputs
        from megatron_matpo.train.logger import RunLogger
        from megatron_matpo.train.worker import WorkerSpec

        cfg = self.cfg
        ensure_inputs(cfg)
        samples = list(read_dataset(cfg.data))
        if cfg.bootstrap.toy_answer is not None:
            samples = [dataclasses.replace(s, ground_truth=cfg.bootstrap.toy_answer) for s in samples]
        self.loader = PromptLoader(samples, cfg.prompts_per_step, cfg.seed)
        self.log = RunLogger(self.run_dir)

        layout, ro = cfg.actor.layout, cfg.rollout
        n_eng, eng_tp = ro.engine.num_engines, ro.engine.tp_size
        gpu = gpus_per_rank()
        start_ray(cfg.orchestrate, needed_cpus=layout.world_size + n_eng + 1)
        # one bundle per actor rank, then one per engine (its TP GPUs) and one for the tool server;
        # colocated engines share the actor's GPUs instead of bringing their own
        eng_gpus = 0.0 if cfg.orchestrate.colocate else gpu * eng_tp
        bundles = ([{"CPU": 1, **({"GPU": gpu} if gpu else {})}] * layout.world_size
                   + [{"CPU": 1, **({"GPU": eng_gpus} if eng_gpus else {})}] * n_eng + [{"CPU": 1}])
        self.pg = placement_group(bundles, cfg.orchestrate.placement_timeout_s, "matpo")
        where = placement_nodes(self.pg)
        print(f"placement: {len(bundles)} bundles on {len(set(where))} Ray node(s): actor ranks on "
              f"{sorted(set(where[:layout.world_size]))}, engines/tools on {sorted(set(where[layout.world_size:]))}",
              flush=True)
        # seeded, batch-invariant sampling; cached prefixes would change numerics
        extra = ["--enable-deterministic-inference", "--disable-radix-cache"] if cfg.deterministic else []
        if cfg.orchestrate.colocate and engine_memory_release_supported():
            extra.append("--enable-memory-saver")  # engines give the GPU back while the actor trains
        ecfg = EngineConfig(model_path=cfg.model, tp_size=eng_tp, dtype=ro.engine.dtype,
                            mem_fraction_static=ro.engine.mem_fraction_static, random_seed=cfg.seed,
                            context_length=ro.engine.context_length, log_dir=str(self.run_dir / "logs"),
                            extra_args=extra)
        self.services = Services(ecfg, n_eng, toolbox_server_config(ro.toolbox, cfg.corpus), self.pg,
                                 layout.world_size, eng_gpus)
        print(f"engines: {self.services.engine_urls}; tool server: {self.services.toolbox_url or ro.toolbox.url}",
              flush=True)
        spec = WorkerSpec(model=cfg.model, layout=layout, dtype=cfg.resolved_dtype(),
                          seq_length=cfg.actor.max_tokens_per_micro_batch, recompute=cfg.actor.recompute,
                          optim=cfg.optim, loss=cfg.loss,
                          sync={"mode": cfg.sync.mode, "bucket_mb": cfg.sync.bucket_mb},
                          use_reference=cfg.loss.kl_coef > 0, seed=cfg.actor.seed,
                          total_steps=cfg.steps * cfg.actor.mini_batches)
        self.actors = ActorGroup(spec, self.pg, 0, gpu)
        self.actors.call("connect_engines", self.services.engine_urls)

        self.step = 0
        if self.resume_from is not None:
            state = self.actors.call("load", str(self.resume_from))[0]
            self.step = int(state["step"])
            self.loader.load_state_dict(state["data"])
            self.log.truncate_after(self.step)
            self.actors.call("sync_weights")  # the engines start from the initial weights
            print(f"resumed from {self.resume_from} at step {self.step}")
        rcfg = dataclasses.replace(ro, model=cfg.model, data=cfg.data, log_dir=str(self.run_dir / "logs"),
                                   workflow=dataclasses.replace(ro.workflow, seeded=cfg.deterministic),
                                   engine=dataclasses.replace(ro.engine, urls=self.services.engine_urls),
                                   toolbox=dataclasses.replace(ro.toolbox, url=ro.toolbox.url or self.services.toolbox_url))
        self.session = RolloutSession(rcfg).__enter__()
        self.release_engine_memory = cfg.orchestrate.colocate and engine_memory_release_supported()
        return self

    def __exit__(self, *exc) -> None:
        from megatron_matpo.orchestrate.cluster import stop_ray

        try:
            # whatever was started, in reverse order (a failed start got only part of the way)
            for name, close in (("session", lambda o: o.__exit__(None, None, None)), ("actors", lambda o: o.shutdown()),
                                ("services", lambda o: o.stop()), ("log", lambda o: o.close())):
                obj = getattr(self, name, None)
                if obj is None:
                    continue
                try:
                    close(obj)
                except Exception as e:  # keep tearing down; the first error is already propagating
                    print(f"warning: stopping {name} failed: {e!r}")
        finally:
            stop_ray()

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        cfg, history, stop = self.cfg, [], preemption.STOP
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        while self.step < cfg.steps:
            if stop.is_set():  # the warning came during bring-up: nothing new to save
                raise Preempted(f"SIGUSR1 before step {self.step + 1}; the last checkpoint stands")
            self.step += 1
            m = self.train_step(self.step)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                m.update(self.evaluate())
            self.log.log(self.step, m)
            history.append(m)
            last = self.step == cfg.steps
            if last or stop.is_set() or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.save()
            if stop.is_set() and not last:
                bar.close()
                raise Preempted(f"SIGUSR1: stopped after step {self.step} with a checkpoint; resume with --resume")
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m.get('reward/accuracy', 0.0):.3f}",
                            workers=f"{m.get('planner/workers_per_planner', 0.0):.1f}")
        bar.close()
        if cfg.checkpoint.export_hf:
            self.actors.call("export_hf", str(self.run_dir / "hf"))
        return history

    def train_step(self, step: int) -> dict[str, float]:
        cfg, t = self.cfg, Timer()
        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        with t("rollout"):  # generation, tools and reward
            seed = derive_seed(cfg.seed, "step", step) if cfg.deterministic else None
            rollouts = asyncio.run(self.session.run(batch, self.log.transcript_path(step), progress=False,
                                                    seed=seed, uid_prefix=f"{step}:"))
        if self.release_engine_memory:
            with t("engine_memory"):
                self.engine_memory("release")  # the actor's turn on the shared GPUs
        with t("advantage_pack"):
            rows = build_rows(rollouts, cfg.advantage.eps, cfg.advantage.norm_by_std)
            # mini-batches split whole prompts (GRPO groups); rows stay in rollout order
            owner = [j // cfg.rollout.n_samples for j, ro in enumerate(rollouts) for _ in ro]
            per_prompt = [[r for r, o in zip(rows, owner) if o == i] for i in range(len(batch))]
            chunks = S.split_even(per_prompt, cfg.actor.mini_batches)
            packed = [pack_rows([r for group in c for r in group], cfg.actor.max_tokens_per_micro_batch,
                                cfg.actor.dp, pad_to_multiple=cfg.actor.tp) for c in chunks]
            self.actors.load_batch(packed)
        m = {**rollout_metrics(rollouts, rows), **S.prefixed("pack", packing_stats(packed[0]))}
        with t("old_logprobs"):
            m.update(S.parity_stats(self.actors.reported("old_logprobs", cfg.actor.recompute_old_logprobs)))
        if cfg.loss.kl_coef > 0:
            with t("ref_logprobs"):
                m.update(S.kl_stats(self.actors.reported("ref_logprobs")))
        with t("train"):
            counts = [sum(mb.num_loss_tokens for rank in p for mb in rank) for p in packed]
            m.update(S.train_stats(self.actors.call("train", counts), [i["reports"] for i in self.actors.info]))
        with t("sync"):
            self.engine_memory("resume", ["weights"])
            m.update(S.prefixed("sync", self.actors.call("sync_weights")[0]))
            self.engine_memory("resume", ["kv_cache"])
        if cfg.sync.parity_every and step % cfg.sync.parity_every == 0:
            with t("parity"):
                seqs = S.parity_sample(rows, cfg.sync.parity_rows)
                res = [r for r in self.actors.call("parity", seqs, self.services.engine_urls[0]) if r]
                m.update(S.prefixed("parity", res[0]))
        m.update(t)
        m["time/step_s"] = time.perf_counter() - t0
        m["throughput/train_tokens_per_s"] = sum(len(r) for r in rows) / max(t["time/train_s"], 1e-9)
        return m

    def engine_memory(self, action: str, tags: list[str] | None = None) -> None:
        """Colocated engines release their weights and KV cache after the rollout and take them back
        around the weight sync (SGLang memory saver, CUDA only: compat.engine_memory_release_supported);
        a no-op for engines on their own devices."""
        if not self.release_engine_memory:
            return
        from megatron_matpo.rollout.engine import EngineClient, EngineRouter

        async def run() -> None:
            router = EngineRouter([EngineClient(u) for u in self.services.engine_urls])
            try:
                await router.broadcast(f"{action}_memory", tags)
            finally:
                await router.aclose()

        asyncio.run(run())

    def evaluate(self) -> dict[str, float]:
        from megatron_matpo.data.parquet import read_dataset
        from megatron_matpo.rollout.evaluate import evaluate_traces

        e = self.cfg.eval
        out = {}
        for i, data in enumerate([e.data] if isinstance(e.data, str) else e.data):  # one or several val sets
            samples = list(read_dataset(data, limit=e.max_prompts))
            tag = f"eval{i}" if i else "eval"
            path = self.log.transcript_path(self.step, prefix=tag)
            asyncio.run(self.session.run(samples, path, progress=False, n_samples=e.n_samples, uid_prefix=f"{tag}:"))
            out.update({f"eval/{src}/{k}": v for src, mm in evaluate_traces(path).items() for k, v in mm.items()})
        return out

    def save(self) -> None:
        state = {"step": self.step, "data": self.loader.state_dict()}
        self.actors.call("save", str(self.run_dir), self.step, state, self.cfg.checkpoint.keep_last)


def train(cfg: TrainConfig, resume: bool = False) -> list[dict[str, float]]:
    with Trainer(cfg, resume) as t:
        return t.fit()
