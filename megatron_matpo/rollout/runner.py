"""Batch rollouts: dataset → agent workflows on the engines (tools over MCP) → rewards → JSONL.

Used by `matpo rollout` and, one step at a time, by the RL loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_matpo.agents.workflow import Trajectory, Workflow, WorkflowConfig, derive_seed
from megatron_matpo.data.schema import Sample
from megatron_matpo.reward import (AccuracyItem, ExactMatchScorer, JudgeConfig, LLMJudgeScorer, matpo_reward,
                                   single_agent_reward)
from megatron_matpo.toolbox.specs import SEARCH_SERVER


@dataclass
class EngineSection:
    num_engines: int = 1
    urls: list[str] = field(default_factory=list)  # use running SGLang servers instead of launching
    tp_size: int = 1
    mem_fraction_static: float = 0.05
    # the KV pool's size in tokens (SGLang --max-total-tokens; None: sized from free memory at start-up).
    # Fixed, it does not depend on what else is starting: the trainer then starts the actor ranks beside
    # the engines. Each engine still checks that the memory free at start-up, less mem_fraction_static of
    # it, is still free once its weights are loaded, so give it headroom (CPU configs: 0.5)
    max_total_tokens: int | None = None
    dtype: str = "auto"
    context_length: int | None = None
    # CPU engines: torch threads per engine; 0 = this machine's cores divided among the engines started
    cpu_threads: int = 0
    # CPU engines: SGLang's scheduler and detokenizer forked from the launching process (they inherit
    # its imports) instead of spawned (each imports SGLang again); see compat.sglang_fork_children
    fork_children: bool = True

    def __post_init__(self) -> None:
        if self.cpu_threads < 0:
            raise ValueError(f"rollout.engine.cpu_threads: {self.cpu_threads} must be >= 0 (0 = share the cores)")
        if self.max_total_tokens is not None and self.max_total_tokens <= 0:
            raise ValueError(f"rollout.engine.max_total_tokens: {self.max_total_tokens} must be > 0 (or null)")

    def threads_per_engine(self, engines: int) -> int:
        return self.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, engines))

    def engine_config(self, model_path: str, engines: int, log_dir: str | None, random_seed: int = 0,
                      extra_args: list[str] | None = None):
        """The EngineConfig of each of the `engines` engines started from this section (the one place
        it is built: `matpo rollout` and training alike)."""
        from megatron_matpo import platform
        from megatron_matpo.rollout.engine import EngineConfig

        return EngineConfig(model_path=model_path, device=platform.capabilities().device_type,
                            tp_size=self.tp_size, dtype=self.dtype,
                            mem_fraction_static=self.mem_fraction_static, max_total_tokens=self.max_total_tokens,
                            context_length=self.context_length,
                            random_seed=random_seed, log_dir=log_dir, cpu_threads=self.threads_per_engine(engines),
                            fork_children=self.fork_children, extra_args=list(extra_args or []))


@dataclass
class ToolboxSection:
    # the MCP tool server started with the job: "local" = BM25 over `corpus` (offline), "web" = Serper
    # search + page scraping (SERPER_API_KEY from the environment)
    backend: str = "local"
    corpus: str | None = None  # local BM25 backend over this corpus.jsonl (started in-process)
    url: str | None = None  # or an already running `search_and_scrape_webpage` MCP server
    timeout_s: float = 60.0
    injected_latency_s: float = 0.0
    noise: dict = field(default_factory=dict)  # NoiseConfig fields for the local server (robustness runs)
    num_results: int = 10  # results of a search that does not ask for a number (tiny models: fewer, shorter)


@dataclass
class RewardSection:
    scorer: str = "exact_match"  # exact_match | judge
    judge: dict = field(default_factory=dict)  # JudgeConfig fields (base_url/model/api_key default from env)


@dataclass
class RolloutConfig:
    model: str = ""  # HF directory: tokenizer and engine weights
    data: str = ""  # MATPO-data parquet file or directory
    n_samples: int = 8  # rollouts per prompt (the GRPO group)
    max_prompts: int | None = None
    max_concurrent: int = 64  # rollouts in flight
    log_dir: str | None = None
    engine: EngineSection = field(default_factory=EngineSection)
    toolbox: ToolboxSection = field(default_factory=ToolboxSection)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    reward: RewardSection = field(default_factory=RewardSection)


def make_scorer(cfg: RewardSection):
    if cfg.scorer == "exact_match":
        return ExactMatchScorer()
    if cfg.scorer == "judge":
        return LLMJudgeScorer(JudgeConfig(**cfg.judge))
    raise ValueError(f"reward.scorer={cfg.scorer!r}: expected 'exact_match' or 'judge'")


async def score(trajs: list[Trajectory], sample: Sample, scorer) -> float:
    """Accuracy of the root's final answer; reward on the root row (workers inherit at training)."""
    root, workers = trajs[0], trajs[1:]
    (acc,) = await scorer.score([AccuracyItem(sample.question, sample.ground_truth, root.final_text)])
    if root.role == "planner":
        r = matpo_reward(acc.score, root.format_score, [w.format_score for w in workers])
    else:
        r = single_agent_reward(acc.score, root.format_score)
    root.reward = r.total
    root.reward_components = r.metrics(prefix="")
    return acc.score


def trace_line(t: Trajectory, sample: Sample, accuracy: float | None) -> dict:
    d = t.to_json()
    d.update(question=sample.question, ground_truth=sample.ground_truth, data_source=sample.data_source,
             sample_group=sample.group)
    if accuracy is not None:
        d["accuracy"] = accuracy
    return d


def toolbox_server_config(tb: ToolboxSection, corpus: str | None = None) -> dict | None:
    """ToolboxConfig fields of the server to start with the job, or None (a `url` is given, or nothing to serve)."""
    if tb.url:
        return None
    if tb.backend == "web":
        return {"backend": "web", "port": 0, "noise": dict(tb.noise), "default_num_results": tb.num_results}
    if tb.backend != "local":
        raise ValueError(f"toolbox.backend: 'local' or 'web', got {tb.backend!r}")
    corpus = corpus or tb.corpus
    return ({"backend": "local", "corpus_path": corpus, "port": 0, "noise": dict(tb.noise),
             "default_num_results": tb.num_results} if corpus else None)


class RolloutSession:
    """Engines, tool server and workflow, started once and reused for many batches."""

    def __init__(self, cfg: RolloutConfig, tokenizer=None, generator=None):
        """`generator`: what writes the agents' messages instead of engines (none are started), e.g. the
        scripted oracle of sft/oracle.py; the tools, prompts, scoring and traces stay the real ones."""
        self.cfg = cfg
        self.tokenizer = tokenizer  # None: loaded from cfg.model on enter
        self.generator = generator
        self._stack = contextlib.ExitStack()
        self.servers = []

    def __enter__(self) -> "RolloutSession":
        from transformers import AutoTokenizer

        from megatron_matpo.rollout.engine import launch_engines

        cfg = self.cfg
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        urls = list(cfg.engine.urls)
        if not urls and self.generator is None:
            ecfg = cfg.engine.engine_config(cfg.model, cfg.engine.num_engines, cfg.log_dir)
            self.servers = launch_engines(ecfg, cfg.engine.num_engines)
            self._stack.callback(lambda: [s.stop() for s in self.servers])
            urls = [s.url for s in self.servers]
        self.engine_urls = urls
        tb = cfg.toolbox
        server = toolbox_server_config(tb)
        if tb.url:
            self.toolbox_url = tb.url
        elif server is not None:
            from megatron_matpo.toolbox.server import RunningServer, ToolboxConfig

            srv = self._stack.enter_context(RunningServer(ToolboxConfig(**server)))
            self.toolbox_url = srv.url
        else:
            raise ValueError("toolbox: set toolbox.corpus (local search), toolbox.backend=web, or toolbox.url "
                             "(a running MCP server)")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    async def run(self, samples: list[Sample], out_path: str | Path | None = None, progress: bool = True,
                  seed: int | None = None, uid_prefix: str = "", n_samples: int | None = None,
                  temperature: float | None = None) -> list[list[Trajectory]]:
        """`run_by_prompt`'s rollouts in one list, sample-major (sample 0's n_samples, then sample 1's, ...)."""
        by_prompt = await self.run_by_prompt(samples, out_path, progress, seed, uid_prefix, n_samples, temperature)
        return [r for group in by_prompt for r in group]

    async def run_by_prompt(self, samples: list[Sample], out_path: str | Path | None = None, progress: bool = True,
                            seed: int | None = None, uid_prefix: str = "", n_samples: int | None = None,
                            temperature: float | None = None) -> list[list[list[Trajectory]]]:
        """All rollouts of `samples` × n_samples: [sample][k] → that rollout's trajectories (root first),
        in input order (the GRPO groups). `seed` seeds each rollout's sampling when `workflow.seeded`;
        `uid_prefix` keeps trajectory ids unique when a batch holds the same sample twice; `temperature`
        replaces the workflow's (evaluation: 0 is greedy)."""
        from tqdm.auto import tqdm

        from megatron_matpo.rollout.engine import EngineClient, EngineRouter
        from megatron_matpo.toolbox.client import ToolClient

        cfg = self.cfg
        n_per = n_samples or cfg.n_samples
        router = self.generator or EngineRouter([EngineClient(u) for u in self.engine_urls])
        scorer = make_scorer(cfg.reward)
        sem = asyncio.Semaphore(cfg.max_concurrent)
        out = open(out_path, "w") if out_path else None
        results: list[list[list[Trajectory] | None]] = [[None] * n_per for _ in samples]
        acc_sum, done = 0.0, 0
        bar = tqdm(total=len(samples) * n_per, desc="rollouts", unit="rollout", disable=not progress)
        try:
            async with ToolClient({SEARCH_SERVER: self.toolbox_url}, timeout_s=cfg.toolbox.timeout_s,
                                  injected_latency_s=cfg.toolbox.injected_latency_s) as tools:
                wcfg = cfg.workflow if temperature is None else dataclasses.replace(cfg.workflow,
                                                                                     temperature=temperature)
                wf = Workflow(wcfg, router, tools, self.tokenizer)

                async def one(i: int, sample: Sample, k: int) -> None:
                    async with sem:
                        trajs = await wf.rollout(sample.question, f"{uid_prefix}{sample.uid}/{k}", sample.group,
                                                 seed=derive_seed(seed, sample.uid, k, i))
                    nonlocal acc_sum, done
                    acc = await score(trajs, sample, scorer)
                    acc_sum += acc
                    done += 1
                    results[i][k] = trajs
                    if out:
                        for j, t in enumerate(trajs):
                            out.write(json.dumps(trace_line(t, sample, acc if j == 0 else None)) + "\n")
                        out.flush()
                    bar.update(1)
                    bar.set_postfix(acc=f"{acc_sum / done:.3f}")

                await asyncio.gather(*(one(i, s, k) for i, s in enumerate(samples) for k in range(n_per)))
                self.tool_metrics = tools.metrics()
        finally:
            bar.close()
            await router.aclose()
            if out:
                out.close()
        return results  # type: ignore[return-value]  # every slot is filled once gather returns
