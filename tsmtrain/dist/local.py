"""Starting ranks on this host (``tsmtrain run --np N``).

When ``tsmtrain run`` is not already one rank of a job (no horovodrun, mpirun, torchrun or
multi-task srun around it) and more than one rank is asked for, it re-runs itself under a
launcher (``dist.launcher``; by default the engine's own):

* ``gloo`` (Horovod's default): ``horovodrun --gloo -np N -H localhost:N python -m tsmtrain run ...``
* ``mpi`` (Horovod): ``mpirun -np N --oversubscribe --bind-to none python -m tsmtrain run ...``
* ``torchrun`` (DDP's default): ``torchrun --standalone --nproc-per-node N --no-python python -m tsmtrain run ...``;
  the standalone rendezvous listens on a free port of this host.

The children see the launcher's environment and join the job (:mod:`tsmtrain.dist`). On a
cluster, srun or mpirun starts the same command and no relaunch happens (:mod:`tsmtrain.dist.slurm`).

**Stopping** follows :mod:`tsmtrain.dist.stop`: SIGUSR2 or SIGTERM sent to the launching process is
passed on to the ranks as a stop request, and :func:`launch_local` returns
:data:`~tsmtrain.dist.stop.EXIT_PREEMPTED` when they stopped that way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .stop import STOP_SIGNALS, preempted_status

__all__ = ["local_command", "launch_local", "default_launcher", "LAUNCHERS"]

LAUNCHERS = {"horovod": ("gloo", "mpi"), "ddp": ("torchrun",), "none": ()}
"""The ``dist.launcher`` values each engine can use on this host; the first is the default."""


def default_launcher(engine: str, launcher: str | None) -> str | None:
    """``launcher`` when given, else the engine's own (``gloo`` for Horovod, ``torchrun`` for DDP;
    ``None`` for ``dist.engine: none``)."""
    if launcher is not None:
        return launcher
    return (LAUNCHERS.get(engine) or (None,))[0]


_MISSING = {
    "horovodrun": "horovodrun not found beside {python} or on PATH: install Horovod (make setup), or set "
                  "dist.launcher: mpi",
    "mpirun": "mpirun not found: install OpenMPI (make setup), or set dist.launcher: gloo",
    "torchrun": "dist.engine: ddp: torchrun not found beside {python} or on PATH: install torch (make setup)",
}


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own horovodrun / torchrun
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(_MISSING.get(name, f"{name} not found").format(python=sys.executable))
    return found


def local_command(np: int, launcher: str, run_args: list[str]) -> list[str]:
    """The command line that starts ``np`` ranks of ``python -m tsmtrain run_args...`` here.

    Raises:
        FileNotFoundError: the launcher program is not installed (the message says what to do).
        ValueError: unknown launcher.
    """
    child = [sys.executable, "-m", "tsmtrain", *run_args]
    if launcher == "gloo":
        return [_tool("horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}", *child]
    if launcher == "mpi":
        cmd = [_tool("mpirun"), "-np", str(np), "--oversubscribe", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        return [*cmd, "-x", "PATH", "-x", "PYTHONPATH", *child]
    if launcher == "torchrun":
        return [_tool("torchrun"), "--standalone", f"--nproc-per-node={np}", "--no-python", *child]
    raise ValueError(f"unknown launcher {launcher!r}; choose gloo, mpi or torchrun")


def _ranks_below(pid: int) -> list[int]:
    """The processes under ``pid`` started as ``python -m tsmtrain ...`` (the ranks, and their
    loader workers, which ignore stop signals), not the launcher's own helpers."""
    import psutil

    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for proc in children:
        try:
            if proc.cmdline()[1:3] == ["-m", "tsmtrain"]:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def launch_local(np: int, launcher: str, run_args: list[str], run_dir: str | Path | None = None) -> int:
    """Run :func:`local_command` in the foreground; returns its exit status.

    SIGUSR2 or SIGTERM sent to this process becomes a stop request of the ranks, as under Slurm:
    mpirun passes SIGUSR2 on to every rank itself; horovodrun and torchrun would die of it (or
    kill the ranks on SIGTERM), so there it goes straight to the ranks. When ``run_dir`` is
    given and the ranks stopped that way (:data:`~tsmtrain.dist.stop.PREEMPTED_FILE`), the status is
    :data:`~tsmtrain.dist.stop.EXIT_PREEMPTED` even if the launcher killed a rank that was still exiting.

    Raises:
        FileNotFoundError: the launcher program is not installed.
    """
    import signal
    import time

    cmd = local_command(np, launcher, run_args)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    started = time.time() - 1  # file times may be rounded to the second
    child = subprocess.Popen(cmd)

    def stop_request(signum, frame) -> None:
        if launcher == "mpi":
            child.send_signal(signal.SIGUSR2)
            return
        for pid in _ranks_below(child.pid):
            try:
                os.kill(pid, signal.SIGUSR2)
            except OSError:
                pass

    previous = {sig: signal.signal(sig, stop_request) for sig in STOP_SIGNALS}
    try:
        status = child.wait()
        return status if run_dir is None else preempted_status(status, run_dir, started)
    except KeyboardInterrupt:
        child.wait()
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
