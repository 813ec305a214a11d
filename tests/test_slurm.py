"""The Slurm scripts against a real local Slurm (tools/local_slurm.sh: slurmctld + 16 slurmd on
127.0.0.1, 8 fake GPUs each): lint, `sbatch --test-only` of the 16-node jobs, and the tiny CPU job
through the same common.sh + launch/ray_cluster.sh, across two nodes, preempted (SIGUSR1 as from
`--signal`), requeued, and resumed from its checkpoint.

Needs root and the Debian packages of tools/setup_slurm.sh (the README's test command installs them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import check_invariants

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), REPO / "slurm/common.sh", *REPO.glob("launch/*.sh"),
                  *REPO.glob("tools/*.sh")])


def _have_slurm() -> str | None:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "shellcheck") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed (bash tools/setup_slurm.sh)"
    if os.geteuid() != 0:
        return "a local Slurm needs root"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _have_slurm()
    if why:
        pytest.skip(why)
    # a short path: munge and Ray put unix sockets under it
    root = Path(f"/tmp/matpo-slurm-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "start", str(root), "--nodes", "16", "--live", "16",
                    "--gpus", "8"], check=True, timeout=120)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, timeout=30)
        subprocess.run(["bash", str(REPO / "tools/local_slurm.sh"), "stop", str(root)], timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_scripts_parse_and_lint():
    why = _have_slurm()
    if why and "shellcheck" in why:
        pytest.skip(why)
    for f in SCRIPTS:
        subprocess.run(["bash", "-n", str(f)], check=True)
    p = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("script,nodes", [("matpo_14b.sbatch", "node[1-16]"),
                                          ("single_agent_14b.sbatch", "node[1-16]"), ("eval_14b.sbatch", "node1"),
                                          ("maporl_2agent.sbatch", "node[1-2]")])
def test_sbatch_test_only_accepts_the_cluster_jobs(slurm, script, nodes):
    """The cluster jobs' resource headers (up to 16 nodes x 8 GPUs, exclusive) fit a 16 x 8-GPU cluster."""
    p = subprocess.run(["sbatch", "--test-only", f"slurm/{script}"], cwd=REPO, env=slurm, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"to start at .* on nodes {re.escape(nodes)}", p.stderr), p.stderr


def _why(env: dict, job: str, out: Path, info: dict[str, str]) -> str:
    """What a failed assertion shows: the job record, Slurm's own log lines on it, the job output's tail."""
    logs = Path(env["SLURM_CONF"]).parent / "log"
    ctld = [ln for ln in (logs / "slurmctld.log").read_text(errors="replace").splitlines()
            if f"JobId={job}" in ln or f"job {job}" in ln.lower() or f"StepId={job}." in ln]
    return (f"job record: {info}\nslurmctld on job {job}:\n" + "\n".join(ctld[-40:])
            + f"\njob output (tail):\n{out.read_text(errors='replace')[-5000:]}")


def _job(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_tiny_job_two_nodes_preempted_requeued_resumed(slurm, inputs, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    env = {**slurm, "MATPO_RUN_DIR": str(run), "MATPO_HOME": str(REPO),
           "PATH": f"{REPO}/.venv/bin:{os.environ['PATH']}"}
    p = subprocess.run(["sbatch", "--parsable", f"--output={out}", "slurm/tiny_cpu.sbatch", "steps=3",
                        "checkpoint.every=1", "loss.kl_coef=0.001", "eval.every=3", "eval.max_prompts=2", *inputs],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]

    deadline = time.time() + 900
    while not (run / "checkpoints" / "step_000001").exists():
        state = _job(env, job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state}:\n{out.read_text()[-4000:]}"
        assert time.time() < deadline, f"no step-1 checkpoint in time:\n{out.read_text()[-4000:]}"
        time.sleep(1)
    # what `#SBATCH --signal=B:USR1@60` sends before the time limit: checkpoint after this step, requeue
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)

    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    # the script's `scontrol requeue` cancels the running batch step first ("CANCELLED ... DUE TO JOB
    # REQUEUE"): a CANCELLED seen before the restart counter moves is that moment, not the end. The
    # requeued job then waits out its launch credential (AuthInfo cred_expire, 20 s in local_slurm.sh);
    # forcing StartTime=now skipped that guard and once failed the restart (CI, job FAILED, no output)
    while ((info := _job(env, job)).get("JobState") not in final
           or (info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0")):
        assert time.time() < deadline, f"job not done in time ({info.get('JobState')}):\n{out.read_text()[-4000:]}"
        time.sleep(2)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _why(env, job, out, info)
    assert info["Restarts"] == "1", log[-6000:]  # requeued once, by the script itself
    assert "requeueing job" in log and "preempted" in log
    # both starts: Ray across both Slurm nodes, and the trainer's bundles on both Ray nodes
    assert log.count("Ray cluster at") == 2 and re.search(r"Ray cluster at \S+: 2 nodes", log), log[-6000:]
    assert re.search(r"placement: 4 bundles on 2 Ray node\(s\)", log), log[-6000:]
    assert re.search(r"resumed from \S+step_000002 at step 2", log), log[-6000:]
    m = {d["step"]: d for d in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(m) == [1, 2, 3]  # step 3 once, by the resumed run; nothing redone
    check_invariants(m)  # every sync over the broadcast group reached the engine on the other node
    # the frozen reference (loss.kl_coef > 0) starts equal to the actor: KL 0 at step 1
    assert m[1]["actor/ref_kl"] == pytest.approx(0.0, abs=1e-7) and "actor/kl" in m[1]
    # eval after step 3 (by the resumed run) on the val questions, its transcripts beside the steps'
    assert any(k.startswith("eval/") and k.endswith("accuracy") for k in m[3]), sorted(m[3])
    assert not any(k.startswith("eval/") for s in (1, 2) for k in m[s])
    assert (run / "rollouts" / "eval_000003.jsonl").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert (run / "hf" / "model.safetensors").exists()
