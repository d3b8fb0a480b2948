"""The stop protocol: how a run is asked to stop, how it says it stopped, and how a launcher reads it.

SIGUSR2 (Slurm's ``--signal=USR2@SECONDS``, ``scancel --signal=USR2``) and SIGTERM (``scancel``,
Slurm's preemption, ``kill``), :data:`STOP_SIGNALS`, ask a run to stop. Each rank notes the
signal in a :class:`StopRequest`; the ranks agree on it at the next optimizer step (an allreduce
in the training loop), rank 0 writes a checkpoint and then :data:`PREEMPTED_FILE`, and every rank
exits with :data:`EXIT_PREEMPTED`. The job script (:mod:`tsmtrain.dist.slurm`) requeues itself on
that status and :func:`tsmtrain.dist.local.launch_local` returns it; a launcher that killed a
rank still exiting returns another status, which :func:`preempted_status` corrects from the
marker. Running the same command again resumes from the checkpoint.

Imported by the training loop and checkpoints (:mod:`tsmtrain.train`), the local launcher
(:mod:`tsmtrain.dist.local`) and the Slurm rendering (:mod:`tsmtrain.dist.slurm`). This module
imports neither torch nor Horovod.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["EXIT_PREEMPTED", "PREEMPTED_FILE", "STOP_SIGNAL", "STOP_SIGNALS", "StopRequest", "preempted_status"]

EXIT_PREEMPTED = 75
"""Exit status of ``tsmtrain run`` after a stop request (SIGUSR2 or SIGTERM) made it write a
checkpoint and stop (75 is ``EX_TEMPFAIL``: try again later). The job script requeues itself on
it."""

PREEMPTED_FILE = "preempted.json"
"""Written by rank 0 in the run directory once a stop request's checkpoint is on disk, before any
rank exits. The ranks then exit :data:`EXIT_PREEMPTED`, but the launcher may report another
status: ``srun --kill-on-bad-exit`` (and mpirun, torchrun) kill the ranks still exiting as soon as
the first one has exited non-zero, and then return 128 + signal or 1. The job script and
:func:`~tsmtrain.dist.local.launch_local` read this file instead of trusting the status alone."""

STOP_SIGNAL = signal.SIGUSR2
"""The signal that asks a run to checkpoint and stop (Slurm's ``--signal=USR2@SECONDS``). Not
SIGUSR1, which NCCL may use."""

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""Every signal that asks a run to checkpoint and stop: :data:`STOP_SIGNAL`, and SIGTERM, which
``scancel`` and Slurm's preemption send (SIGKILL follows after ``KillWait``, 30 s by default)."""


class StopRequest:
    """Notes any of :data:`STOP_SIGNALS` in a flag; the training loop polls it once per optimizer
    step.

    The handler only sets the flag (nothing else is safe inside a signal handler); the ranks
    then agree through an allreduce, so that all of them stop after the same step.
    ``signal_name`` is the first signal that arrived (for the log). Use it as a context manager:
    the handlers are installed on entry (in the main thread only) and the previous ones put back
    on exit.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def preempted_status(status: int, run_dir: str | Path, since: float) -> int:
    """The exit status to act on: :data:`EXIT_PREEMPTED` when the launcher returned any non-zero
    ``status`` but ``run_dir/preempted.json`` was written at or after ``since`` (seconds since
    the epoch, the launch time), else ``status`` itself."""
    marker = Path(run_dir) / PREEMPTED_FILE
    try:
        if status != 0 and marker.stat().st_mtime >= since:
            return EXIT_PREEMPTED
    except OSError:
        pass
    return status
