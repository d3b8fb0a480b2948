"""How ranks start and talk: the distributed engines, the launch on this host, and Slurm jobs.

* :mod:`tsmtrain.dist.base`: the :class:`~tsmtrain.dist.base.Engine` interface the training loop
  talks to, and :class:`~tsmtrain.dist.base.LocalEngine` (one process).
* :mod:`tsmtrain.dist.horovod`: :class:`~tsmtrain.dist.horovod.HorovodEngine`,
  ``dist.engine: horovod`` (ring-allreduce through ``hvd.DistributedOptimizer``).
* :mod:`tsmtrain.dist.ddp`: :class:`~tsmtrain.dist.ddp.DDPEngine`, ``dist.engine: ddp``
  (``torch.distributed`` with ``DistributedDataParallel``; NCCL on GPUs, Gloo on CPUs).
* :mod:`tsmtrain.dist.syncbn`: synchronized BatchNorm (``model.sync_bn``) for both engines.
* :mod:`tsmtrain.dist.head_parallel`: a classifier sharded across ranks (``model.head_parallel``):
  gathered features, the vocabulary-parallel cross-entropy, for both engines.
* :mod:`tsmtrain.dist.local_sgd`: ``dist.sync``: synchronous allreduce or post-local SGD (when the
  ranks' models are averaged) and the bytes allreduced per step.
* :mod:`tsmtrain.dist.local`: ``tsmtrain run --np N`` on this host (horovodrun, mpirun or
  torchrun).
* :mod:`tsmtrain.dist.stop`: the stop protocol every launch shares (the stop signals,
  :data:`~tsmtrain.dist.stop.EXIT_PREEMPTED`, ``preempted.json``); no torch.
* :mod:`tsmtrain.dist.slurm`: the sbatch script (``templates/job.sbatch.j2``), ``tsmtrain submit``,
  and where DDP ranks meet under srun. It never imports torch, so rendering a job is fast and
  works on a login node without it.

This module itself imports neither torch nor Horovod: the engines are imported when created.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Engine

__all__ = ["ENGINES", "DistError", "create_engine", "launched_by_launcher", "LAUNCHER_VARIABLES", "peer_failure"]

ENGINES = ("horovod", "ddp", "none")
"""The values of ``dist.engine``."""

LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "TORCHELASTIC_RUN_ID")
"""Variables that only a launcher's children have: horovodrun, mpirun, srun --mpi=pmix, torchrun."""


_PEER_GONE = ("Horovod has been shut down", "Connection closed by peer", "Connection reset by peer",
              "Broken pipe", "NCCL communicator was aborted", "Socket Timeout")


def peer_failure(exc: BaseException) -> str | None:
    """One line saying that another rank failed, when ``exc`` is how this rank learnt it (a
    collective that broke because a peer exited or aborted: Horovod's ``HorovodInternalError``
    after its shutdown, Gloo's "Connection closed by peer", an aborted NCCL communicator);
    ``None`` for any other exception. The failing rank prints its own error; the others print
    this line instead of a traceback of the collective they were waiting in."""
    text = str(exc)
    if type(exc).__name__ == "HorovodInternalError" or any(s in text for s in _PEER_GONE):
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        return f"another rank failed or left (its own error is above), so this rank stops too: {first[:200]}"
    return None


class DistError(UserError):
    """The ranks cannot start or meet for a reason the user can fix; the message names the
    recipe key (``dist.master_port``, ...) or the missing program."""


def launched_by_launcher(environ: dict | None = None) -> bool:
    """True when this process is one rank of a job started by horovodrun, mpirun, torchrun or a
    multi-task srun (``SLURM_NTASKS`` > 1 with a ``SLURM_PROCID``)."""
    env = os.environ if environ is None else environ
    if any(v in env for v in LAUNCHER_VARIABLES):
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env


def create_engine(name: str, dist: Any = None, cuda: bool = False) -> "Engine":
    """The engine for ``dist.engine``.

    Args:
        name: ``"none"`` (:class:`~tsmtrain.dist.base.LocalEngine`), ``"horovod"``
            (:class:`~tsmtrain.dist.horovod.HorovodEngine`) or ``"ddp"``
            (:class:`~tsmtrain.dist.ddp.DDPEngine`).
        dist: the recipe's ``dist`` section (DDP reads ``master_addr`` / ``master_port``); none:
            the defaults.
        cuda: the ranks train on GPUs (DDP then uses NCCL for the gradients).

    Raises:
        ImportError: Horovod (or torch.distributed) is not installed.
        DistError: the DDP ranks cannot meet (the message names the key to fix).
        ValueError: an unknown name.
    """
    if name == "none":
        from .base import LocalEngine

        return LocalEngine()
    if name == "horovod":
        from .horovod import HorovodEngine

        return HorovodEngine()
    if name == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(dist, cuda=cuda)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
