"""SIGUSR1 = "checkpoint and stop at the next step boundary": Slurm's warning before preemption or the
time limit (`#SBATCH --signal=B:USR1@T`, forwarded by launch/ray_cluster.sh). Installed first thing in
`matpo train`, because the default action of SIGUSR1 kills the process (a warning during bring-up
must not)."""
from __future__ import annotations

import signal
import threading

STOP = threading.Event()
EXIT_CODE = 75  # EX_TEMPFAIL: the Slurm scripts requeue the job on it


class Preempted(Exception):
    """The run stopped on SIGUSR1 at a step boundary, after a checkpoint; `--resume` continues it."""

    exit_code = EXIT_CODE


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: STOP.set())
