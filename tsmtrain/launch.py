"""Starting several ranks on this host for ``tsmtrain run RECIPE --np N``.

When ``tsmtrain run`` is not already one rank of a job (no horovodrun, mpirun or multi-task
srun around it) and more than one rank is asked for, it re-runs itself under a launcher:

* ``gloo``: ``horovodrun --gloo -np N -H localhost:N python -m tsmtrain run ...``
* ``mpi``: ``mpirun -np N --oversubscribe --bind-to none python -m tsmtrain run ...``

The children see the launcher's environment and join the job (:mod:`tsmtrain.engine`).
On a cluster, srun or mpirun starts the same command and no relaunch happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["local_command", "launch_local"]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own horovodrun
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install Horovod / OpenMPI (make setup), or use dist.launcher")
    return found


def local_command(np: int, launcher: str, run_args: list[str]) -> list[str]:
    """The command line that starts ``np`` ranks of ``python -m tsmtrain run_args...`` here.

    Raises:
        FileNotFoundError: the launcher program is not installed.
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
    raise ValueError(f"unknown launcher {launcher!r}; choose gloo or mpi")


def launch_local(np: int, launcher: str, run_args: list[str]) -> int:
    """Run :func:`local_command` in the foreground; returns its exit status."""
    cmd = local_command(np, launcher, run_args)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
