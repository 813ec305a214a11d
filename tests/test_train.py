"""The RL loop end to end through `matpo train`: real SGLang engine, real MCP tool server, Megatron
actor ranks as Ray actors (gloo), weight sync into the engine, checkpoints, HF export.

Each run is a separate `matpo train` process (what users run); inputs are bootstrapped once per
session into a shared directory and passed as overrides.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _cmd(config_path: str, run_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    return ([sys.executable, "-m", "megatron_matpo.cli", "train", "--config", str(REPO / config_path)]
            + (["--resume"] if resume else []) + [f"run_dir={run_dir}", *overrides])


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(config_path: str, run_dir: Path, overrides: list[str], resume: bool = False, timeout: float = 900) -> str:
    p = subprocess.run(_cmd(config_path, run_dir, overrides, resume), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"matpo train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d for d in map(json.loads, lines)}


def check_invariants(m: dict[int, dict], parity_steps: list[int] | None = None) -> None:
    """First step: actor == engine weights, so the PPO ratio is exactly 1 and approx-KL 0; after
    every sync the engine's logprobs equal the actor's (fp32)."""
    first = m[min(m)]
    assert abs(first["actor/ratio_mean"] - 1.0) < 1e-6 and first["actor/ratio_max"] < 1.0 + 1e-5, first
    assert abs(first["actor/approx_kl"]) < 1e-7, first
    for step, d in m.items():
        assert d["train_rollout_logprob_tokens"] > 0, step
        assert d["train_rollout_logprob_abs_diff"] <= 1e-4, (step, d["train_rollout_logprob_abs_diff"])
        if parity_steps is None or step in parity_steps:
            assert d["parity/max_abs"] <= 1e-4, (step, d)
        assert d["sync/bytes"] > 0, step


# a checkpoint every step, so the same run is also the reference the resume test compares against;
# colocated engines synced by tensors (the broadcast path runs end to end in tests/test_slurm.py;
# releasing engine memory during training is CUDA-only, compat.engine_memory_release_supported)
TP2 = ["checkpoint.every=1", "loss.kl_coef=0.001", "eval.every=3", "eval.max_prompts=2", "orchestrate.colocate=true",
       "sync.mode=tensor"]


@pytest.fixture(scope="module")
def tp2_run(inputs, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("tp2") / "run"
    return run, train("configs/tiny_cpu.yaml", run, inputs + TP2)


def test_tiny_cpu_end_to_end_tp2(tp2_run, inputs):
    run, out = tp2_run
    m = metrics(run)
    assert sorted(m) == [1, 2, 3], out[-2000:]
    check_invariants(m)
    for step in m.values():
        assert step["planner/count"] == 8 and step["worker/count"] >= 8  # forced delegation: one worker each
        assert step["planner/workers_per_planner"] >= 1.0
        assert step["actor/loss_tokens_planner"] > 0 and step["actor/loss_tokens_worker"] > 0
        assert step["actor/steps_skipped"] == 0 and step["actor/grad_norm"] >= 0.0
        assert step["sync/tensors"] > 0 and "time/rollout_s" in step
    # the frozen reference (loss.kl_coef > 0) starts equal to the actor: KL 0 at step 1
    assert m[1]["actor/ref_kl"] == pytest.approx(0.0, abs=1e-7) and "actor/kl" in m[1]
    assert any(k.startswith("eval/") and k.endswith("accuracy") for k in m[3]), sorted(m[3])
    assert (run / "rollouts" / "eval_000003.jsonl").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    lines = (run / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    roles = {json.loads(x)["role"] for x in lines}
    assert roles == {"planner", "worker"}
    from megatron_matpo.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(run).name == "step_000003"
    assert (run / "config.yaml").exists()
    # the HF export of the final policy has the initial model's tensors and loads in transformers
    from safetensors.torch import load_file

    model_dir = Path(inputs[0].split("=", 1)[1])
    a, b = load_file(model_dir / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf")


def _wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float) -> None:
    root, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {pattern} appeared")
        if list(root.glob(pattern)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{pattern} did not appear in {timeout}s")


def _planners(run: Path, step: int) -> list[dict]:
    lines = (run / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d["role"] == "planner"]


def _questions(run: Path, step: int) -> list[str]:
    return sorted(d["question"] for d in _planners(run, step))


def _answer_counts(run: Path, step: int) -> str:
    """The planner's final letters at a step, e.g. "c:13 d:4 h:6" (what a failed learning test shows)."""
    from collections import Counter

    from megatron_matpo.reward.answer import extract_boxed

    got = Counter(extract_boxed(d["final_text"]) or "-" for d in _planners(run, step))
    return " ".join(f"{k}:{v}" for k, v in sorted(got.items()))


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def test_resume_after_sigkill(tp2_run, inputs, tmp_path):
    """A run SIGKILLed after its step-2 checkpoint and resumed with --resume: it restarts from that
    checkpoint (not from scratch, not from a partial one), takes step 3's prompts from the restored
    data cursor (the same as the uninterrupted run's), continues the LR schedule, and syncs the
    restored weights into the fresh engine before rolling out (engine == actor logprobs at step 3).
    The SIGKILL leaves no engine behind. (Bit-exact equality of the resumed *training* state is
    tests/test_checkpoint.py; equal rollouts would need SGLang's seeded sampling, GPU-only.)"""
    full, _ = tp2_run
    ov = inputs + TP2
    ref = metrics(full)

    killed = tmp_path / "killed"
    killed.mkdir()
    with open(killed / "stdout.txt", "w") as log:
        proc = subprocess.Popen(_cmd("configs/tiny_cpu.yaml", killed, ov), cwd=REPO, env=_env(),
                                stdout=log, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for((killed / "checkpoints", "step_000002"), proc, timeout=900)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the trainer prints "actor engines: ['http://HOST:PORT', ...]"; engines listen on their Ray node's address
    (line,) = [x for x in (killed / "stdout.txt").read_text().splitlines() if x.startswith("actor engines: ")]
    urls = re.findall(r"http://([^:/']+):(\d+)", line.split(";")[0])
    deadline = time.time() + 60
    while any(_port_open(h, int(p)) for h, p in urls) and time.time() < deadline:
        time.sleep(1)
    assert urls and not any(_port_open(h, int(p)) for h, p in urls), "the killed run's engine survived"
    from megatron_matpo.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(killed).name == "step_000002", "the kill came too late to leave a step to redo"
    out = train("configs/tiny_cpu.yaml", killed, ov, resume=True)
    assert "resumed from" in out and "step_000002" in out
    got = metrics(killed)
    assert sorted(got) == [1, 2, 3]  # step 3 logged once, by the resumed run
    assert _questions(killed, 3) == _questions(full, 3)  # data cursor restored
    assert got[3]["actor/lr"] == ref[3]["actor/lr"]
    check_invariants({3: got[3]})  # restored weights reached the new engine before step 3's rollouts
    assert latest_checkpoint(killed).name == "step_000003"


def test_reward_rises_on_the_learnable_toy(inputs, tmp_path):
    """configs/toy_learnable_cpu.yaml: the same planner + worker pipeline where the planner's answer
    is one constrained letter and the gold answer is always "c" (a random policy is right 1/8 of the
    time). GRPO must raise the reward; planner and worker tokens both carry policy-gradient terms."""
    run = tmp_path / "toy"
    train("configs/toy_learnable_cpu.yaml", run, inputs + ["bootstrap.toy_answer=c"], timeout=1500)
    m = metrics(run)
    steps = sorted(m)
    acc = [m[s]["reward/accuracy"] for s in steps]
    first, last = sum(acc[:5]) / 5, sum(acc[-5:]) / 5
    print(f"accuracy by step: {[round(a, 3) for a in acc]}; first-5 mean {first:.3f}, last-5 mean {last:.3f}")
    for s in steps:
        print(f"step {s} answers: {_answer_counts(run, s)}")
    assert last >= first + 0.25, (first, last, acc)
    reward = [m[s]["reward/mean"] for s in steps]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5
    # both roles were trained: non-zero surrogate terms on planner and on worker tokens
    assert any(abs(m[s]["actor/pg_term_planner"]) > 0 for s in steps)
    assert any(abs(m[s]["actor/pg_term_worker"]) > 0 for s in steps)
    assert all(m[s]["actor/loss_tokens_worker"] > 0 and m[s]["actor/loss_tokens_planner"] > 0 for s in steps)
    check_invariants(m, parity_steps=[s for s in steps if "parity/max_abs" in m[s]])


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
    with pytest.raises(ConfigError, match="estimator=gae is implemented for algorithm=maporl"):
        load("advantage.estimator=gae").validate()
    with pytest.raises(ConfigError, match="advantage.estimator: grpo | gae"):
        load("advantage.estimator=ppo").validate()
    # a critic per policy, laid out like its actor: 2 agents x (actor + critic) x TP 2 x dp 0 on 2 x 8 GPUs
    mp = config.load(TrainConfig, REPO / "configs/maporl_tiny_cpu.yaml", [
        f"run_dir={tmp_path}/m", "maporl.models=distinct", "advantage.estimator=gae", "actor.tp=2", "actor.dp=0",
        "orchestrate.nodes=2", "orchestrate.gpus_per_node=8", "orchestrate.colocate=true", "sync.mode=tensor"])
    assert mp.validate().actor.dp == 2  # 16 GPUs / (2 policies x 2 models x TP 2)
    cfg = load(f"model={tmp_path}/missing", "bootstrap.tiny_model=null", f"data={tmp_path}/missing-data",
               "bootstrap.multihop=null")
    with pytest.raises(FileNotFoundError, match="missing-data"):
        with Trainer(cfg):
            pass
    import ray

    assert not ray.is_initialized()
