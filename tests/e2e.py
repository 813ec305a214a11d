"""Helpers of the end-to-end tests, which run `matpo train` as users do: as a separate process per
run (or per start of a killed-and-resumed run), with the run's files as the only interface."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cmd(config_path: str, run_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    return ([sys.executable, "-m", "megatron_matpo.cli", "train", "--config", str(REPO / config_path)]
            + (["--resume"] if resume else []) + [f"run_dir={run_dir}", *overrides])


# Every run here has a user's secrets in its environment (the judge's and Serper's API keys); the MATPO
# world also sets one in its config. No file a run writes may contain them (tests/test_train.py).
PLANTED_SECRET = "sk-planted-3f9c1e7a"
SECRET_ENV = ("MATPO_JUDGE_API_KEY", "OPENAI_API_KEY", "SERPER_API_KEY")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **{k: f"{PLANTED_SECRET}-{k}" for k in SECRET_ENV}}


def train(config_path: str, run_dir: Path, overrides: list[str], resume: bool = False, timeout: float = 1500) -> str:
    """One `matpo train` to the end; its stdout + stderr (the assertion shows their tails on failure)."""
    p = subprocess.run(cmd(config_path, run_dir, overrides, resume), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"matpo train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d for d in map(json.loads, lines)}


def rollouts(run_dir: Path, step: int, prefix: str = "step") -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rollouts" / f"{prefix}_{step:06d}.jsonl").read_text().splitlines()]


def check_invariants(m: dict[int, dict], parity_steps: list[int] | None = None) -> None:
    """Every step: the engine sampled with the actor's weights (its sampling logprobs equal the
    actor's, fp32: the initial weights at step 1, each sync's after). First step: the PPO ratio is 1
    and approx-KL 0 (by construction where the update's own forward gives the old logprobs; from a
    separate pass with a reference model, as in the Slurm run). With `parity_steps`, the prompt-
    logprob parity after those steps' syncs."""
    first = m[min(m)]
    assert abs(first["actor/ratio_mean"] - 1.0) < 1e-6 and first["actor/ratio_max"] < 1.0 + 1e-5, first
    assert abs(first["actor/approx_kl"]) < 1e-7, first
    for step, d in m.items():
        assert d["train_rollout_logprob_tokens"] > 0, step
        assert d["train_rollout_logprob_abs_diff"] <= 1e-4, (step, d["train_rollout_logprob_abs_diff"])
        if parity_steps is None or step in parity_steps:
            assert d["parity/max_abs"] <= 1e-4, (step, d)
        assert d["sync/bytes"] > 0, step


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a `matpo train` and everything under it at once (Ray's processes, the actor ranks, the
    engines), as a node failure would: nothing gets to finish what it was writing."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start(config_path: str, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """A `matpo train` in its own session, its output in run_dir/stdout.txt (to be killed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.txt", "w")
    return subprocess.Popen(cmd(config_path, run_dir, overrides), cwd=REPO, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(root: Path, pattern: str, proc: subprocess.Popen, timeout: float, poll_s: float = 0.5) -> Path:
    """The first path matching `pattern` under `root` once it appears (the run must still be alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {pattern} appeared")
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(poll_s)
    raise AssertionError(f"{pattern} did not appear in {timeout}s")


def engine_addresses(stdout: str) -> list[tuple[str, int]]:
    """The trainer prints "<policy> engines: ['http://HOST:PORT', ...]"; engines listen on their node."""
    lines = [x for x in stdout.splitlines() if re.match(r"^\S+ engines: ", x)]
    return [(h, int(p)) for line in lines for h, p in re.findall(r"http://([^:/']+):(\d+)", line.split(";")[0])]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def assert_engines_gone(stdout: str, timeout: float = 60) -> None:
    """A killed trainer leaves no engine behind (they die with their Ray actor)."""
    urls = engine_addresses(stdout)
    deadline = time.time() + timeout
    while any(port_open(h, p) for h, p in urls) and time.time() < deadline:
        time.sleep(1)
    assert urls and not any(port_open(h, p) for h, p in urls), f"the killed run's engines survived: {urls}"
