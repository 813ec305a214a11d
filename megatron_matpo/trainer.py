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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from megatron_matpo.agents.workflow import derive_seed
from megatron_matpo.config import ConfigError, redacted, to_dict
from megatron_matpo.data.loader import PromptLoader
from megatron_matpo.train.packing import Row, pack_rows, packing_stats, set_loss_weights
from megatron_matpo.train import preemption
from megatron_matpo.train import stats as S
from megatron_matpo.train.preemption import Preempted
from megatron_matpo.train.config import TrainConfig
from megatron_matpo.train.pipeline import ReadyRollout, refill, rollouts_for
from megatron_matpo.train.rows import apply_gae
from megatron_matpo.train.tasks import MatpoTask, RolloutTask
from megatron_matpo.orchestrate.bringup import policy_stacks

if TYPE_CHECKING:
    from megatron_matpo.orchestrate.bringup import Stack


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


def _quietly(name: str, close) -> None:
    """One teardown part: a failure is reported and the rest still runs (an error may be propagating)."""
    try:
        close()
    except Exception as e:
        print(f"warning: stopping {name} failed: {e!r}")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def make_task(cfg, models: list[str], engine_urls: list[list[str]], toolbox_url: str | None, tokenizer,
              log_dir: str, verifier_url: str | None = None) -> RolloutTask:
    """The task of `cfg.algorithm`, on the started engines (per policy) and tool server (and MAPoRL's
    served verifier): the one place the controller branches on the algorithm (train/tasks.py)."""
    if cfg.algorithm == "maporl":
        from megatron_matpo.maporl.task import MaporlRollout

        # the driver's tokenizer (of `cfg.model`) serves every policy on that model; others load theirs
        tokenizers = [tokenizer if m == cfg.model else load_tokenizer(m) for m in models]
        mp = cfg.maporl
        if verifier_url:
            v = mp.verifier
            mp = dataclasses.replace(mp, verifier=dataclasses.replace(v, reward_model={**v.reward_model,
                                                                                      "url": verifier_url}))
        return MaporlRollout(mp, tokenizers, engine_urls, cfg.rollout.n_samples, cfg.advantage.eps,
                             cfg.advantage.norm_by_std, cfg.deterministic, grpo=cfg.advantage.estimator != "gae",
                             merge_turns=cfg.loss.agg == "token-mean")
    from megatron_matpo.rollout.runner import RolloutSession

    ro = cfg.rollout
    rcfg = dataclasses.replace(ro, model=cfg.model, data=cfg.data, log_dir=log_dir,
                               workflow=dataclasses.replace(ro.workflow, seeded=cfg.deterministic),
                               engine=dataclasses.replace(ro.engine, urls=engine_urls[0]),
                               toolbox=dataclasses.replace(ro.toolbox, url=ro.toolbox.url or toolbox_url))
    session = RolloutSession(rcfg, tokenizer=tokenizer).__enter__()
    return MatpoTask(session, cfg.advantage.eps, cfg.advantage.norm_by_std)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from megatron_matpo.train.bootstrap import ensure_inputs, ensure_verifier
        from megatron_matpo.train.checkpoint import latest_checkpoint
        from megatron_matpo.train.preflight import preflight

        self.cfg = cfg.validate()
        self.bringup = Timer()
        with self.bringup("inputs"):
            ensure_inputs(cfg)  # bootstrap: the embedded default's own inputs, on first use
        preflight(cfg)  # what needs the inputs (model configs vs the layout, paths): before any process starts
        self.run_dir = Path(cfg.run_dir)
        preemption.install()  # SIGUSR1: checkpoint and stop at the next step boundary
        self.stacks = policy_stacks(cfg)  # one per policy (MAPoRL with distinct models: one per agent)
        self.resume_from = latest_checkpoint(self.stacks[0].root)
        if self.resume_from is not None and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints ({self.resume_from.name}); pass --resume to "
                              "continue that run or choose another run_dir")
        with self.bringup("verifier_training"):
            ensure_verifier(cfg)  # MAPoRL: the served verifier, trained first where the config says so
        self._teardown = ExitStack()
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
        """Inputs → Ray, engines, tool server, actor (critic) ranks (orchestrate/bringup.py) → restore a
        checkpoint → first weight sync → the algorithm's rollout task."""
        from megatron_matpo.compat import engine_memory_release_supported
        from megatron_matpo.data.parquet import read_dataset
        from megatron_matpo.orchestrate.bringup import Cluster
        from megatron_matpo.train.logger import RunLogger

        cfg, bt = self.cfg, self.bringup
        samples = list(read_dataset(cfg.data))
        if cfg.bootstrap.toy_answer is not None:
            samples = [dataclasses.replace(s, ground_truth=cfg.bootstrap.toy_answer) for s in samples]
        self.loader = PromptLoader(samples, cfg.prompts_per_step, cfg.seed)
        self.log = RunLogger(self.run_dir, wandb=cfg.logger.wandb, config=redacted(to_dict(cfg)))
        self._teardown.callback(_quietly, "log", self.log.close)
        self.cluster = Cluster()
        self._teardown.callback(_quietly, "cluster", self.cluster.close)  # also after a start that failed part way
        with ThreadPoolExecutor(max_workers=1) as pool:  # the driver's tokenizer (rollouts) loads meanwhile
            tok = pool.submit(bt.timed, "tokenizer", load_tokenizer, cfg.model)
            self.cluster.start(cfg, self.stacks, str(self.run_dir / "logs"), bt)
            tokenizer = tok.result()
        self.step = 0
        if self.resume_from is not None:
            with bt("resume"):  # checkpoint load
                self._resume()
        with bt("first_sync"):  # engines sample from the actor's weights from step 1 on (restored ones on a resume)
            for st in self.stacks:
                st.actors.sync_weights()
        with bt("rollout_session"):  # the algorithm's rollouts, on these engines (train/tasks.py)
            urls = [st.services.engine_urls for st in self.stacks]
            self.task = make_task(cfg, [st.model for st in self.stacks], urls, self.stacks[0].services.toolbox_url,
                                  tokenizer, str(self.run_dir / "logs"), self.stacks[0].services.verifier_url)
        self._teardown.callback(_quietly, "rollout task", self.task.close)
        self.verifier_check: dict[str, float] = {}
        if self.stacks[0].services.verifier_url:
            from megatron_matpo.verifier.train import served_parity

            with bt("verifier_parity"):  # the served copy scores as the trained model did
                self.verifier_check = served_parity(self.task.verifier, cfg.maporl.verifier.served_model())
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
        self._teardown.close()  # whatever was started, in reverse order (a failed start got only part of the way)

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        from megatron_matpo.train.summary import eval_line

        cfg, history, stop = self.cfg, [], preemption.STOP
        bring = {**self.bringup_report(), **self.verifier_check}
        print("bring-up: " + ", ".join(f"{k.split('/')[1][:-2]} {v:.1f}s" for k, v in bring.items()
                                       if k.startswith("bringup/")), flush=True)
        self.eval_at_start: dict[str, float] = {}
        if cfg.eval.at_start and self.step == 0:  # the starting weights' score, before any rollout of step 1
            self.eval_at_start = self.evaluate()
            self.log.log(0, self.eval_at_start)
            print(f"matpo train: before step 1: {eval_line(self.eval_at_start, self.eval_at_start, rise=False)}",
                  flush=True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        self.data_state = self.loader.state_dict()  # what a checkpoint stores as the data cursor (pipeline.py)
        self.rollouts = rollouts_for(cfg.async_.max_staleness, self._produce, version=self.step,
                                     first_step=self.step + 1, last_step=cfg.steps)
        self._teardown.callback(_quietly, "rollouts", self.rollouts.close)  # before the task and the engines
        while self.step < cfg.steps:
            if stop.is_set():  # the warning came during bring-up: nothing new to save
                raise Preempted(f"SIGUSR1 before step {self.step + 1}; the last checkpoint stands")
            self.step += 1
            m = self.train_step(self.step)
            m.update(bring)
            bring = {}  # reported once, with this process's first step
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                with self.rollouts.exclusive():  # the engines hold this step's weights; no rollout beside it
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

    def _produce(self, step: int, version: int) -> ReadyRollout:
        """Step `step`'s rollout on the engines' current weights (those after step `version`): generation,
        tools, reward and advantages (MAPoRL: also the verifier)."""
        cfg, t0 = self.cfg, time.perf_counter()
        ds = cfg.dynamic_sampling
        draws, extra = [], {}
        while True:  # one batch; with dynamic sampling, more until enough prompts carry a GRPO signal
            k = len(draws)
            seed = derive_seed(cfg.seed, "step", step, *([k] if k else [])) if cfg.deterministic else None
            path = self.log.transcript_path(step, prefix="step" if not k else f"step_draw{k}")
            draws.append(self.task.rollout(self.loader.next_batch(), path, f"{step}:" if not k else f"{step}.{k}:",
                                           seed))
            if not ds.enabled:
                break
            out, extra = refill(draws, cfg.prompts_per_step, cfg.actor.mini_batches)
            if extra["dynamic/kept_prompts"] >= cfg.prompts_per_step or len(draws) >= ds.max_draws:
                break
        out = draws[0] if not ds.enabled else dataclasses.replace(out, metrics={**out.metrics, **extra})
        return ReadyRollout(step, out, version, self.loader.state_dict(), time.perf_counter() - t0)

    def train_step(self, step: int) -> dict[str, float]:
        """rollout (ready, or waited for) → each policy's update → one weight sync of every engine."""
        t = Timer()
        t0 = time.perf_counter()
        with t("rollout"):  # the synchronous loop rolls out here; the asynchronous one waits, if at all
            r = self.rollouts.get(step)
        self.data_state = r.data_state
        if self.release_engine_memory:
            with t("engine_memory"):
                self.engine_memory("release")  # the actor's turn on the shared GPUs
        groups, m = r.out.groups, {**r.out.metrics, **r.metrics()}
        per_stack = [self.optimize(st, per_prompt, t) for st, per_prompt in zip(self.stacks, groups)]
        with t("sync"), self.rollouts.exclusive():  # no rollout in flight: every engine moves to this step's weights
            for st, sm in zip(self.stacks, per_stack):
                self.engine_memory("resume", ["weights"], st)
                sm.update(S.prefixed("sync", st.actors.sync_weights()))
                self.engine_memory("resume", ["kv_cache"], st)
            self.rollouts.synced(step)
        for st, per_prompt, sm in zip(self.stacks, groups, per_stack):
            if self.cfg.sync.parity_every and step % self.cfg.sync.parity_every == 0:
                with t("parity"):
                    seqs = S.parity_sample([row for p in per_prompt for row in p], self.cfg.sync.parity_rows)
                    sm.update(S.prefixed("parity", st.actors.parity(seqs, st.services.engine_urls[0])))
            m.update(sm if len(self.stacks) == 1 else {f"{st.name}/{k}": v for k, v in sm.items()})
        m.update(t)
        m["time/step_s"] = time.perf_counter() - t0
        tokens = sum(len(r) for g in groups for p in g for r in p)
        m["throughput/train_tokens_per_s"] = tokens / max(t["time/train_s"], 1e-9)
        return m

    def optimize(self, st: "Stack", per_prompt: list[list[Row]], t: Timer) -> dict[str, float]:
        """One policy's update on its rows: (critic values → GAE) → pack → old/ref logprobs → PPO (and the
        critic's value regression). The weight sync follows, for every policy at once (`train_step`)."""
        cfg, actors, m = self.cfg, st.actors, {}
        if st.critic is not None:
            with t("values"):
                rows, a = [r for p in per_prompt for r in p], cfg.actor
                st.critic.load_batch([pack_rows(rows, a.max_tokens_per_micro_batch, a.dp, pad_to_multiple=a.tp,
                                                   cp_size=a.cp)])
                values = st.critic.values()
                ad = cfg.advantage
                m.update(apply_gae(rows, values, ad.gamma, ad.lam, ad.whiten))
        with t("advantage_pack"):
            # mini-batches split whole prompts (GRPO groups)
            minis = [[r for group in c for r in group] for c in S.split_even(per_prompt, cfg.actor.mini_batches)]
            if cfg.loss.agg != "token-mean":  # token-mean divides by each mini-batch's global token count instead
                for mini in minis:
                    set_loss_weights(mini, cfg.loss.agg)
            packed = [pack_rows(mini, cfg.actor.max_tokens_per_micro_batch, cfg.actor.dp,
                                pad_to_multiple=cfg.actor.tp, cp_size=cfg.actor.cp) for mini in minis]
            actors.load_batch(packed)
        m.update(S.prefixed("pack", packing_stats(packed[0])))
        # one on-policy update: its own forward gives the old logprobs (and the parity with the engine). A KL
        # term needs only the reference's logprobs, and the update's forward measures it (`actor/kl`)
        fused = len(packed) == 1 and cfg.actor.recompute_old_logprobs
        if not fused:
            with t("old_logprobs"):
                m.update(S.parity_stats(actors.old_logprobs(cfg.actor.recompute_old_logprobs)))
        if cfg.loss.kl_coef > 0:
            with t("ref_logprobs"):
                kl = S.kl_stats(actors.ref_logprobs())
            # against the batch's old logprobs: the actor's, unless fused (then the engine's, whose constrained
            # tokens carry the masked distribution's logprobs: not the policy's)
            m.update({} if fused else kl)
        with t("train"):
            # per mini-batch: its loss tokens over all DP ranks, the token-mean's denominator
            global_token_counts = [sum(mb.num_loss_tokens for rank in p for mb in rank) for p in packed]
            per_rank, reports = actors.train(global_token_counts, fused), actors.reports
            m.update(S.train_stats(per_rank, reports))
            if fused and "actor/kl" in m:
                m["actor/ref_kl"] = m["actor/kl"]  # the pre-update policy's KL to the reference, its own forward
            if fused:
                m.update(S.parity_stats([{**s, "tokens": s["parity_tokens"]} for rank, r in zip(per_rank, reports)
                                         if r for s in rank if "parity_tokens" in s]))
        if st.critic is not None:
            with t("critic_train"):
                st.critic.load_batch(packed)
                m.update(S.critic_stats(st.critic.train(global_token_counts), st.critic.reports))
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

        e = self.cfg.eval
        out = {}
        for i, data in enumerate([e.data] if isinstance(e.data, str) else e.data):  # one or several val sets
            samples = list(read_dataset(data, limit=e.max_prompts))
            tag = f"eval{i}" if i else "eval"
            out.update(self.task.evaluate(samples, self.log.transcript_path(self.step, prefix=tag), tag, e.n_samples,
                                          e.temperature))
        return out

    def save(self) -> None:
        state = {"step": self.step, "data": self.data_state}  # the cursor after this step's own batch
        for st in self.stacks:
            st.actors.save(str(st.root), self.step, state, self.cfg.checkpoint.keep_last)
            if st.critic is not None:
                st.critic.save(str(st.root / "critic"), self.step, state, self.cfg.checkpoint.keep_last)


def train(cfg: TrainConfig, resume: bool = False) -> list[dict[str, float]]:
    with Trainer(cfg, resume) as t:
        return t.fit()
