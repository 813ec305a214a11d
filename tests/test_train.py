"""The RL loop end to end through `matpo train`: real SGLang engine, real MCP tool server, Megatron
actor ranks as Ray actors (gloo), weight sync into the engine, checkpoints, eval, HF export, and the
same run as a Slurm job that is preempted, requeued and resumed.

One world for all of it (bring-up is most of a short run's cost on 2 cores): the learnable toy
(configs/toy_learnable_cpu.yaml) with a checkpoint every step, eval and the HF export switched on. It
starts on this machine, colocated (engine synced by tensors) with the frozen reference (KL), and is
SIGKILLed while it writes its step-3 checkpoint. It is resumed as slurm/tiny_cpu.sbatch on a real
local Slurm across two nodes (engine on its own bundle, synced by broadcast, each step rolled out
while the one before trains: async.max_staleness=1, corrected by TIS), preempted there with
SIGUSR1 after step 5's checkpoint, requeued by the script and resumed once more to step 10. The
learning test, the end-to-end checks, the crash/resume checks and the Slurm checks all read that one
run. Without a local Slurm (it needs root) the second half is a plain `matpo train --resume` and the
Slurm test skips. The world runs beside the rest of the suite from its first test on (tests/conftest.py:
BACKGROUND); its tests wait for it. (All three sync paths at TP=2, PP=2 and TP=2 x PP=2: tests/test_bridge.py.)
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e import (PLANTED_SECRET, REPO, assert_engines_gone, assert_quiet_console, check_invariants, kill_tree,
                       metrics, preempted_tiny_job, rollouts, start, train, wait_for)

pytestmark = pytest.mark.slow
TOY = "configs/toy_learnable_cpu.yaml"
KILL_AT = 3  # the run dies inside this step's checkpoint write, so step 2's is the one to resume from
PREEMPT_AFTER = 5  # the Slurm job gets SIGUSR1 once this step's checkpoint exists: it stops after it or the next
WORLD = ["bootstrap.toy_answer=c", "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.export_hf=true",
         "eval.every=10", "eval.max_prompts=2"]
# the first start (steps 1-2): colocated and synced by tensors, with the frozen reference (its forward costs
# ~6 s a step here, so the Slurm half runs without it, in the toy's own broadcast mode), and its two ranks
# context-parallel (each holds half of every packed sequence) where the resumed half runs them as DP ranks
HERE = ["orchestrate.colocate=true", "sync.mode=tensor", "loss.kl_coef=0.001", "actor.dp=1", "actor.cp=2"]
# the second half (steps 3-10, engines on their own bundles): each step rolled out while the one before
# trains, on the weights from two steps back (async is refused with colocated engines), corrected by
# token-level TIS from the engine's logprobs to the recomputed ones
THERE = ["async.max_staleness=1", "loss.off_policy.mode=tis"]


def _planners(run: Path, step: int) -> list[dict]:
    return [d for d in rollouts(run, step) if d["role"] == "planner"]


def _answer_counts(run: Path, step: int) -> str:
    """The planner's final letters at a step, e.g. "c:13 d:4 h:6" (what a failed learning test shows)."""
    from collections import Counter

    from megatron_matpo.reward.answer import extract_boxed

    got = Counter(extract_boxed(d["final_text"]) or "-" for d in _planners(run, step))
    return " ".join(f"{k}:{v}" for k, v in sorted(got.items()))


@pytest.fixture(scope="module")
def matpo_world(worlds) -> dict:
    """run_matpo_world's record; it runs beside the rest of the suite from its start (tests/conftest.py)."""
    return worlds.result("matpo_world")


def run_matpo_world(inputs, slurm_or_none, tmp_path_factory) -> dict:
    """The toy run, SIGKILLed (with every process under it) as soon as its step-3 checkpoint directory
    exists in its temporary form; what the kill left is recorded before anything touches it. Then
    resumed to the end: as the Slurm job, preempted and requeued once, or locally without Slurm."""
    from megatron_matpo.train.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, latest_checkpoint

    run = tmp_path_factory.mktemp("matpo") / "run"
    ov = inputs + WORLD + [f"rollout.reward.judge.api_key={PLANTED_SECRET}-config"]  # unused: exact-match scoring
    proc = start(TOY, run, ov + HERE)
    try:
        partial = wait_for(run / CHECKPOINTS_DIR, f"step_{KILL_AT:06d}.tmp-*", proc, timeout=1500, poll_s=0.01)
    finally:
        kill_tree(proc)
    ckpts = run / CHECKPOINTS_DIR
    killed = {"partial": partial, "partial_left": partial.exists(),
              "committed_at_kill": (ckpts / f"step_{KILL_AT:06d}").exists(),
              "latest_file": (ckpts / LATEST_FILE).read_text().strip(),
              "latest": latest_checkpoint(run).name, "stdout": (run / "stdout.txt").read_text()}
    if slurm_or_none is None:
        job, out = None, train(TOY, run, ov + THERE, resume=True)  # as the Slurm half: broadcast, no reference
    else:
        log = run / "slurm-job.out"  # inside run_dir: the no-secret test reads it too
        job = preempted_tiny_job(slurm_or_none, TOY, run, ov + THERE, ckpts / f"step_{PREEMPT_AFTER:06d}", log)
        out = log.read_text()
    return {"run": run, "out": out, "killed": killed, "m": metrics(run), "inputs": inputs, "job": job}


def test_reward_rises_on_the_learnable_toy(matpo_world):
    """The planner's answer is one constrained letter and the gold answer is always "c" (a random
    policy is right 1/8 of the time). GRPO must raise the reward over 10 steps (a kill and resume
    included, steps 4-10 but a resume's first on rollouts one policy version behind); planner and
    worker tokens both carry policy-gradient terms."""
    run, m = matpo_world["run"], matpo_world["m"]
    steps = sorted(m)
    acc = [m[s]["reward/accuracy"] for s in steps]
    first, last = sum(acc[:5]) / 5, sum(acc[-5:]) / 5
    print(f"accuracy by step: {[round(a, 3) for a in acc]}; first-5 mean {first:.3f}, last-5 mean {last:.3f}, "
          f"margin {last - first - 0.25:+.3f}")
    for s in steps:
        print(f"step {s} answers: {_answer_counts(run, s)}; grad norm {m[s]['actor/grad_norm']:.3g}, "
              f"clip {m[s].get('actor/clip_frac', float('nan')):.3g}, approx-KL {m[s]['actor/approx_kl']:.3g}")
    assert last >= first + 0.25, (first, last, acc)
    reward = [m[s]["reward/mean"] for s in steps]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5
    # both roles were trained: non-zero surrogate terms on planner and on worker tokens
    assert any(abs(m[s]["actor/pg_term_planner"]) > 0 for s in steps)
    assert any(abs(m[s]["actor/pg_term_worker"]) > 0 for s in steps)
    assert all(m[s]["actor/loss_tokens_worker"] > 0 and m[s]["actor/loss_tokens_planner"] > 0 for s in steps)


def test_matpo_end_to_end(matpo_world):
    run, m, inputs = matpo_world["run"], matpo_world["m"], matpo_world["inputs"]
    assert sorted(m) == list(range(1, 11)), matpo_world["out"][-2000:]
    check_invariants(m, parity_steps=[s for s in m if "parity/max_abs" in m[s]])
    assert all(m[s]["parity/max_abs"] <= 1e-4 for s in (5, 10))  # sync.parity_every: 5
    # the frozen reference (loss.kl_coef > 0, first start only) starts equal to the actor: KL 0 at step 1,
    # then the updated policy drifts from it; no reference once the resumed run switched it off
    assert m[1]["actor/ref_kl"] == pytest.approx(0.0, abs=1e-7) and m[2]["actor/ref_kl"] > 0 and "actor/kl" in m[1]
    assert "actor/ref_kl" not in m[KILL_AT] and "actor/kl" not in m[KILL_AT]
    for step in m.values():
        assert step["planner/count"] == 64 and step["worker/count"] >= 64  # forced delegation: one worker each
        assert step["planner/workers_per_planner"] >= 1.0
        assert step["actor/steps_skipped"] == 0 and step["actor/grad_norm"] >= 0.0
        assert step["sync/tensors"] > 0 and "time/rollout_s" in step
    # steps 3-10 were rolled out one step ahead (THERE), except each process's first step: a start rolls
    # out on the weights it restored; the steps before the kill ran synchronously (colocated)
    starts = [s for s in sorted(m) if "bringup/total_s" in m[s]]
    assert starts[:2] == [1, KILL_AT], starts
    for s in m:
        lag = 0 if s < KILL_AT or s in starts else 1
        assert (m[s]["async/staleness"], m[s]["async/policy_version"]) == (lag, s - 1 - lag), (s, starts)
        assert m[s][f"async/tokens_staleness_{lag}"] > 0 and f"async/tokens_staleness_{1 - lag}" not in m[s]
        # TIS (THERE only): the IS ratio engine -> trainer is ~1 on the synchronous steps, moved on lagged ones
        if s < KILL_AT:
            assert not any(k.startswith("actor/is_") for k in m[s]), s
        else:
            assert m[s]["actor/is_tokens"] > 0 and m[s]["actor/is_ratio_max"] >= m[s]["actor/is_ratio_mean"] > 0
            assert 0.0 <= m[s]["actor/is_truncated_frac"] <= 1.0 and "actor/is_masked_frac" not in m[s]
            assert (m[s]["actor/is_ratio_max"] < 1.01) == (lag == 0), (s, lag, m[s]["actor/is_ratio_max"])
    assert any(k.startswith("eval/") and k.endswith("accuracy") for k in m[10]), sorted(m[10])
    assert not any(k.startswith("eval/") for s in range(1, 10) for k in m[s])
    assert (run / "rollouts" / "eval_000010.jsonl").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert {d["role"] for d in rollouts(run, 1)} == {"planner", "worker"}
    from megatron_matpo.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(run).name == "step_000010"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000009", "step_000010"]
    assert (run / "config.yaml").exists()
    # the console: a short summary before bring-up (the full config is in config.yaml), then the
    # bring-up parts, the first weight sync among them (the engines sample the actor's weights from step 1)
    out = matpo_world["out"]
    assert "matpo train: algorithm  MATPO (planner + workers); 10 steps x 8 prompts x 8 samples" in out, out[:3000]
    assert f"matpo train: run dir    {run} (full config: {run / 'config.yaml'})" in out, out[:3000]
    assert "rollout:\n" not in out and m[1]["bringup/first_sync_s"] > 0 and m[KILL_AT]["bringup/first_sync_s"] > 0
    # steps 1-2 trained context-parallel (CP 2), the resumed steps from their checkpoint as DP ranks (DP 2):
    # the distributed optimizer's shards (over DP x CP) and the weights carry across
    assert "matpo train: actor      TP 1 x PP 1 x CP 2 x DP 1," in matpo_world["killed"]["stdout"]
    assert "matpo train: actor      TP 1 x PP 1 x DP 2," in out, out[:3000]
    # ... and nothing else that reads as a failure: no traceback, error or library probe (the first start's
    # console up to its kill; the Slurm job's log, which also holds Ray's and the job script's own lines)
    assert_quiet_console(matpo_world["killed"]["stdout"])
    assert "Traceback" not in out, out[-6000:]
    # the HF export of the final policy has the initial model's tensors and loads in transformers
    from safetensors.torch import load_file

    model_dir = Path(inputs[0].split("=", 1)[1])
    a, b = load_file(model_dir / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf")


def test_no_secret_in_anything_the_run_wrote(matpo_world):
    """The API keys in the run's environment and config appear in no file under run_dir (config.yaml,
    logs, engine logs, transcripts, tensorboard, checkpoints, HF export) and not on its console."""
    run = matpo_world["run"]
    cfg = (run / "config.yaml").read_text()
    assert "api_key: <redacted>" in cfg, cfg  # the field is kept, its value is not
    leaks = [str(p.relative_to(run)) for p in run.rglob("*")
             if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
    assert leaks == [], leaks
    assert PLANTED_SECRET not in matpo_world["out"] and PLANTED_SECRET not in matpo_world["killed"]["stdout"]


def test_sigkill_in_a_checkpoint_write_then_resume(matpo_world):
    """SIGKILL (trainer, Ray, ranks, engine) while the step-3 checkpoint is being written: the partial
    directory is never loaded and `latest` never names it; --resume restarts from step 2's checkpoint
    (not from scratch), redoes step 3 with the prompts the data cursor gives (the loader's own
    order), continues the LR schedule, and syncs the restored weights into the fresh engine before
    rolling out (engine == actor logprobs at step 3). The killed engine does not survive. (Bit-exact
    equality of the resumed *training* state is tests/test_checkpoint.py; equal rollouts would need
    SGLang's seeded sampling, GPU-only.)"""
    from megatron_matpo.data.loader import PromptLoader
    from megatron_matpo.data.parquet import read_dataset

    run, m, k, out = matpo_world["run"], matpo_world["m"], matpo_world["killed"], matpo_world["out"]
    before = f"step_{KILL_AT - 1:06d}"
    assert k["partial_left"] and not k["committed_at_kill"], ("the kill missed the checkpoint write", k)
    assert k["latest"] == before and k["latest_file"] == before, k
    assert_engines_gone(k["stdout"])
    assert re.search(rf"resumed from \S+{before} at step {KILL_AT - 1}", out), out[-2000:]
    assert not k["partial"].exists()  # the next successful save cleared the leftover
    assert sorted(m) == list(range(1, 11))  # step 3 logged once, by the resumed run
    # every step's prompts are the loader's: steps 1-2 before the kill, 3-10 from the restored cursor
    data = next(x.split("=", 1)[1] for x in matpo_world["inputs"] if x.startswith("data="))
    loader = PromptLoader(list(read_dataset(data)), 8, seed=0)
    for step in range(1, 11):
        want = sorted(s.question for s in loader.next_batch() for _ in range(8))
        assert sorted(d["question"] for d in _planners(run, step)) == want, step
    # constant schedule, restored, with the output layer's own param group (optim.output_layer_lr)
    assert m[KILL_AT]["actor/lr"] == m[1]["actor/lr"] == 1e-3
    assert m[KILL_AT]["actor/lr_output_layer"] == m[1]["actor/lr_output_layer"] == 1e-2
    # restored weights reached the new engine before step 3's rollouts: its sampling logprobs equal the
    # actor's (the prompt-logprob parity check runs at steps 5 and 10 only: sync.parity_every)
    check_invariants({KILL_AT: m[KILL_AT]}, parity_steps=[])


def test_slurm_job_preempted_requeued_resumed(matpo_world):
    """The second half of the world as slurm/tiny_cpu.sbatch through common.sh + launch/ray_cluster.sh:
    Ray across both Slurm nodes and the trainer's bundles on both Ray nodes, the engine synced by
    broadcast over the network group (the first half was colocated and synced by tensors), SIGUSR1 as
    from `--signal` after step 5's checkpoint: the driver stops at the step boundary with 75, the
    script requeues the job, which resumes from that checkpoint; nothing is redone."""
    job, out, m, k = matpo_world["job"], matpo_world["out"], matpo_world["m"], matpo_world["killed"]
    if job is None:
        from tests.e2e import slurm_missing

        pytest.skip(f"the world was resumed without Slurm: {slurm_missing()}")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job["why"]
    assert job["Restarts"] == "1", out[-6000:]  # requeued once, by the script itself
    assert "requeueing job" in out and "preempted" in out
    assert out.count("Ray cluster at") == 2 and re.search(r"Ray cluster at \S+: 2 nodes", out), out[-6000:]
    assert re.search(r"placement: \d+ bundles on 2 Ray node\(s\)", out), out[-6000:]
    assert "matpo train: sync       tensor," in k["stdout"] and "matpo train: sync       broadcast," in out
    # first start: from the kill's step-2 checkpoint; second: from the one the preemption wrote
    resumed = [int(x) for x in re.findall(r"resumed from \S+step_0*(\d+) at step \1\b", out)]
    assert resumed[0] == KILL_AT - 1 and resumed[1] in (PREEMPT_AFTER, PREEMPT_AFTER + 1), (resumed, out[-6000:])
    assert sorted(m) == list(range(1, 11))  # each step once: nothing redone after the requeue
    # every sync over the broadcast group reached the engine on the other node (steps 3-10)
    check_invariants({s: m[s] for s in range(KILL_AT, 11)}, parity_steps=[5, 10])
    assert resumed[1] + 1 in m and m[resumed[1] + 1]["bringup/first_sync_s"] > 0


def test_config_errors_before_anything_starts(tmp_path):
    """Bad configs fail fast with the field named; a failed start tears down what it started."""
    from megatron_matpo import config
    from megatron_matpo.config import ConfigError
    from megatron_matpo.train.config import TrainConfig
    from megatron_matpo.trainer import Trainer

    def load(*ov):
        return config.load(TrainConfig, REPO / "configs/tiny_cpu.yaml", [f"run_dir={tmp_path}/run", *ov])

    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        load("actor.max_tokens_per_micro_batch=512").validate()
    with pytest.raises(ConfigError, match="deterministic"):
        load("deterministic=true").validate()
    with pytest.raises(ConfigError, match="mini_batches"):
        load("actor.mini_batches=5").validate()
    with pytest.raises(ConfigError, match="advantage.estimator: gae is implemented for algorithm=maporl"):
        load("advantage.estimator=gae").validate()
    with pytest.raises(ConfigError, match="advantage.estimator: grpo | gae"):
        load("advantage.estimator=ppo").validate()
    # CP and SP: what they do not cover yet is refused by name; the world counts CP ranks
    with pytest.raises(ConfigError, match="actor.cp: 2 with loss.off_policy.level=sequence"):
        load("actor.cp=2", "loss.off_policy.mode=tis", "loss.off_policy.level=sequence").validate()
    with pytest.raises(ConfigError, match="actor.sequence_parallel: splits activations over the TP ranks"):
        load("actor.tp=1", "actor.sequence_parallel=true").validate()
    with pytest.raises(ConfigError, match=r"2047 is smaller than the longest agent context \(2048 tokens; the budget "
                                          r"is 2044 as a multiple of the TP/CP padding"):
        load("actor.tp=1", "actor.cp=2", "actor.max_tokens_per_micro_batch=2047").validate()
    with pytest.raises(ConfigError, match="actor.cp: must be >= 1, got 0"):
        load("actor.cp=0").validate()
    cp = load("actor.tp=2", "actor.cp=2", "actor.dp=0", "orchestrate.nodes=1", "orchestrate.gpus_per_node=8",
              "orchestrate.colocate=true", "sync.mode=tensor").validate()
    assert cp.actor.dp == 2 and cp.actor.layout.world_size == 8  # 8 GPUs / (TP 2 x CP 2)
    with pytest.raises(ConfigError, match="actor.sequence_parallel: with advantage.estimator=gae"):
        config.load(TrainConfig, REPO / "configs/maporl_tiny_cpu.yaml", [
            f"run_dir={tmp_path}/m", "advantage.estimator=gae", "actor.tp=2", "actor.sequence_parallel=true"]).validate()
    # a critic per policy, laid out like its actor: 2 agents x (actor + critic) x TP 2 x dp 0 on 2 x 8 GPUs
    mp = config.load(TrainConfig, REPO / "configs/maporl_tiny_cpu.yaml", [
        f"run_dir={tmp_path}/m", "maporl.models=distinct", "advantage.estimator=gae", "actor.tp=2", "actor.dp=0",
        "orchestrate.nodes=2", "orchestrate.gpus_per_node=8", "orchestrate.colocate=true", "sync.mode=tensor"])
    assert mp.validate().actor.dp == 2  # 16 GPUs / (2 policies x 2 models x TP 2)
    cfg = load(f"model={tmp_path}/missing", "bootstrap.tiny_model=null", f"data={tmp_path}/missing-data",
               "bootstrap.multihop=null")
    with pytest.raises(ConfigError, match="model: .*missing does not exist"):
        with Trainer(cfg):
            pass
    import ray

    assert not ray.is_initialized()
