"""The RL controller: one process drives the loop of ../shared/DESIGN.md.

  rollout (engines + tools) → reward → advantage (workers inherit) → pack → old/ref logprobs →
  train (PPO) → sync weights into the engines (+ parity check) → log, checkpoint, eval → next step
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

from megatron_matpo.agents.workflow import derive_seed
from megatron_matpo.config import ConfigError, redacted, to_dict
from megatron_matpo.data.loader import PromptLoader
from megatron_matpo.data.packing import Row, pack_rows, packing_stats
from megatron_matpo.train import preemption
from megatron_matpo.train import stats as S
from megatron_matpo.train.preemption import Preempted
from megatron_matpo.train.config import TrainConfig
from megatron_matpo.train.rows import apply_gae, build_rows, rollout_metrics


class Timer(dict):
    """Seconds per named part (`time/<name>_s`), summed over repeats."""

    _lock = threading.Lock()  # bring-up parts are timed from several threads

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self[f"time/{name}_s"] = self.get(f"time/{name}_s", 0.0) + time.perf_counter() - t0

    def timed(self, name: str, fn, *args, **kwargs):
        with self(name):
            return fn(*args, **kwargs)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


@dataclasses.dataclass
class Stack:
    """One policy: the engines that sample from it and its Megatron actor ranks (MATPO and shared-model
    MAPoRL have one; MAPoRL with distinct models one per agent)."""
    name: str
    services: "Services | None"
    root: Path  # its checkpoints/ and hf/ live here
    actors: "ActorGroup | None" = None
    critic: "ActorGroup | None" = None  # advantage.estimator=gae: its value model (checkpoints in root/critic)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from megatron_matpo.train.bootstrap import ensure_inputs
        from megatron_matpo.train.checkpoint import latest_checkpoint
        from megatron_matpo.train.preflight import preflight

        self.cfg = cfg.validate()
        self.bringup = Timer()
        with self.bringup("inputs"):
            ensure_inputs(cfg)  # bootstrap: the embedded default's own inputs, on first use
        preflight(cfg)  # what needs the inputs (model configs vs the layout, paths): before any process starts
        self.run_dir = Path(cfg.run_dir)
        preemption.install()  # SIGUSR1: checkpoint and stop at the next step boundary
        # one policy per stack (MAPoRL with distinct models: one per agent), each checkpointed on its own
        n = cfg.maporl.stacks if cfg.algorithm == "maporl" else 1
        self.names = ["actor"] if n == 1 else [f"agent{k}" for k in range(n)]
        self.roots = [self.run_dir] if n == 1 else [self.run_dir / name for name in self.names]
        self.resume_from = latest_checkpoint(self.roots[0])
        if self.resume_from is not None and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints ({self.resume_from.name}); pass --resume to "
                              "continue that run or choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False))

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
        from megatron_matpo.rollout.runner import RolloutSession, toolbox_server_config
        from megatron_matpo.train.logger import RunLogger
        from megatron_matpo.train.worker import WorkerSpec

        cfg, bt = self.cfg, self.bringup
        samples = list(read_dataset(cfg.data))
        if cfg.bootstrap.toy_answer is not None:
            samples = [dataclasses.replace(s, ground_truth=cfg.bootstrap.toy_answer) for s in samples]
        self.loader = PromptLoader(samples, cfg.prompts_per_step, cfg.seed)
        self.log = RunLogger(self.run_dir)

        layout, ro = cfg.actor.layout, cfg.rollout
        n_eng, eng_tp, world, n = ro.engine.num_engines, ro.engine.tp_size, layout.world_size, len(self.names)
        maporl, gae = cfg.algorithm == "maporl", cfg.advantage.estimator == "gae"
        ranks = world * (2 if gae else 1)  # actor ranks, then the critic's
        tools = None if maporl else toolbox_server_config(ro.toolbox, cfg.corpus)
        gpu = gpus_per_rank()
        with bt("ray"):
            start_ray(cfg.orchestrate, needed_cpus=n * (ranks + n_eng) + 1)
        # per stack: a bundle per actor (and critic) rank, then one per engine (its TP GPUs); stack 0 adds one for
        # the tool server; colocated engines share the actor's GPUs instead of bringing their own
        eng_gpus = 0.0 if cfg.orchestrate.colocate else gpu * eng_tp
        rank_b = {"CPU": 1, **({"GPU": gpu} if gpu else {})}
        eng_b = {"CPU": 1, **({"GPU": eng_gpus} if eng_gpus else {})}
        sizes = [ranks + n_eng + (k == 0 and tools is not None) for k in range(n)]
        bundles = [b for k in range(n)
                   for b in [rank_b] * ranks + [eng_b] * n_eng + [{"CPU": 1}] * (sizes[k] - ranks - n_eng)]
        with bt("placement"):
            self.pg = placement_group(bundles, cfg.orchestrate.placement_timeout_s, "matpo")
        where = placement_nodes(self.pg)
        print(f"placement: {len(bundles)} bundles on {len(set(where))} Ray node(s): actor ranks on "
              f"{sorted(set(where[:ranks]))}, engines/tools on {sorted(set(where[ranks:sizes[0]]))}", flush=True)
        # seeded, batch-invariant sampling; cached prefixes would change numerics
        extra = ["--enable-deterministic-inference", "--disable-radix-cache"] if cfg.deterministic else []
        if cfg.orchestrate.colocate and engine_memory_release_supported():
            extra.append("--enable-memory-saver")  # engines give the GPU back while the actor trains
        self.models = [cfg.maporl.model_of(k, cfg.model) if maporl else cfg.model for k in range(n)]
        # Engines first, one stack after another: on CPU an SGLang engine sizes its KV cache from the host
        # memory free while it profiles, and processes starting beside it (other engines, actor ranks)
        # made that fail ("Loaded weights leave no GPU memory for the KV cache", 2 stacks on 2 cores).
        # Then every stack's actor (and critic) ranks together. The driver's tokenizer loads meanwhile.
        self.stacks = [Stack(self.names[k], None, self.roots[k]) for k in range(n)]
        offsets = [sum(sizes[:k]) for k in range(n)]
        with ThreadPoolExecutor(max_workers=2 * n + 1) as pool:
            tok = None if maporl else pool.submit(bt.timed, "tokenizer", load_tokenizer, cfg.model)
            for k, off in enumerate(offsets):
                ecfg = ro.engine.engine_config(self.models[k], n * n_eng, str(self.run_dir / "logs"), cfg.seed, extra)
                with bt("engines_tools"):
                    self.stacks[k].services = Services(ecfg, n_eng, tools if k == 0 else None, self.pg, off + ranks,
                                                       eng_gpus)
            parts: dict[tuple[int, str], object] = {}
            with bt("ranks"):
                for k, off in enumerate(offsets):
                    spec = WorkerSpec(model=self.models[k], layout=layout, dtype=cfg.resolved_dtype(),
                                      seq_length=cfg.actor.max_tokens_per_micro_batch, recompute=cfg.actor.recompute,
                                      optim=cfg.optim, loss=cfg.loss,
                                      sync=cfg.sync,
                                      use_reference=cfg.loss.kl_coef > 0, seed=cfg.actor.seed,
                                      total_steps=cfg.steps * cfg.actor.mini_batches)
                    parts[k, "actors"] = pool.submit(ActorGroup, spec, self.pg, off, gpu)
                    if gae:  # same layout and packing, its own optimizer; no engines, no reference
                        cspec = dataclasses.replace(spec, model=cfg.critic.model or self.models[k],
                                                    optim=cfg.critic.optim, sync=None, use_reference=False)
                        parts[k, "critic"] = pool.submit(ActorGroup, cspec, self.pg, off + world, gpu, kind="critic")
                errors = []
                for (k, attr), fut in parts.items():  # every group is kept, so a failed start tears all down
                    try:
                        setattr(self.stacks[k], attr, fut.result())
                    except BaseException as e:
                        errors.append(e)
                if errors:
                    raise errors[0]
            tokenizer = tok.result() if tok is not None else None  # the driver's, for MATPO rollouts
        for st in self.stacks:
            print(f"{st.name} engines: {st.services.engine_urls}; tool server: "
                  f"{st.services.toolbox_url or ro.toolbox.url}", flush=True)
            with bt("connect_engines"):
                st.actors.connect_engines(st.services.engine_urls)

        self.step = 0
        if self.resume_from is not None:
            with bt("resume"):  # checkpoint load
                self._resume()
        with bt("first_sync"):  # engines sample from the actor's weights from step 1 on (restored ones on a resume)
            for st in self.stacks:
                st.actors.sync_weights()

        if maporl:
            from megatron_matpo.maporl.task import MaporlRollout

            self.maporl = MaporlRollout(cfg.maporl, self.models, [st.services.engine_urls for st in self.stacks],
                                        ro.n_samples, cfg.advantage.eps, cfg.advantage.norm_by_std, cfg.deterministic,
                                        grpo=not gae, merge_turns=cfg.loss.agg == "token-mean")
        else:
            urls, tool_url = self.stacks[0].services.engine_urls, ro.toolbox.url or self.stacks[0].services.toolbox_url
            rcfg = dataclasses.replace(ro, model=cfg.model, data=cfg.data, log_dir=str(self.run_dir / "logs"),
                                       workflow=dataclasses.replace(ro.workflow, seeded=cfg.deterministic),
                                       engine=dataclasses.replace(ro.engine, urls=urls),
                                       toolbox=dataclasses.replace(ro.toolbox, url=tool_url))
            with bt("rollout_session"):
                self.session = RolloutSession(rcfg, tokenizer=tokenizer).__enter__()
        self.release_engine_memory = cfg.orchestrate.colocate and engine_memory_release_supported()
        return self

    def _resume(self) -> None:
        from megatron_matpo.train.checkpoint import latest_checkpoint

        for st in self.stacks:
            ckpt = latest_checkpoint(st.root)
            state = st.actors.load(str(ckpt))
            if int(state["step"]) != int(self.step or state["step"]):
                raise RuntimeError(f"{st.name}'s latest checkpoint {ckpt} is not at step {self.step}")
            self.step = int(state["step"])
            if st.critic is not None:
                cckpt = latest_checkpoint(st.root / "critic")
                if cckpt is None:
                    raise ConfigError(f"{st.root / 'critic'} holds no critic checkpoint: this run was not "
                                      "trained with advantage.estimator=gae, which cannot be switched on a resume")
                st.critic.load(str(cckpt))
        self.loader.load_state_dict(state["data"])
        self.log.truncate_after(self.step)
        print(f"resumed from {self.resume_from} at step {self.step}")

    def __exit__(self, *exc) -> None:
        from megatron_matpo.orchestrate.cluster import stop_ray

        try:
            # whatever was started, in reverse order (a failed start got only part of the way)
            parts = [("session", getattr(self, "session", None), lambda o: o.__exit__(None, None, None))]
            for st in getattr(self, "stacks", []):
                parts += [(f"{st.name} actors", st.actors, lambda o: o.shutdown()),
                          (f"{st.name} critic", st.critic, lambda o: o.shutdown()),
                          (f"{st.name} engines", st.services, lambda o: o.stop())]
            for name, obj, close in parts + [("log", getattr(self, "log", None), lambda o: o.close())]:
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
        bring = self.bringup_report()
        print("bring-up: " + ", ".join(f"{k.split('/')[1][:-2]} {v:.1f}s" for k, v in bring.items()), flush=True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        while self.step < cfg.steps:
            if stop.is_set():  # the warning came during bring-up: nothing new to save
                raise Preempted(f"SIGUSR1 before step {self.step + 1}; the last checkpoint stands")
            self.step += 1
            m = self.train_step(self.step)
            m.update(bring)
            bring = {}  # reported once, with this process's first step
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
                            **({"workers": f"{m['planner/workers_per_planner']:.1f}"}
                               if "planner/workers_per_planner" in m else {}))
        bar.close()
        if cfg.checkpoint.export_hf:
            for st in self.stacks:
                st.actors.export_hf(str(st.root / "hf"))
        return history

    def bringup_report(self) -> dict[str, float]:
        """Each bring-up part's seconds and `bringup/total_s`: this process's start to now (the first
        rollout request follows at once)."""
        import psutil

        out = {k.replace("time/", "bringup/"): v for k, v in self.bringup.items()}
        out["bringup/total_s"] = time.time() - psutil.Process().create_time()
        return out

    def train_step(self, step: int) -> dict[str, float]:
        cfg, t = self.cfg, Timer()
        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        seed = derive_seed(cfg.seed, "step", step) if cfg.deterministic else None
        with t("rollout"):  # generation, tools and reward (MAPoRL: also verifier and advantages)
            if cfg.algorithm == "maporl":
                groups, m = self.maporl.run(batch, self.log.transcript_path(step), f"{step}:", seed)
            else:
                rollouts = asyncio.run(self.session.run(batch, self.log.transcript_path(step), progress=False,
                                                        seed=seed, uid_prefix=f"{step}:"))
        if self.release_engine_memory:
            with t("engine_memory"):
                self.engine_memory("release")  # the actor's turn on the shared GPUs
        if cfg.algorithm != "maporl":
            with t("advantage_pack"):
                rows = build_rows(rollouts, cfg.advantage.eps, cfg.advantage.norm_by_std)
                # rows grouped by prompt (GRPO groups), in rollout order
                owner = [j // cfg.rollout.n_samples for j, ro in enumerate(rollouts) for _ in ro]
                groups = [[[r for r, o in zip(rows, owner) if o == i] for i in range(len(batch))]]
            m = rollout_metrics(rollouts, rows)
        for st, per_prompt in zip(self.stacks, groups):
            sm = self.optimize(st, per_prompt, step, t)
            m.update(sm if len(self.stacks) == 1 else {f"{st.name}/{k}": v for k, v in sm.items()})
        m.update(t)
        m["time/step_s"] = time.perf_counter() - t0
        tokens = sum(len(r) for g in groups for p in g for r in p)
        m["throughput/train_tokens_per_s"] = tokens / max(t["time/train_s"], 1e-9)
        return m

    def optimize(self, st: "Stack", per_prompt: list[list[Row]], step: int, t: Timer) -> dict[str, float]:
        """One policy's update on its rows: (critic values → GAE) → pack → old/ref logprobs → PPO (and the
        critic's value regression) → sync into its engines → engine-vs-actor parity."""
        cfg, actors, m = self.cfg, st.actors, {}
        if st.critic is not None:
            with t("values"):
                rows, a = [r for p in per_prompt for r in p], cfg.actor
                st.critic.load_batch([pack_rows(rows, a.max_tokens_per_micro_batch, a.dp, pad_to_multiple=a.tp)])
                values = st.critic.values()
                ad = cfg.advantage
                m.update(apply_gae(rows, values, ad.gamma, ad.lam, ad.whiten))
        with t("advantage_pack"):
            # mini-batches split whole prompts (GRPO groups)
            chunks = S.split_even(per_prompt, cfg.actor.mini_batches)
            packed = [pack_rows([r for group in c for r in group], cfg.actor.max_tokens_per_micro_batch,
                                cfg.actor.dp, pad_to_multiple=cfg.actor.tp) for c in chunks]
            actors.load_batch(packed)
        m.update(S.prefixed("pack", packing_stats(packed[0])))
        # one on-policy update: its own forward gives the old logprobs (and the parity with the engine)
        fused = len(packed) == 1 and cfg.actor.recompute_old_logprobs and cfg.loss.kl_coef == 0
        if not fused:
            with t("old_logprobs"):
                m.update(S.parity_stats(actors.old_logprobs(cfg.actor.recompute_old_logprobs)))
        if cfg.loss.kl_coef > 0:
            with t("ref_logprobs"):
                m.update(S.kl_stats(actors.ref_logprobs()))
        with t("train"):
            counts = [sum(mb.num_loss_tokens for rank in p for mb in rank) for p in packed]
            per_rank, reports = actors.train(counts, fused), actors.reports
            m.update(S.train_stats(per_rank, reports))
            if fused:
                m.update(S.parity_stats([{**s, "tokens": s["parity_tokens"]} for rank, r in zip(per_rank, reports)
                                         if r for s in rank if "parity_tokens" in s]))
        if st.critic is not None:
            with t("critic_train"):
                st.critic.load_batch(packed)
                m.update(S.critic_stats(st.critic.train(counts), st.critic.reports))
        with t("sync"):
            self.engine_memory("resume", ["weights"], st)
            m.update(S.prefixed("sync", actors.sync_weights()))
            self.engine_memory("resume", ["kv_cache"], st)
        if cfg.sync.parity_every and step % cfg.sync.parity_every == 0:
            with t("parity"):
                seqs = S.parity_sample([r for p in per_prompt for r in p], cfg.sync.parity_rows)
                m.update(S.prefixed("parity", actors.parity(seqs, st.services.engine_urls[0])))
        return m

    def engine_memory(self, action: str, tags: list[str] | None = None, stack: "Stack | None" = None) -> None:
        """Colocated engines release their weights and KV cache after the rollout and take them back
        around the weight sync (SGLang memory saver, CUDA only: compat.engine_memory_release_supported);
        a no-op for engines on their own devices."""
        if not self.release_engine_memory:
            return
        from megatron_matpo.rollout.engine import EngineClient, EngineRouter

        async def run() -> None:
            urls = [u for st in ([stack] if stack else self.stacks) for u in st.services.engine_urls]
            router = EngineRouter([EngineClient(u) for u in urls])
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
            if self.cfg.algorithm == "maporl":  # discussions on the val questions: accuracy per agent and round
                for src in sorted({s.data_source for s in samples}):
                    part = [s for s in samples if s.data_source == src]
                    _, mm = self.maporl.run(part, path.with_name(f"{path.stem}_{src}{path.suffix}"),
                                            f"{tag}:", n_samples=e.n_samples)
                    out.update({f"eval/{src}/{k}": v for k, v in mm.items()
                                if k.startswith(("maporl/accuracy", "maporl/consensus", "reward/"))})
                continue
            asyncio.run(self.session.run(samples, path, progress=False, n_samples=e.n_samples, uid_prefix=f"{tag}:"))
            out.update({f"eval/{src}/{k}": v for src, mm in evaluate_traces(path).items() for k, v in mm.items()})
        return out

    def save(self) -> None:
        state = {"step": self.step, "data": self.loader.state_dict()}
        for st in self.stacks:
            st.actors.save(str(st.root), self.step, state, self.cfg.checkpoint.keep_last)
            if st.critic is not None:
                st.critic.save(str(st.root / "critic"), self.step, state, self.cfg.checkpoint.keep_last)


def train(cfg: TrainConfig, resume: bool = False) -> list[dict[str, float]]:
    with Trainer(cfg, resume) as t:
        return t.fit()
