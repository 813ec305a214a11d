"""Demonstrations for SFT: the real workflow (prompts, chat template, MCP tool server over the offline
corpus, scoring) with the scripted oracle (sft/oracle.py) writing the agents' messages.

A demonstration is kept only when it is right by the same measures RL uses: the root's boxed answer is
scored correct, every trajectory's tool calls are valid MCP-XML (format score 1.0), no trajectory hit a
turn or context limit, and every worker report has the summary prompt's four sections. Questions of the
`exclude` sets (the evaluation sets) are never demonstrated. The file is a traces JSONL, one trajectory per
line as `matpo rollout` writes them, so `matpo transcript` shows it.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from megatron_matpo.agents.prompts import SUMMARY_SECTIONS
from megatron_matpo.agents.workflow import Trajectory, WorkflowConfig
from megatron_matpo.sft.config import SftConfig


@dataclass
class DemoStats:
    questions: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> questions
    rows: Counter = field(default_factory=Counter)  # role -> trajectories kept
    excluded: int = 0  # questions left out because an `exclude` set asks them

    def line(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.kept}/{self.questions} questions demonstrated ({dict(self.rows)} rows; "
                f"{self.excluded} excluded as evaluation questions; dropped: {drops})")


def problems(trajs: list[Trajectory]) -> list[str]:
    """Why a demonstration must not be trained on (empty: keep it)."""
    why = []
    root = trajs[0]
    if root.reward_components.get("accuracy") != 1.0:
        why.append("wrong answer")
    for t in trajs:
        if t.format_score != 1.0:
            why.append(f"{t.role} format {t.format_score:.2f}")
        if t.finish != "answer":
            why.append(f"{t.role} stopped by {t.finish}")
        if t.tool_errors:
            why.append(f"{t.role} tool errors")
        if t.role == "worker" and not all(heading in t.final_text for heading, _ in SUMMARY_SECTIONS):
            why.append("worker report without its four sections")
    return why


def excluded_questions(paths: list[str]) -> set[str]:
    from megatron_matpo.data.parquet import read_dataset

    return {s.question for p in paths for s in read_dataset(p)}


def write_demonstrations(cfg: SftConfig, out_path: str | Path, progress: bool = True) -> DemoStats:
    """Run the oracle over `cfg.data`'s questions (minus `cfg.exclude`'s) and write the kept ones."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.rollout.runner import RewardSection, RolloutConfig, RolloutSession, ToolboxSection, trace_line
    from megatron_matpo.sft.oracle import OracleGenerator, OracleMiss

    samples = list(read_dataset(cfg.data))
    stats = DemoStats()
    held_out = excluded_questions(cfg.exclude)
    stats.excluded = sum(s.question in held_out for s in samples)
    samples = [s for s in samples if s.question not in held_out][: cfg.max_demos]
    stats.questions = len(samples)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    rcfg = RolloutConfig(model=cfg.model, data=cfg.data, n_samples=1, max_concurrent=16,
                         toolbox=ToolboxSection(corpus=cfg.corpus, num_results=cfg.num_results),
                         reward=RewardSection(scorer="exact_match"),
                         workflow=WorkflowConfig(mode=cfg.mode, planner=cfg.planner, worker=cfg.worker,
                                                 prompt_style=cfg.prompt_style))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(samples), desc="demonstrations", unit="question", disable=not progress)
    kept: list[tuple[int, list[Trajectory]]] = []

    async def run_all(session) -> None:
        sem = asyncio.Semaphore(16)

        async def one(i: int, sample) -> None:
            # one session call per question: an OracleMiss drops that question, not the batch
            async with sem:
                try:
                    (trajs,) = await session.run([sample], progress=False, uid_prefix=f"demo{i}/")
                except OracleMiss as e:
                    stats.dropped[f"oracle: {e}"] += 1
                else:
                    why = problems(trajs)
                    if why:
                        stats.dropped[why[0]] += 1
                    else:
                        kept.append((i, trajs))
            bar.update(1)

        await asyncio.gather(*(one(i, s) for i, s in enumerate(samples)))

    try:
        with RolloutSession(rcfg, tokenizer=tok, generator=OracleGenerator(samples, tok, cfg.prompt_style)) as session:
            asyncio.run(run_all(session))
    finally:
        bar.close()
    with out.open("w") as f:
        for i, trajs in sorted(kept, key=lambda x: x[0]):
            for j, t in enumerate(trajs):
                f.write(json.dumps(trace_line(t, samples[i], 1.0 if j == 0 else None)) + "\n")
                stats.rows[t.role] += 1
    stats.kept = len(kept)
    return stats


def read_demonstrations(path: str | Path) -> list[dict]:
    """The trajectories of a demonstrations file (token ids, loss mask: the assistant tokens)."""
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    if not rows:
        raise ValueError(f"{path}: no demonstrations")
    for k, r in enumerate(rows):
        if len(r.get("token_ids") or []) != len(r.get("loss_mask") or []) or not sum(r["loss_mask"]):
            raise ValueError(f"{path}:{k + 1}: a demonstration needs token_ids and a loss_mask of the same length "
                             "with at least one trained (assistant) token")
    return rows
