"""`matpo sft`: oracle demonstrations through the real workflow, tools and chat template; supervised
fine-tuning of the Megatron actor on their assistant tokens, checked with transformers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_matpo.sft.config import SftConfig

REPO = Path(__file__).resolve().parents[1]


def _cfg(inputs: list[str], run_dir: Path, *extra: str) -> SftConfig:
    from megatron_matpo import config

    paths = dict(o.split("=", 1) for o in inputs)
    return config.load(SftConfig, REPO / "configs/sft_tiny_cpu.yaml", [
        f"run_dir={run_dir}", f"model={paths['model']}", f"data={paths['data']}", f"corpus={paths['corpus']}",
        f"exclude=[{paths['eval.data']}]", *extra]).validate()


@pytest.fixture(scope="module")
def demos(inputs, tmp_path_factory):
    from megatron_matpo.sft.demos import read_demonstrations, write_demonstrations

    out = {}
    styles = {"matpo": [], "single": [], "matpo-compact": ["prompt_style=compact", "num_results=2"]}
    for key, extra in styles.items():
        mode = key.split("-")[0]
        cfg = _cfg(inputs, tmp_path_factory.mktemp(f"sft-{key}"), f"mode={mode}", "max_demos=12", *extra)
        path = Path(cfg.run_dir) / "demos.jsonl"
        out[key] = (cfg, write_demonstrations(cfg, path, progress=False), read_demonstrations(path))
    return out


@pytest.mark.parametrize("mode", ["matpo", "single", "matpo-compact"])
def test_oracle_demonstrations_are_real_conversations(demos, mode):
    """Every question demonstrated, right (the real exact-match scorer) and in format (every call valid
    MCP-XML); the token ids are the chat template's rendering of the messages, trained exactly on what
    the agents wrote; workers searched, scraped and reported in the four sections."""
    from transformers import AutoTokenizer

    from megatron_matpo.agents.toolcall import format_score, parse_tool_calls
    from megatron_matpo.toolbox.specs import PLANNER_TOOLS, SINGLE_AGENT_TOOLS, WORKER_TOOLS

    cfg, stats, rows = demos[mode]
    assert stats.questions == 12 and stats.kept == 12 and not stats.dropped, stats.line()
    tok = AutoTokenizer.from_pretrained(cfg.model)
    roots = [r for r in rows if r["role"] != "worker"]
    assert len(roots) == 12 and all(r["accuracy"] == 1.0 for r in roots)
    for r in rows:
        tools = {"planner": PLANNER_TOOLS, "worker": WORKER_TOOLS, "single": SINGLE_AGENT_TOOLS}[r["role"]]
        said = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert format_score(said, tools) == 1.0 and r["finish"] == "answer", r["traj_id"]
        # the sequence is what the tokenizer's own template renders for these messages ...
        rendered = tok.apply_chat_template(r["messages"], tokenize=False)
        assert tok.decode(r["token_ids"], skip_special_tokens=False) == rendered.rstrip("\n"), r["traj_id"]
        # ... and the trained tokens are the assistant messages, each with its end-of-turn token
        trained = [t for t, m in zip(r["token_ids"], r["loss_mask"]) if m]
        assert tok.decode(trained, skip_special_tokens=False) == "".join(s + tok.eos_token for s in said)
    if mode.startswith("matpo"):
        workers = [r for r in rows if r["role"] == "worker"]
        assert len(workers) == sum(len(r["children"]) for r in roots) >= 2 * len(roots)
        for w in workers:
            calls = [c for m in w["messages"] if m["role"] == "assistant" for c in parse_tool_calls(m["content"]).calls]
            assert [c.tool for c in calls] == ["google_search", "scrape"], w["traj_id"]
            for section in ("## Conclusion", "## Supporting Information", "## Observations",
                            "## Contribution to Main Task"):
                assert section in w["final_text"]
        for r in roots:  # each subtask names the entity the previous report found
            subtasks = [c.arguments["subtask"] for m in r["messages"] if m["role"] == "assistant"
                        for c in parse_tool_calls(m["content"]).calls]
            reports = [m["content"] for m in r["messages"][2:] if m["role"] == "user"]
            for sub, prev in zip(subtasks[1:], reports):
                found = re.search(r"The answer to this subtask is (.+)\.$", prev).group(1)
                assert found in sub, (sub, prev)
            assert f"\\boxed{{{r['ground_truth']}}}" in r["final_text"]
    if mode.endswith("compact"):  # the embedded default's prompts and 2 search results
        from megatron_matpo.agents.prompts import system_prompt

        for r in rows:
            tools = {"planner": PLANNER_TOOLS, "worker": WORKER_TOOLS}[r["role"]]
            assert r["messages"][0]["content"] == system_prompt(r["role"], tools, "compact")
        found = [json.loads(m["content"]) for r in rows for m in r["messages"]
                 if m["role"] == "user" and m["content"].startswith('{"searchParameters"')]
        assert len(found) == len(workers) and all(len(f["organic"]) == 2 for f in found)


def test_bootstrap_sft_derives_the_job_from_the_run(tmp_path):
    """The embedded default's `bootstrap.sft`: the SFT job's run_dir is the parent of the run's `model`,
    its data (unless set), corpus, prompts, search results and agent limits are the run's, its eval set excluded;
    a model path that is not <run_dir>/hf or a missing base model is one error naming the field."""
    from megatron_matpo import config
    from megatron_matpo.config import ConfigError
    from megatron_matpo.train.bootstrap import sft_config
    from megatron_matpo.train.config import TrainConfig

    cfg = config.load(TrainConfig, REPO / "configs/tiny_sft_cpu.yaml", [f"run_dir={tmp_path}/run"]).validate()
    sft = sft_config(cfg)
    wf = cfg.rollout.workflow
    assert Path(sft.run_dir) / "hf" == Path(cfg.model) and sft.model == cfg.bootstrap.sft["model"]
    assert (sft.corpus, sft.exclude, sft.seed) == (cfg.corpus, [cfg.eval.data], cfg.seed)
    # the default fine-tunes on the train split and runs RL on the rl split (the config's own field wins)
    assert sft.data.endswith("/matpo_train_multihop") and cfg.data.endswith("/matpo_rl_multihop")
    unset = config.load(TrainConfig, REPO / "configs/tiny_sft_cpu.yaml", [f"run_dir={tmp_path}/run"])
    unset.bootstrap.sft = {k: v for k, v in unset.bootstrap.sft.items() if k != "data"}
    assert sft_config(unset).data == cfg.data  # unset: the run's own
    assert (sft.mode, sft.prompt_style, sft.num_results) == (wf.mode, "compact", cfg.rollout.toolbox.num_results)
    assert (sft.planner, sft.worker) == (wf.planner, wf.worker) and sft.export_hf
    assert sft.bootstrap.tiny_shape == cfg.bootstrap.tiny_shape and sft.bootstrap.sft is None
    assert sft.optim.lr == 5e-3 and sft.rows_per_step == 8  # the config's own fields win
    for override, match in (("model=elsewhere/model", "model: elsewhere/model must be <a run_dir>/hf"),
                            ("bootstrap.sft.model=", "bootstrap.sft.model: the HF directory"),
                            ("bootstrap.sft.epochs=0", "bootstrap.sft.epochs: must be >= 1")):
        bad = config.load(TrainConfig, REPO / "configs/tiny_sft_cpu.yaml", [f"run_dir={tmp_path}/run", override])
        with pytest.raises(ConfigError, match=re.escape(match)):
            sft_config(bad)
    assert sft_config(config.load(TrainConfig, REPO / "configs/tiny_cpu.yaml", [])) is None


def test_evaluation_questions_are_never_demonstrated(inputs, tmp_path):
    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.sft.demos import write_demonstrations

    train = dict(o.split("=", 1) for o in inputs)["data"]
    cfg = _cfg(inputs, tmp_path, f"exclude=[{train}]")  # exclude the very set it would demonstrate
    stats = write_demonstrations(cfg, tmp_path / "d.jsonl", progress=False)
    assert stats.excluded == len(read_dataset(train)) and stats.questions == 0 and stats.kept == 0


def test_sft_config_errors_name_the_field(inputs, tmp_path):
    from megatron_matpo.config import ConfigError

    for ov, why in ((["mode=both"], "mode: matpo | single, got 'both'"),
                    (["worker.max_context_tokens=9000"],
                     "worker.max_context_tokens: 9000 > actor.max_tokens_per_micro_batch"),
                    (["epochs=0"], "epochs: must be >= 1, got 0"),
                    (["optim.lr=-1"], "optim.lr: -1.0 must be >= 0")):
        with pytest.raises(ConfigError, match="^" + re.escape(why)):
            _cfg(inputs, tmp_path, *ov)
    from megatron_matpo.sft.train import SFT_DONE, run_sft

    used = tmp_path / "used"
    used.mkdir()
    (used / SFT_DONE).write_text("{}")
    with pytest.raises(ConfigError, match=f"^run_dir: {re.escape(str(used))} already holds an SFT run"):
        run_sft(_cfg(inputs, used))


def test_step_batches_cover_every_row_each_epoch():
    from megatron_matpo.sft.train import step_batches

    steps = step_batches(10, 4, 2, seed=3)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) == sorted(sum(steps[3:], []))
    assert steps[:3] != steps[3:] and steps == step_batches(10, 4, 2, seed=3)


@pytest.mark.slow
def test_sft_at_tp2_learns_the_demonstrations(inputs, tmp_path):
    """`matpo sft` end to end at TP=2: the loss falls, a training checkpoint is written, and the exported
    HF model puts more probability on the demonstrations' assistant tokens than the initial model did
    (measured with transformers, independently of Megatron's numbers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_matpo.cli import main
    from megatron_matpo.sft.demos import read_demonstrations
    from megatron_matpo.train.checkpoint import latest_checkpoint

    paths = dict(o.split("=", 1) for o in inputs)
    run = tmp_path / "run"
    rc = main(["sft", f"run_dir={run}", f"model={paths['model']}", f"data={paths['data']}",
               f"corpus={paths['corpus']}", f"exclude=[{paths['eval.data']}]", "actor.tp=2", "max_demos=8",
               "epochs=3", "rows_per_step=10"])
    assert rc == 0
    summary = json.loads((run / "sft.json").read_text())
    assert summary["demos"]["kept"] == 8 and summary["steps"] >= 6
    assert summary["last_loss"] < summary["first_loss"] - 0.5, summary
    assert latest_checkpoint(run) is not None

    def nll(model_dir: str) -> float:  # transformers' mean NLL over the assistant tokens
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tot = n = 0.0
        for r in read_demonstrations(run / "demos.jsonl"):
            ids, mask = torch.tensor([r["token_ids"]]), torch.tensor(r["loss_mask"][1:], dtype=torch.float32)
            with torch.no_grad():
                lp = torch.log_softmax(m(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            tot, n = tot - float((lp * mask).sum()), n + float(mask.sum())
        return tot / n

    before, after = nll(paths["model"]), nll(str(run / "hf"))
    assert after < before - 0.5, (before, after)


def test_eval_temperature_reaches_every_generation(inputs, tmp_path):
    """`eval.temperature` (MatpoTask.evaluate): every planner and worker turn of the eval rollouts is
    sampled at it (0: greedy), and without it at the workflow's own; the oracle writes the messages
    and records the sampling it was asked for, the tools and workflow are the real ones."""
    from transformers import AutoTokenizer

    from megatron_matpo.agents.workflow import WorkflowConfig
    from megatron_matpo.data.parquet import read_dataset
    from megatron_matpo.rollout.runner import RewardSection, RolloutConfig, RolloutSession, ToolboxSection
    from megatron_matpo.sft.oracle import OracleGenerator
    from megatron_matpo.train.tasks import MatpoTask

    paths = dict(o.split("=", 1) for o in inputs)
    samples = list(read_dataset(paths["eval.data"], limit=2))
    tok = AutoTokenizer.from_pretrained(paths["model"])
    seen: list[float] = []

    class Recording(OracleGenerator):
        async def generate(self, input_ids, sampling):
            seen.append(sampling["temperature"])
            return await super().generate(input_ids, sampling)

    rcfg = RolloutConfig(model=paths["model"], n_samples=1, toolbox=ToolboxSection(corpus=paths["corpus"]),
                         reward=RewardSection(scorer="exact_match"), workflow=WorkflowConfig(temperature=0.9))
    task = MatpoTask(RolloutSession(rcfg, tokenizer=tok, generator=Recording(samples, tok)).__enter__())
    try:
        got = task.evaluate(samples, tmp_path / "eval.jsonl", "eval", None, temperature=0.0)
        assert got["eval/multihop/accuracy"] == 1.0  # the oracle's answers, scored for real
        n_eval = len(seen)
        assert n_eval >= 2 * 4 and set(seen) == {0.0}  # planner and workers, every turn
        task.evaluate(samples, tmp_path / "eval2.jsonl", "eval", None)  # None: the workflow's own
        assert len(seen) == 2 * n_eval and set(seen[n_eval:]) == {0.9}
    finally:
        task.close()
