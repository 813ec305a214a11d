"""MAPoRL co-training end to end through `matpo train` (algorithm=maporl): two agents discuss for three
rounds on real SGLang engines, a verifier scores every answer, influence-aware rewards with
incentives, PPO on Megatron actors, weights synced into the engines. Two worlds, both on the
learnable toy, where the final-round accuracy must rise: MAPoRL as published
(configs/maporl_verifier_tiny_cpu.yaml: a verifier trained first on the initial policy's answers, at
PP=2, served on its own engine, its scores the reward and shown to the agents) with distinct models (an
actor + engine per agent) and GRPO per (question, agent, round), rolled out one step ahead of training
(async.max_staleness=1); and one shared model scored by exact match with its Megatron critic (PPO +
GAE), SIGKILLed after its step-5 checkpoint and resumed, on which the discussion's structure, eval
and the HF export are checked too."""
from __future__ import annotations

import json

import pytest

from tests.e2e import (REPO, assert_engines_gone, assert_quiet_console, kill_tree, metrics, rollouts, start, train,
                       wait_for, wandb_history)

pytestmark = pytest.mark.slow
AGENTS, ROUNDS = 2, 3


@pytest.fixture(scope="session")
def maporl_inputs(tmp_path_factory) -> list[str]:
    """A tiny model + the arithmetic word problems, bootstrapped once for both runs."""
    from megatron_matpo import config
    from megatron_matpo.train.bootstrap import ensure_inputs
    from megatron_matpo.train.config import TrainConfig

    root = tmp_path_factory.mktemp("maporl-inputs")
    ov = [f"model={root}/tiny-qwen3", f"data={root}/arithmetic/maporl_train_arithmetic"]
    ensure_inputs(config.load(TrainConfig, REPO / "configs/maporl_tiny_cpu.yaml", ov))
    return ov


def test_distinct_models_learn_the_toy_with_a_trained_verifier(maporl_inputs, tmp_path):
    """configs/maporl_verifier_tiny_cpu.yaml: first `matpo train-verifier` (bootstrap) samples discussions
    of the initial policy, labels the answers by the gold answer (every gold answer is 3, every turn a
    constrained `\\boxed{<digit>}`), and trains a score-head model at PP=2 that must separate right from
    wrong on held-out questions; the trainer serves its HF export on an SGLang engine whose scores must
    equal the trained model's. Then an actor and an engine per agent, the served verifier's probability as
    the score of every answer (and shown to the agents, in words), and the final-round gold accuracy must
    rise. Asynchronously (async.max_staleness=1): each step's discussions are rolled out while the step
    before trains, on the weights from two steps back; with dynamic sampling, questions whose
    discussions all scored alike are dropped and more rolled out."""
    run = tmp_path / "run"
    out = train("configs/maporl_verifier_tiny_cpu.yaml", run, maporl_inputs + [
        f"maporl.verifier.reward_model.model_path={run}/verifier/hf",
        "async.max_staleness=1", "dynamic_sampling.enabled=true", "dynamic_sampling.max_draws=2",
        "logger.wandb.enabled=true"])  # offline: files under run_dir/wandb
    m = metrics(run)
    steps = sorted(m)
    assert steps == list(range(1, 11)), out[-3000:]
    assert_quiet_console(out)
    # the verifier: trained before the run on the initial policy's answers, held-out AUC from 0.5 (a zero head
    # scores every answer alike) to near 1; its export served with the same scores
    ver = json.loads((run / "verifier" / "verifier.json").read_text())
    before, after = ver["before"], ver["after"]
    print("verifier:", ver["data"], "held out before", before, "after", after)
    assert before["verifier/heldout_auc"] == 0.5 and after["verifier/heldout_auc"] >= 0.9, ver
    assert after["verifier/heldout_accuracy"] >= 0.8 and after["verifier/heldout_bce"] < before["verifier/heldout_bce"]
    assert ver["data"]["right"] > 0 and ver["data"]["train"] > 0 and ver["data"]["heldout_questions"] >= 1
    vcfg = (run / "verifier" / "config.yaml").read_text()
    assert "pp: 2" in vcfg and list((run / "verifier" / "tensorboard").glob("events.out.tfevents.*"))
    assert m[1]["verifier/served_rows"] == ver["data"]["heldout"] and m[1]["verifier/served_ids_differ"] == 0
    assert m[1]["verifier/served_max_abs_diff"] <= 1e-4, m[1]["verifier/served_max_abs_diff"]
    import torch
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(run / "verifier" / "hf", dtype=torch.float32).eval()
    held = [json.loads(x) for x in (run / "verifier" / "heldout_scores.jsonl").read_text().splitlines()]
    with torch.no_grad():  # transformers on the export: the scores the PP=2 Megatron model recorded
        diff = max(abs(hf(torch.tensor([r["input_ids"]])).logits.item() - r["score"]) for r in held)
    assert diff <= 1e-4, diff
    assert "bringup/verifier_training_s" in m[1] and "bringup/verifier_parity_s" in m[1]
    # on the live answers too it separates right from wrong (the answers of a step are never all right here)
    live = [m[s]["verifier/auc"] for s in steps if "verifier/auc" in m[s]]
    print("verifier AUC on each step's answers:", [round(a, 3) for a in live])
    assert len(live) >= 5 and min(live) >= 0.8, live
    assert all(m[s]["verifier/rm_scored"] > 0 and m[s]["verifier/rm_retries"] == 0 for s in steps)
    # wandb got every step's scalars, as metrics.jsonl has them, and the run's redacted config
    history, wb_config = wandb_history(run)
    assert history == {s: {k: v for k, v in m[s].items() if k not in ("step", "time")} for s in steps}
    assert wb_config["algorithm"] == "maporl" and wb_config["async"]["max_staleness"] == 1
    for s in steps:  # a second batch was rolled out exactly when the first left fewer than 4 informative questions
        d = m[s]
        assert 0.0 <= d["dynamic/dropped_fraction"] <= 1.0 and 1 <= d["dynamic/kept_prompts"] <= PROMPTS, d
        assert (d["dynamic/draws"] == 2) == (run / "rollouts" / f"step_draw1_{s:06d}.jsonl").exists(), s
        assert d["dynamic/draws"] == 2 or d["dynamic/dropped_fraction"] == 0.0, d
        assert d["dynamic/draws"] == 1 or d["dynamic/dropped_fraction"] > 0.0, d
    print("dropped fraction per step:", [round(m[s]["dynamic/dropped_fraction"], 3) for s in steps],
          "kept:", [int(m[s]["dynamic/kept_prompts"]) for s in steps])
    # one policy version behind from step 2 on: both engines synced together, between rollouts
    assert [m[s]["async/staleness"] for s in steps] == [0.0] + [1.0] * 9, [m[s]["async/staleness"] for s in steps]
    assert [m[s]["async/policy_version"] for s in steps] == [0.0] + [float(s - 2) for s in steps[1:]]
    assert all(m[s]["async/tokens_staleness_1"] > 0 for s in steps[1:]) and m[1]["async/tokens_staleness_0"] > 0
    acc = [m[s]["maporl/gold_accuracy_final"] for s in steps]  # accuracy_final is the verifier's probability
    print("final-round gold accuracy per step:", [round(a, 3) for a in acc],
          f"margin {sum(acc[-3:]) / 3 - acc[0] - 0.25:+.3f}")
    # a random digit is right ~1/10 of the time (64 final answers a step, so ±0.04): the last steps must
    # beat the untrained first one clearly. Runs differ (concurrent sampling is not seeded on CPU): two
    # reached 1.0 by step 8, one plateaued at 0.5-0.7 after step 4, so the bar is set for the slower one.
    assert sum(acc[-3:]) / 3 >= acc[0] + 0.25, acc
    assert sum(acc[5:]) > sum(acc[:5]), acc
    for i in range(AGENTS):
        # each policy trains on its own agent's turns and syncs into its own engine
        assert all(m[s][f"agent{i}/actor/loss_tokens_agent{i}"] > 0 for s in steps)
        assert all(f"agent{i}/actor/loss_tokens_agent{1 - i}" not in m[s] for s in steps)
        assert all(m[s][f"agent{i}/sync/bytes"] > 0 for s in steps)
        for s in (5, 10):
            assert m[s][f"agent{i}/parity/max_abs"] <= 1e-4, (i, s)
        assert abs(m[1][f"agent{i}/actor/ratio_mean"] - 1.0) < 1e-6
        assert (run / f"agent{i}" / "checkpoints").exists()
    # the agents saw the verifier's scores of the previous round, in words: their own answer's and the other's
    from megatron_matpo.maporl.prompts import score_note

    turns = {d["traj_id"]: d for d in rollouts(run, 1)}
    later = [d for d in turns.values() if d["round"] > 0]
    assert later
    for d in later:
        prompt = d["messages"][-2]["content"]
        (seen,) = d["seen"]
        own = turns[d["parent_id"]]
        assert f"Your previous answer: {score_note(own['score'])}." in prompt, prompt
        assert f"Agent {turns[seen]['agent'] + 1} ({score_note(turns[seen]['score'])})" in prompt, prompt


TOY = "configs/maporl_toy_learnable_cpu.yaml"
PROMPTS, DISCUSSIONS = 4, 8  # the toy's prompts_per_step and n_samples


@pytest.fixture(scope="module")
def critic_world(maporl_inputs, tmp_path_factory) -> dict:
    """The PPO + GAE option on the toy: one shared actor and its Megatron critic (value head, own
    ranks), eval on 2 val questions at step 10 and the HF export on, rolled out one step ahead
    (async.max_staleness=1). SIGKILLed once the step-5 checkpoint (actor, then critic) is complete,
    step 6's discussions in flight, then resumed: steps 6-10 run on the restored critic (a fresh zero
    head would give V = 0 again at step 6) and the data cursor of the steps trained."""
    run = tmp_path_factory.mktemp("maporl-critic") / "run"
    val = maporl_inputs[1].replace("data=", "").replace("maporl_train_", "maporl_val_")
    ov = maporl_inputs + ["maporl.models=shared", "advantage.estimator=gae", "critic.optim.lr=1.0e-3",
                          "async.max_staleness=1", "checkpoint.every=5", "checkpoint.export_hf=true", "eval.every=10",
                          f"eval.data={val}",
                          "eval.max_prompts=2"]
    proc = start(TOY, run, ov)
    try:
        wait_for(run / "critic" / "checkpoints", "step_000005", proc, timeout=1500)
    finally:
        kill_tree(proc)
    killed_stdout = (run / "stdout.txt").read_text()
    out = train(TOY, run, ov, resume=True)
    return {"run": run, "out": out, "killed_stdout": killed_stdout, "m": metrics(run),
            "data": maporl_inputs[1].replace("data=", "")}


def test_shared_model_with_a_critic_learns_the_toy(critic_world):
    """The zero-initialized head gives V = 0 until the critic's first update; the critic then fits
    the returns, survives a kill + resume, and the final-round accuracy must rise as with GRPO."""
    run, m, out = critic_world["run"], critic_world["m"], critic_world["out"]
    assert "resumed from" in out and "step_000005" in out, out[-2000:]
    assert_engines_gone(critic_world["killed_stdout"])
    assert_quiet_console(critic_world["killed_stdout"])
    assert_quiet_console(out)
    steps = sorted(m)
    assert steps == list(range(1, 11))
    # killed with step 6 rolled out ahead (or in flight): the checkpoint kept the cursor of the steps
    # trained, so every step's questions are the loader's, none trained twice or skipped
    from megatron_matpo.data.loader import PromptLoader
    from megatron_matpo.data.parquet import read_dataset

    loader = PromptLoader(list(read_dataset(critic_world["data"])), PROMPTS, seed=0)
    for s in steps:
        assert sorted({d["question"] for d in rollouts(run, s)}) == sorted({x.question for x in loader.next_batch()}), s
    assert [m[s]["async/staleness"] for s in steps] == [0.0] + [1.0] * 4 + [0.0] + [1.0] * 4  # a resume starts afresh
    acc = [m[s]["maporl/accuracy_final"] for s in steps]
    ev = [m[s]["gae/explained_variance"] for s in steps]
    print("final-round accuracy per step:", [round(a, 3) for a in acc],
          f"margin {sum(acc[-3:]) / 3 - acc[0] - 0.25:+.3f}")
    print("critic explained variance per step:", [round(e, 3) for e in ev])
    print("critic value loss per step:", [round(m[s]["critic/value_loss"], 4) for s in steps])
    assert sum(acc[-3:]) / 3 >= acc[0] + 0.25, acc
    assert m[1]["gae/value_mean"] == 0.0 and m[1]["gae/explained_variance"] == 0.0  # V = 0 before any update
    assert all(m[s]["gae/value_mean"] != 0.0 for s in steps[1:])
    assert all(m[s]["critic/value_loss"] > 0 and m[s]["critic/grad_norm"] > 0 for s in steps)
    assert all(m[s]["gae/advantage_abs_mean"] > 0 for s in steps)
    # (constrained sampling: no train/rollout parity tokens; the engine parity check runs every 5 steps)
    assert abs(m[1]["actor/ratio_mean"] - 1.0) < 1e-6 and abs(m[1]["actor/approx_kl"]) < 1e-7
    assert all(m[s]["parity/max_abs"] <= 1e-4 for s in (5, 10))
    assert (run / "critic" / "checkpoints" / "latest").exists()


def test_shared_model_discussion_trains(critic_world):
    """The discussion itself, on the same run: every agent plays every round of every discussion, the
    metrics of each agent and round and each reward term, one shared policy trained on each agent's
    turns under its own role, eval per agent and round, and agents that read each other."""
    run, m = critic_world["run"], critic_world["m"]
    for step in m.values():
        for i in range(AGENTS):
            assert step[f"agent{i}/count"] == PROMPTS * DISCUSSIONS * ROUNDS  # no consensus stop
            for t in range(ROUNDS):
                assert 0.0 <= step[f"maporl/accuracy_agent{i}_round{t}"] <= 1.0
        for key in ("influence", "corrective", "regress", "persuasion", "misleading", "score"):
            assert f"maporl/{key}_mean" in step
        assert "maporl/accuracy_final" in step and "maporl/answer_changed_fraction" in step
        assert all(step[f"actor/loss_tokens_agent{i}"] > 0 for i in range(AGENTS)), sorted(step)
        assert "actor/loss_tokens_planner" not in step and step["gae/advantage_abs_mean"] >= 0  # PPO + GAE
    # eval at step 10: discussions on the val questions, accuracy per agent and round
    ev = [k for k in m[10] if k.startswith("eval/") and k.endswith("/maporl/accuracy_final")]
    assert len(ev) == 1 and 0.0 <= m[10][ev[0]] <= 1.0, sorted(m[10])
    src = ev[0].split("/")[1]
    assert f"eval/{src}/maporl/accuracy_agent1_round2" in m[10]
    assert not any(k.startswith("eval/") for s in range(1, 10) for k in m[s])
    assert (run / "rollouts" / f"eval_{10:06d}_{src}.jsonl").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # agents read each other: a round-t turn was shown the other agent's round t-1 answer (the toy
    # shares answers only: maporl.discussion.share=answer), in its prompt
    turns = {d["traj_id"]: d for d in rollouts(run, 1)}
    later = [d for d in turns.values() if d["round"] > 0]
    assert len(later) == PROMPTS * DISCUSSIONS * AGENTS * (ROUNDS - 1)
    for d in later:
        (seen,) = d["seen"]
        other = turns[seen]
        assert other["agent"] != d["agent"] and other["round"] == d["round"] - 1
        prompt = d["messages"][-2]["content"]  # the revision prompt, before this turn's answer
        assert "Agent" in prompt and (other["answer"] or "") in prompt, (other["answer"], prompt)
    assert (run / "hf" / "model.safetensors").exists()
