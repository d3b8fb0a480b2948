"""Distributed engines: who am I, how are gradients and metrics combined.

The training loop talks to a small interface, :class:`Engine`, with two implementations:

* :class:`LocalEngine` for ``dist.engine: none``: one process, nothing to combine.
* :class:`HorovodEngine`: Horovod (Sergeev and Del Balso 2018) data parallelism with
  ring-allreduce of the gradients. Ranks come from whatever started the processes:
  ``horovodrun`` (Gloo), ``mpirun``, or ``srun --mpi=pmix`` (MPI).

Every rank runs the same loop; gradients are averaged by ``hvd.DistributedOptimizer`` during
the backward pass, and rank 0's initial parameters and optimizer state are broadcast so that all
ranks start identical.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["Engine", "LocalEngine", "HorovodEngine", "create_engine", "launched_by_launcher", "describe_rank"]

LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launched_by_launcher() -> bool:
    """True when this process is one rank of a job started by horovodrun, mpirun or srun."""
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


class Engine:
    """What the training loop needs from data parallelism.

    Attributes:
        rank: this process's index in ``0 .. size-1``.
        size: the world size (number of ranks).
        local_rank: index among the ranks on this host (selects the GPU).
        local_size: ranks on this host.
        name: ``"none"`` or ``"horovod"``.
    """

    name = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool = False,
                       backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
        """Return an optimizer whose ``step`` uses gradients averaged over all ranks."""
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank's parameters, buffers and optimizer state equal to rank 0's."""

    def wait_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait until the gradient allreduce started during backward has finished.

        Together with :meth:`step` this is ``optimizer.step()`` split in two, so that the
        training loop can time the part of the allreduce that backward did not hide.
        """

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the averaged gradients (after :meth:`wait_gradients`)."""
        optimizer.step()

    def allreduce(self, values: torch.Tensor, average: bool = True) -> torch.Tensor:
        """Sum (or average) a float64 tensor over all ranks; returns a new tensor."""
        return values.clone()

    def allreduce_async(self, values: torch.Tensor, name: str) -> Any:
        """Start summing a tensor over all ranks; :meth:`synchronize` gives the
        result. Horovod runs it in its background thread, fused with the gradient allreduces of
        the same step, so waiting for it at the end of the step costs nothing extra. Every rank
        must start the same ``name`` in the same order, and finish it before starting it again."""
        return values.clone()

    def synchronize(self, handle: Any) -> torch.Tensor:
        """The sum started by :meth:`allreduce_async`."""
        return handle

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean and variance) over all ranks.

        Each rank's BatchNorm statistics come from its own shard; averaging them before
        evaluation and checkpointing makes every rank hold the same model (as timm's
        ``distribute_bn(reduce=True)``).
        """

    def allgather_object(self, obj: Any, name: str = "object") -> list[Any]:
        """Gather one picklable object from every rank, in rank order. ``name`` must be the same
        on every rank (Horovod matches collectives by name)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Release the communication library."""


class LocalEngine(Engine):
    """A single process: gradients and metrics are used as they are."""


class HorovodEngine(Engine):
    """Horovod data parallelism. ``hvd.init()`` is called on construction.

    Raises:
        ImportError: Horovod with PyTorch support is not installed.
    """

    name = "horovod"

    def __init__(self):
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def wrap_optimizer(self, optimizer, model, fp16=False, backward_passes_per_step=1):
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
            backward_passes_per_step=backward_passes_per_step,
            op=hvd.Average,
        )

    def broadcast_state(self, model, optimizer):
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # hvd.broadcast_optimizer_state would first take a dummy step on an empty state, which
        # applies weight decay and seeds the momentum buffers; sending rank 0's state_dict
        # keeps a fresh optimizer fresh and a resumed one exact.
        # (the name must be given: by default Horovod names the collective after the object's
        # type, which differs between rank 0 and the others and deadlocks)
        state = self.hvd.broadcast_object(optimizer.state_dict() if self.rank == 0 else None, root_rank=0,
                                          name="optimizer_state")
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def wait_gradients(self, optimizer):
        optimizer.synchronize()

    def step(self, optimizer):
        with optimizer.skip_synchronize():  # synchronize() already ran in wait_gradients
            optimizer.step()

    def allreduce(self, values, average=True):
        op = self.hvd.Average if average else self.hvd.Sum
        return self.hvd.allreduce(values, op=op, name=None)

    def allreduce_async(self, values, name):
        return self.hvd.allreduce_async(values, op=self.hvd.Sum, name=name)

    def synchronize(self, handle):
        return self.hvd.synchronize(handle)

    @torch.no_grad()
    def average_buffers(self, model):
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(self.hvd.allreduce(buf, op=self.hvd.Average, name=f"buffer.{name}"))

    def allgather_object(self, obj, name="object"):
        return self.hvd.allgather_object(obj, name=name)

    def barrier(self):
        self.hvd.barrier()

    def shutdown(self):
        self.hvd.shutdown()


def describe_rank(engine: Engine) -> dict[str, Any]:
    """What this process sees of the job: rank, local rank, world size, host, engine, devices,
    and the launcher's own variables (``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ...)."""
    import socket

    env_keys = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID",
                "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                "PMIX_RANK", "HOROVOD_RANK", "CUDA_VISIBLE_DEVICES")
    cuda = torch.cuda.is_available()
    return {
        "rank": engine.rank, "local_rank": engine.local_rank, "size": engine.size, "local_size": engine.local_size,
        "host": socket.gethostname(), "pid": os.getpid(), "engine": engine.name,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "launcher_env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }


def create_engine(name: str) -> Engine:
    """``"none"`` gives :class:`LocalEngine`, ``"horovod"`` :class:`HorovodEngine`."""
    if name == "none":
        return LocalEngine()
    if name == "horovod":
        return HorovodEngine()
    raise ValueError(f"unknown engine {name!r}; choose horovod or none")
