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


# every `matpo train` a test started and has not yet seen end: a session that stops early (a failure
# elsewhere, ^C) kills what a world running beside the tests (tests/conftest.py) left behind
LIVE: set[subprocess.Popen] = set()


def train(config_path: str, run_dir: Path, overrides: list[str], resume: bool = False, timeout: float = 1500) -> str:
    """One `matpo train` to the end; its stdout + stderr (the assertion shows their tails on failure)."""
    p = subprocess.Popen(cmd(config_path, run_dir, overrides, resume), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    LIVE.add(p)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:  # timed out or interrupted
            kill_tree(p)
        LIVE.discard(p)
    assert p.returncode == 0, f"matpo train failed ({p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return stdout + stderr


# what the console of a run that went well must not show: library probes are quieted where they start
# (megatron_matpo/compat.py: quiet_library_noise), Ray's token-auth notice by naming the mode (start_ray)
CONSOLE_NOISE = re.compile(r"Traceback|\b[A-Z]\w*Error\b|Failed to get device capability|No CUDA runtime|"
                           r"Token authentication is enabled|IS DEPRECATED|UserWarning")


def assert_quiet_console(out: str) -> None:
    bad = [ln for ln in out.splitlines() if CONSOLE_NOISE.search(ln)]
    assert not bad, "noise on the console of a run that went well:\n" + "\n".join(bad[:20])


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d for d in map(json.loads, lines)}


def wandb_history(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """Each logged step's scalars (wandb's own `_`-keys dropped) and the run's config, read back from the
    offline run files the way `wandb sync` reads them (one offline run per `matpo train` start)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    history: dict[int, dict] = {}
    config: dict = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        ds = datastore.DataStore()
        ds.open_for_scan(str(path))
        while (data := ds.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history[int(row["_step"])] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    return history, config


def rollouts(run_dir: Path, step: int, prefix: str = "step") -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rollouts" / f"{prefix}_{step:06d}.jsonl").read_text().splitlines()]


def check_invariants(m: dict[int, dict], parity_steps: list[int] | None = None) -> None:
    """Every step: the engine sampled with the actor's weights (its sampling logprobs equal the
    actor's, fp32: the initial weights at step 1, each sync's after); a step rolled out ahead
    (async/staleness >= 1) on older weights, which the update since has moved. First step: the PPO ratio is 1
    and approx-KL 0 (by construction where the update's own forward gives the old logprobs; from a
    separate pass with a reference model, as in the Slurm run). With `parity_steps`, the prompt-
    logprob parity after those steps' syncs."""
    first = m[min(m)]
    assert abs(first["actor/ratio_mean"] - 1.0) < 1e-6 and first["actor/ratio_max"] < 1.0 + 1e-5, first
    assert abs(first["actor/approx_kl"]) < 1e-7, first
    for step, d in m.items():
        assert d["train_rollout_logprob_tokens"] > 0, step
        if d.get("async/staleness", 0) == 0:
            assert d["train_rollout_logprob_abs_diff"] <= 1e-4, (step, d["train_rollout_logprob_abs_diff"])
        else:  # rolled out on weights from before the last update: the logprobs moved since
            assert d["train_rollout_logprob_abs_diff"] > 1e-4, (step, d["train_rollout_logprob_abs_diff"])
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
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    LIVE.discard(proc)


def start(config_path: str, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """A `matpo train` in its own session, its output in run_dir/stdout.txt (to be killed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.txt", "w")
    p = subprocess.Popen(cmd(config_path, run_dir, overrides), cwd=REPO, env=env(), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    LIVE.add(p)
    return p


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


# --- a real local Slurm (tools/local_slurm.sh: slurmctld + 16 slurmd on 127.0.0.1, 8 fake GPUs each) ---

def slurm_missing() -> str | None:
    """Why a local Slurm cannot run here (None: it can). It needs root and tools/setup_slurm.sh's packages."""
    import shutil

    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "shellcheck") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed (bash tools/setup_slurm.sh)"
    if os.geteuid() != 0:
        return "a local Slurm needs root"
    return None


def start_slurm(root: Path) -> dict:
    """Start the cluster under `root` (short: munge and Ray put unix sockets under it); the env that
    talks to it. `stop_slurm(root, env)` ends it."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "start", str(root), "--nodes", "16", "--live", "16",
                    "--gpus", "8"], check=True, timeout=120)
    return {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}


def stop_slurm(root: Path, slurm_env: dict) -> None:
    import shutil

    subprocess.run(["scancel", "--full", "--user", "root"], env=slurm_env, timeout=30)
    subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "stop", str(root)], timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def slurm_job(slurm_env: dict, job: str, tries: int = 15) -> dict[str, str]:
    """The job's record. slurmctld sharing 2 busy cores with a training run sometimes does not answer
    in time (scontrol exits non-zero, prints nothing): asked again, for up to ~30 s."""
    for _ in range(tries):
        p = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True)
        info = dict(re.findall(r"(\w+)=(\S+)", p.stdout))
        if p.returncode == 0 and "JobState" in info:
            return info
        time.sleep(2)
    raise AssertionError(f"scontrol show job {job}: no answer in {tries} tries ({p.returncode}): {p.stderr.strip()}")


def slurm_why(slurm_env: dict, job: str, out: Path, info: dict[str, str]) -> str:
    """What a failed assertion shows: the job record, Slurm's own log lines on it, the job output's tail."""
    logs = Path(slurm_env["SLURM_CONF"]).parent / "log"
    ctld = [ln for ln in (logs / "slurmctld.log").read_text(errors="replace").splitlines()
            if f"JobId={job}" in ln or f"job {job}" in ln.lower() or f"StepId={job}." in ln]
    return (f"job record: {info}\nslurmctld on job {job}:\n" + "\n".join(ctld[-40:])
            + f"\njob output (tail):\n{out.read_text(errors='replace')[-5000:]}")


def preempted_tiny_job(slurm_env: dict, config_path: str, run_dir: Path, overrides: list[str], preempt_once: Path,
                       out: Path, timeout: float = 2700) -> dict[str, str]:
    """slurm/tiny_cpu.sbatch with `config_path` (two nodes, `--resume` always), sent what
    `#SBATCH --signal=B:USR1@60` sends before a time limit (checkpoint after this step, requeue) once
    `preempt_once` exists, then followed to its end; its final job record (the output is in `out`). The
    limit leaves room for the rest of the suite sharing the cores (the world runs beside it)."""
    job_env = {**env(), "SLURM_CONF": slurm_env["SLURM_CONF"], "MATPO_RUN_DIR": str(run_dir), "MATPO_HOME": str(REPO),
               "MATPO_CONFIG": config_path, "PATH": f"{REPO}/.venv/bin:{os.environ['PATH']}"}
    p = subprocess.run(["sbatch", "--parsable", f"--output={out}", "slurm/tiny_cpu.sbatch", *overrides],
                       cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    tail = lambda: out.read_text(errors="replace")[-4000:] if out.exists() else "(no output yet)"  # noqa: E731
    deadline = time.time() + timeout
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    try:
        while not preempt_once.exists():
            state = slurm_job(slurm_env, job)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state}:\n{tail()}"
            assert time.time() < deadline, f"no {preempt_once.name} in time:\n{tail()}"
            time.sleep(2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
        # the script's `scontrol requeue` cancels the running batch step first ("CANCELLED ... DUE TO JOB
        # REQUEUE"): a CANCELLED seen before the restart counter moves is that moment, not the end. The
        # requeued job then waits out its launch credential (AuthInfo cred_expire, 20 s in local_slurm.sh);
        # forcing StartTime=now skipped that guard and once failed the restart (CI, job FAILED, no output)
        while ((info := slurm_job(slurm_env, job))["JobState"] not in final
               or (info["JobState"] == "CANCELLED" and info.get("Restarts") == "0")):
            assert time.time() < deadline, f"job not done in time ({info['JobState']}):\n{tail()}"
            time.sleep(2)
    except BaseException:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)  # not left running into the next tests
        raise
    return {**info, "job": job, "why": slurm_why(slurm_env, job, out, info)}
