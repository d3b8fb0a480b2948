"""The interface between the training loop and data parallelism, and the single-process engine.

The training loop and its step (:class:`tsmtrain.train.step.TrainStep`) talk to :class:`Engine` only.
Its implementations:

* :class:`LocalEngine` for ``dist.engine: none`` (or one process started by hand): nothing to
  combine.
* :class:`tsmtrain.dist.horovod.HorovodEngine`: Horovod (Sergeev and Del Balso 2018)
  ring-allreduce inside ``hvd.DistributedOptimizer``.
* :class:`tsmtrain.dist.ddp.DDPEngine`: ``torch.distributed`` with ``DistributedDataParallel``
  (Li et al., VLDB 2020), bucketed allreduce during backward.

Every rank runs the same loop. A step is (:class:`tsmtrain.train.step.TrainStep`, which also
holds the learning rate and fp16's gradient scaler)::

    with engine.accumulate(net, last=...):     # DDP: no_sync() on all but the last backward pass
        loss(net(x)).backward()                # gradients are averaged during backward
    engine.wait_gradients(optimizer)           # whatever of the allreduce backward did not hide
    with engine.skip_synchronize(optimizer):   # Horovod: the step must not wait again
        optimizer.step()

where ``net = engine.wrap_model(model)`` and ``optimizer = engine.wrap_optimizer(...)``;
``model`` itself stays the plain network that is evaluated and checkpointed. Rank 0's initial
state is broadcast (:meth:`Engine.broadcast_state`), so all ranks start identical; metrics are
summed with :meth:`Engine.allreduce`.

Under post-local SGD (``dist.sync: local_sgd``, :mod:`tsmtrain.dist.local_sgd`) the engine is told
the start step before it wraps anything (:meth:`Engine.use_local_sgd`) and each step's number
before its backward passes (:meth:`Engine.begin_step`); from the start on the gradients stay
each rank's own, and the models are averaged every H steps (:meth:`Engine.average_model`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import nn

__all__ = ["Engine", "LocalEngine", "describe_rank", "describe_builds", "model_tensors", "average_flat"]


class Engine:
    """What the training loop needs from data parallelism.

    Attributes:
        rank: this process's index in ``0 .. size-1``.
        size: the world size (number of ranks).
        local_rank: index among the ranks on this host (selects the GPU).
        local_size: ranks on this host.
        name: ``"none"``, ``"horovod"`` or ``"ddp"``.
    """

    name = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1
    local_sgd_from: int | None = None
    """Post-local SGD (:meth:`use_local_sgd`): the first optimizer step (counted from 0) that uses
    this rank's own gradients; ``None``: every step averages them."""
    local_gradients = False
    """Whether the optimizer step in progress (:meth:`begin_step`) uses this rank's own gradients."""

    def use_local_sgd(self, start_step: int) -> None:
        """Post-local SGD (``dist.sync: local_sgd``): optimizer steps ``0 .. start_step - 1``
        average the gradients as usual, later ones use each rank's own (DDP: PyTorch's
        ``post_localSGD_hook``; Horovod: its allreduce replaced by the rank's own gradient). Call
        it before :meth:`wrap_model` and :meth:`wrap_optimizer`; the ranks' models are then
        averaged by :meth:`average_model` (:class:`tsmtrain.dist.local_sgd.LocalSGD`)."""
        self.local_sgd_from = start_step

    def begin_step(self, step: int) -> None:
        """Say which optimizer step (counted from 0) the next backward passes belong to, before
        the first of them: with :meth:`use_local_sgd` it decides whether their gradients are
        averaged (:attr:`local_gradients`)."""
        self.local_gradients = self.local_sgd_from is not None and step >= self.local_sgd_from

    @torch.no_grad()
    def average_model(self, model: nn.Module) -> int:
        """Average ``model``'s parameters and floating-point buffers (BatchNorm statistics) over
        all ranks in place, in one flat allreduce (:func:`model_tensors`); the optimizer's state
        (momentum) is left alone. Returns the bytes allreduced (this rank's share, as sent)."""
        return 0

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``model`` with every BatchNorm layer synchronized over all ranks (``model.sync_bn``):
        in training, each layer normalizes with the mean and variance of the global batch, not
        of this rank's share. Parameters and buffers are kept. One process: ``model`` as it is."""
        return model

    def wrap_model(self, model: nn.Module, fp16: bool = False, exclude: tuple[str, ...] = ()) -> nn.Module:
        """The module the training step runs forward and backward through (DDP's wrapper, which
        averages the gradients during backward; ``fp16``: compressed to float16 for the
        allreduce). ``exclude``: names of parameters whose gradients are not averaged (a
        sharded head's). Evaluation and checkpoints use ``model`` itself."""
        return model

    def accumulate(self, net: nn.Module, last: bool) -> ContextManager:
        """Context for one forward and backward pass of gradient accumulation
        (``dist.backward_passes_per_step``): when not ``last``, the gradients stay local
        (DDP's ``no_sync()``); Horovod's optimizer counts the passes itself."""
        return nullcontext()

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool = False,
                       backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
        """Return an optimizer whose ``step`` uses gradients averaged over all ranks (of
        ``optimizer``'s parameters, which may be a subset of ``model``'s)."""
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        exclude: str | None = None) -> None:
        """Make every rank's parameters, buffers and optimizer state equal to rank 0's; state
        names starting with ``exclude`` (a sharded head's, ``"fc."``) stay each rank's own, and
        ``optimizer`` must then hold none of them (``None``: no optimizer state to send)."""

    def wait_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait until the gradient allreduce started during backward has finished (Horovod:
        ``optimizer.synchronize()``).

        Together with the step under :meth:`skip_synchronize` this is ``optimizer.step()`` split
        in two, so that the training step can time the part of the allreduce that backward did
        not hide, and unscale fp16 gradients after they are averaged.
        """

    def hidden_wait_s(self) -> float:
        """Seconds of the last step's allreduce that ran after the last gradient was computed
        but that backward itself waited for (DDP finishes its allreduce before ``backward()``
        returns, so :meth:`wait_gradients` finds nothing left). The training step moves them
        from the forward-backward time to the allreduce wait. 0 for Horovod and one process."""
        return 0.0

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> ContextManager:
        """Context for the optimizer step after :meth:`wait_gradients`: the step uses the
        gradients averaged already and starts no allreduce of its own (Horovod:
        ``optimizer.skip_synchronize()``; a no-op for the other engines)."""
        return nullcontext()

    def allreduce(self, values: torch.Tensor, average: bool = True) -> torch.Tensor:
        """Sum (or average) a floating-point tensor over all ranks (metrics are float64); returns
        a new tensor."""
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

    def allreduce_gradients(self, grads: list[torch.Tensor]) -> None:
        """Average ``grads`` over all ranks in place, the way this engine does it in training
        (Horovod: one named asynchronous allreduce per tensor, fused by its background thread;
        DDP: flat buckets of 25 MB), and wait for the result. Used by
        :func:`tsmtrain.bench.allreduce.benchmark_allreduce` to time the allreduce on its own."""
        handles = [self.allreduce_async(g, name=f"allreduce_benchmark.{i}") for i, g in enumerate(grads)]
        for h in handles:
            self.synchronize(h)

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean and variance) over all ranks.

        Each rank's BatchNorm statistics come from its own part of the batch; averaging them before
        evaluation and checkpointing makes every rank hold the same model (as timm's
        ``distribute_bn(reduce=True)``).
        """

    def allgather(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Every rank's ``rows`` ``(n_r, ...)`` concatenated along dim 0 in rank order,
        ``(sum n_r, ...)``, on every rank; the ``n_r`` may differ, the other dimensions and the
        dtype may not. Not differentiable (see :mod:`tsmtrain.dist.head_parallel`). ``name``
        must be the same on every rank."""
        return rows.clone()

    def allgather_object(self, obj: Any, name: str = "object") -> list[Any]:
        """Gather one picklable object from every rank, in rank order. ``name`` must be the same
        on every rank (Horovod matches collectives by name)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def shutdown(self) -> None:
        """Release the communication library."""


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What local SGD averages: every parameter and every floating-point buffer of ``model``
    (BatchNorm's running mean and variance; not its integer batch counter), in a fixed order."""
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


@torch.no_grad()
def average_flat(tensors: list[torch.Tensor], allreduce_mean) -> int:
    """Average ``tensors`` over the ranks in place through one flat buffer:
    ``allreduce_mean(flat)`` must replace the 1-D ``flat`` by its mean over the ranks (in place).
    Each tensor keeps its object, dtype and memory format (channels_last). Returns the bytes of
    ``flat``."""
    if not tensors:
        return 0
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    allreduce_mean(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return flat.numel() * flat.element_size()


class LocalEngine(Engine):
    """A single process: gradients and metrics are used as they are."""


def describe_rank(engine: Engine) -> dict[str, Any]:
    """What this process sees of the job: rank, local rank, world size, host, engine, devices,
    and the launcher's own variables (``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ``RANK``, ...)."""
    import socket

    env_keys = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID",
                "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                "PMIX_RANK", "HOROVOD_RANK", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES")
    cuda = torch.cuda.is_available()
    return {
        "rank": engine.rank, "local_rank": engine.local_rank, "size": engine.size, "local_size": engine.local_size,
        "host": socket.gethostname(), "pid": os.getpid(), "engine": engine.name,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "launcher_env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }


def describe_builds() -> list[str]:
    """What the communication libraries were built with, one line each: Horovod (NCCL, CUDA,
    MPI, Gloo) and torch.distributed (NCCL, CUDA, MPI, Gloo, the GPUs visible)."""
    import torch.distributed as tdist

    def yes(flag) -> str:
        return "yes" if flag else "no"

    lines = []
    try:
        from .horovod import build_info

        info = build_info()
        nccl = info["nccl"]
        version = f"yes ({nccl // 10000}.{nccl // 100 % 100}.{nccl % 100})" if nccl else "no"
        lines.append(f"horovod {info['version']}: NCCL {version}, "
                     f"CUDA {yes(info['cuda'])}, MPI {yes(info['mpi'])}, Gloo {yes(info['gloo'])}")
    except ImportError as err:
        lines.append(f"horovod: not installed ({err}); make setup builds it")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if tdist.is_nccl_available() and torch.version.cuda else ""
    lines.append(f"torch {torch.__version__} distributed: NCCL {f'yes ({nccl})' if nccl else 'no'}, "
                 f"CUDA {torch.version.cuda or 'no'}, MPI {yes(tdist.is_mpi_available())}, "
                 f"Gloo {yes(tdist.is_gloo_available())}; GPUs visible: {torch.cuda.device_count()}")
    return lines
