"""The Slurm scripts against a real local Slurm (tools/local_slurm.sh: slurmctld + 16 slurmd on
127.0.0.1, 8 fake GPUs each; the `slurm` fixture of conftest.py): lint and `sbatch --test-only` of the
16-node jobs. The tiny CPU job through the same common.sh + launch/ray_cluster.sh, across two nodes,
preempted (SIGUSR1 as from `--signal`), requeued and resumed, is part of the MATPO world in
tests/test_train.py (its second half runs as that job).

Needs root and the Debian packages of tools/setup_slurm.sh (the README's test command installs them).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e import slurm_missing

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), REPO / "slurm/common.sh", *REPO.glob("launch/*.sh"),
                  *REPO.glob("tools/*.sh")])


def test_scripts_parse_and_lint():
    why = slurm_missing()
    if why and "shellcheck" in why:
        pytest.skip(why)
    for f in SCRIPTS:
        subprocess.run(["bash", "-n", str(f)], check=True)
    p = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("script,nodes", [("matpo_14b.sbatch", 16), ("single_agent_14b.sbatch", 16),
                                          ("eval_14b.sbatch", 1), ("maporl_2agent.sbatch", 2)])
def test_sbatch_test_only_accepts_the_cluster_jobs(slurm, script, nodes):
    """The cluster jobs' resource headers (up to 16 nodes x 8 GPUs, exclusive) fit a 16 x 8-GPU cluster.
    Which nodes Slurm names depends on what else holds nodes (the MATPO world's job runs beside this), so
    the check is the number of nodes it would start on, expanded by Slurm itself."""
    p = subprocess.run(["sbatch", "--test-only", f"slurm/{script}"], cwd=REPO, env=slurm, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    found = re.search(r"to start at .* on nodes (\S+)", p.stderr)
    assert found, p.stderr
    hosts = subprocess.run(["scontrol", "show", "hostnames", found.group(1)], env=slurm, capture_output=True,
                           text=True, timeout=60, check=True).stdout.split()
    assert len(hosts) == nodes, p.stderr
