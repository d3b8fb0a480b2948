"""``dist.engine: ddp``: ``torch.distributed`` with ``DistributedDataParallel`` (Li et al., "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020).

Backend NCCL when the ranks train on GPUs, Gloo on CPUs. Metrics, the stop vote, objects and
barriers go through a second, Gloo process group, so that these small CPU tensors never wait
behind (or, with NCCL, are never copied to the GPU for) the gradient buckets.

**Where the ranks come from** (:func:`rendezvous`):

* ``torchrun`` (``tsmtrain run --np N`` on this host): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` from its standalone rendezvous (``env://``);
* ``mpirun``: ``OMPI_COMM_WORLD_RANK``, ``..._SIZE``, ``..._LOCAL_RANK``;
* ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;

and outside torchrun, rank 0 listens at ``dist.master_addr`` (else ``MASTER_ADDR``, else the
first host of the Slurm allocation) and ``dist.master_port`` (else ``MASTER_PORT``, else
:func:`tsmtrain.dist.slurm.default_master_port` of the job id).

**Gradients.** ``DistributedDataParallel`` averages them in 25 MB buckets while backward runs and
has finished before ``backward()`` returns; ``broadcast_buffers=False`` keeps each rank's
BatchNorm statistics its own, as with Horovod (they are averaged at epoch ends,
:meth:`DDPEngine.average_buffers`). Gradient accumulation runs all but the last backward pass of
a step under ``no_sync()``; ``dist.fp16_allreduce`` registers DDP's ``fp16_compress_hook``.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch
from torch import nn

from . import DistError
from .base import Engine, average_flat, model_tensors
from .slurm import default_master_port, expand_nodelist, tasks_on_node

__all__ = ["DDPEngine", "Rendezvous", "rendezvous", "BUCKET_CAP_MB"]

BUCKET_CAP_MB = 25
"""DistributedDataParallel's gradient bucket size (its default), also used by
:meth:`DDPEngine.allreduce_gradients`."""


@dataclass(frozen=True)
class Rendezvous:
    """How this rank joins the job.

    Attributes:
        rank, size, local_rank, local_size: as :class:`~tsmtrain.dist.base.Engine`.
        addr, port: where rank 0 listens (``None`` under torchrun, which set ``MASTER_ADDR`` /
            ``MASTER_PORT`` itself).
        source: ``"torchrun"``, ``"mpirun"`` or ``"slurm"``.
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    addr: str | None
    port: int | None
    source: str


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise DistError(f"dist.engine: ddp: the launcher set {key}={env.get(key)!r}, not a whole number") from None


def rendezvous(dist: Any = None, environ: Mapping[str, str] | None = None) -> Rendezvous:
    """This rank's place in the job and rank 0's address, from the launcher's variables and the
    recipe's ``dist`` section (see the module docstring for the order). Pure Python, no torch.

    Raises:
        DistError: no launcher variables (not started by torchrun, mpirun or srun), a malformed
            value, or no address or port to meet at (the message names ``dist.master_addr`` /
            ``dist.master_port``).
    """
    env = os.environ if environ is None else environ
    addr_key = getattr(dist, "master_addr", None)
    port_key = getattr(dist, "master_port", None)
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_PORT" in env
                                        and "LOCAL_RANK" in env):
        size = _int(env, "WORLD_SIZE")
        return Rendezvous(_int(env, "RANK"), size, _int(env, "LOCAL_RANK"),
                          int(env.get("LOCAL_WORLD_SIZE", size)), None, None, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        source = "mpirun"
    elif "SLURM_PROCID" in env:
        rank, size, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        try:
            local_size = tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))) if per_node else size
        except ValueError:
            local_size = size
        source = "slurm"
    else:
        raise DistError("dist.engine: ddp: this process was not started by torchrun, mpirun or srun; start the "
                        "ranks with tsmtrain run --np N, or under srun / mpirun")
    addr = addr_key or env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if nodelist:
            try:
                addr = expand_nodelist(nodelist)[0]
            except (ValueError, IndexError):
                raise DistError(f"dist.master_addr: cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; "
                                "set dist.master_addr") from None
        elif local_size == size:
            addr = "127.0.0.1"
        else:
            raise DistError("dist.master_addr: no MASTER_ADDR and no Slurm allocation to take the first host from; "
                            "set dist.master_addr to rank 0's host")
    port: int | str | None = port_key or env.get("MASTER_PORT")
    if not port:
        job = env.get("SLURM_JOB_ID")
        if not job:
            raise DistError("dist.master_port: no MASTER_PORT and no Slurm job id to derive one from; set "
                            "dist.master_port")
        port = default_master_port(job)
    try:
        port = int(port)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise DistError(f"dist.master_port: {port!r} (from MASTER_PORT) is not a port number 1..65535") from None
    return Rendezvous(rank, size, local_rank, local_size, addr, port, source)


def _choose_interface(master_addr: str | None, cuda: bool, say: bool = True) -> None:
    """Set ``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME`` on GPUs, when unset) to the interface
    that reaches rank 0 when Gloo would otherwise bind to loopback
    (:func:`tsmtrain.dist.netif.choose_gloo_interface`), with one line saying so (``say``: one
    rank per host says it)."""
    from .netif import choose_gloo_interface

    chosen = choose_gloo_interface(master_addr)
    if chosen is None:
        return
    name, why = chosen
    os.environ["GLOO_SOCKET_IFNAME"] = name
    also = ""
    if cuda and not os.environ.get("NCCL_SOCKET_IFNAME"):
        os.environ["NCCL_SOCKET_IFNAME"] = name
        also = " and NCCL_SOCKET_IFNAME"
    if say:
        print(f"tsmtrain: {why}, so Gloo would bind there and the other hosts could not reach it: "
              f"GLOO_SOCKET_IFNAME{also}={name} (the interface that reaches rank 0 at {master_addr}; "
              "cluster.network_interface sets it)", file=sys.stderr, flush=True)


class DDPEngine(Engine):
    """``torch.distributed`` data parallelism; joins the process group on construction.

    Args:
        dist: the recipe's ``dist`` section (``master_addr``, ``master_port``); none: defaults.
        cuda: train on GPUs (backend NCCL, this rank's GPU selected); else Gloo.
        environ: the launcher's variables (default ``os.environ``).

    Raises:
        ImportError: this torch has no ``torch.distributed``.
        DistError: see :func:`rendezvous`; or the ranks could not meet (the message names the
            address, port and the keys that set them).
    """

    name = "ddp"

    def __init__(self, dist: Any = None, cuda: bool = False, environ: Mapping[str, str] | None = None):
        import torch.distributed as tdist

        if not tdist.is_available():
            raise ImportError("this torch build has no torch.distributed")
        self.dist = tdist
        where = rendezvous(dist, environ)
        self.rank, self.size = where.rank, where.size
        self.local_rank, self.local_size = where.local_rank, where.local_size
        self.cuda = cuda
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        if self.size > self.local_size:  # ranks on several hosts: Gloo must not bind to loopback
            _choose_interface(where.addr or os.environ.get("MASTER_ADDR"), cuda, say=self.local_rank == 0)
        try:
            if where.source == "torchrun":
                tdist.init_process_group(backend, init_method="env://")
            else:
                tdist.init_process_group(backend, init_method=f"tcp://{where.addr}:{where.port}", rank=self.rank,
                                         world_size=self.size)
            # small CPU tensors (metrics, stop vote, objects) never queue behind gradient buckets
            self.group = tdist.new_group(backend="gloo", timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError) as err:
            at = (f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} (torchrun)"
                  if where.source == "torchrun" else f"{where.addr}:{where.port} (dist.master_addr, dist.master_port)")
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistError(f"dist.engine: ddp: rank {self.rank} of {self.size} could not meet the others at {at}: "
                            f"{first}") from None
        atexit.register(self.shutdown)
        self.net: nn.Module | None = None
        self._post_local_state = None  # local SGD: the PostLocalSGDState of the hook wrap_model registered
        self._grad_ready = 0.0  # perf_counter of the last gradient computed in this step's synced pass
        self._bucket_done = 0.0  # perf_counter of the last bucket's allreduce completed
        self.buckets_allreduced = 0
        """Gradient buckets averaged so far (none during ``no_sync()`` passes)."""

    # ---- groups
    def _group_for(self, tensor: torch.Tensor):
        return None if tensor.is_cuda else self.group  # None: the default group (NCCL on GPUs)

    # ---- model
    def sync_batchnorm(self, model):
        """``torch.nn.SyncBatchNorm`` on GPUs; on CPUs (which it refuses)
        :class:`tsmtrain.dist.syncbn.SyncBatchNorm` over the Gloo group."""
        if next(model.parameters()).is_cuda:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        from .syncbn import convert_sync_batchnorm

        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.dist.all_reduce(t, group=self.group)
            return t

        return convert_sync_batchnorm(model, reduce=reduce)

    def wrap_model(self, model, fp16=False, exclude=()):
        """DDP's wrapper; ``exclude``d parameters are left to their rank
        (``_set_params_and_buffers_to_ignore_for_model``), and with none left to average the
        model is returned as it is."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        if exclude:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(exclude))
            if not any(p.requires_grad for n, p in model.named_parameters() if n not in exclude):
                return model

        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # each rank keeps its own BatchNorm statistics between epoch ends (torch >= 2.14 names the
        # switch forward_sync_buffers; both sync the buffers once at construction)
        import inspect

        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        net = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=BUCKET_CAP_MB, **{sync: False})
        hook, state = default_hooks.fp16_compress_hook if fp16 else default_hooks.allreduce_hook, None
        if self.local_sgd_from is not None:
            hook, state = self._post_local_sgd_hook(fp16)
        self._post_local_state = state

        def timed_hook(state, bucket):
            def done(fut):
                self._bucket_done = time.perf_counter()
                self.buckets_allreduced += 1
                return fut.value()

            return hook(state, bucket).then(done)

        net.register_comm_hook(state, timed_hook)
        for name, p in model.named_parameters():
            if p.requires_grad and name not in exclude:
                p.register_post_accumulate_grad_hook(self._note_gradient)
        self.net = net
        return net

    def _post_local_sgd_hook(self, fp16: bool):
        """``(hook, state)``: PyTorch's ``post_localSGD_hook`` with a ``PostLocalSGDState`` that
        allreduces the gradients (fp16-compressed with ``fp16``) before step
        :attr:`local_sgd_from` and leaves each rank's own after it
        (``post_local_gradient_allreduce=False``: no subgroup). Its step counter ``iter`` is
        set by :meth:`begin_step`, so it holds after a resume and torch.compile's check."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

        state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=self.local_sgd_from,
                                  post_local_gradient_allreduce=False)

        def hook(state, bucket):
            if fp16 and state.iter < state.start_localSGD_iter:
                return default_hooks.fp16_compress_hook(None, bucket)
            return post_localSGD_hook(state, bucket)

        return hook, state

    def begin_step(self, step):
        super().begin_step(step)
        if self._post_local_state is not None:
            self._post_local_state.iter = step

    @torch.no_grad()
    def average_model(self, model):
        """As ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` (one flat
        buffer divided by the world size, then summed), but copied back into each tensor
        instead of re-pointing ``p.data`` at the flat buffer, which would drop channels_last;
        BatchNorm's floating-point buffers go with the parameters."""
        def mean(flat):
            flat.div_(self.size)
            self.dist.all_reduce(flat, group=self._group_for(flat))

        return average_flat(model_tensors(model), mean)

    def _note_gradient(self, param) -> None:
        self._grad_ready = time.perf_counter()

    def accumulate(self, net, last):
        if not last:
            return net.no_sync() if hasattr(net, "no_sync") else nullcontext()  # (nothing to average: not wrapped)
        self._grad_ready = self._bucket_done = 0.0
        return nullcontext()

    def hidden_wait_s(self):
        """Seconds from the last gradient computed in the step's synced backward pass to the
        last bucket averaged: the allreduce that backward could not overlap with computation.
        On GPUs the completion is taken when NCCL's work is known done to the host, which may
        be earlier than the kernel's end, so the figure is a lower bound there."""
        if self._grad_ready and self._bucket_done:
            return max(0.0, self._bucket_done - self._grad_ready)
        return 0.0

    # ---- state
    @torch.no_grad()
    def broadcast_state(self, model, optimizer, exclude=None):
        for name, tensor in model.state_dict().items():
            if not (exclude and name.startswith(exclude)):
                self.dist.broadcast(tensor, src=0, group=self._group_for(tensor))
        if optimizer is None:
            return
        box = [optimizer.state_dict() if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        if self.rank != 0:
            optimizer.load_state_dict(box[0])

    def allreduce(self, values, average=True):
        out = values.clone()
        self.dist.all_reduce(out, group=self._group_for(out))
        return out / self.size if average else out

    def allreduce_async(self, values, name):
        out = values.clone()
        return self.dist.all_reduce(out, group=self._group_for(out), async_op=True), out

    def synchronize(self, handle):
        work, out = handle
        work.wait()
        return out

    def allreduce_gradients(self, grads):
        """As DDP: flat buckets of up to :data:`BUCKET_CAP_MB` MB in reverse parameter order (the
        order backward produces them), each divided by the world size and summed, on the
        default group."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        cap = BUCKET_CAP_MB * 1024 * 1024
        buckets, current, nbytes = [], [], 0
        for g in reversed(grads):
            if current and (nbytes + g.numel() * g.element_size() > cap or g.dtype != current[0].dtype):
                buckets.append(current)
                current, nbytes = [], 0
            current.append(g)
            nbytes += g.numel() * g.element_size()
        if current:
            buckets.append(current)
        flats = [_flatten_dense_tensors(b).div_(self.size) for b in buckets]
        works = [self.dist.all_reduce(f, group=self._group_for(f), async_op=True) for f in flats]
        for work in works:
            work.wait()
        for bucket, flat in zip(buckets, flats):
            for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(v)

    @torch.no_grad()
    def average_buffers(self, model):
        for buf in model.buffers():
            if buf.is_floating_point():
                self.dist.all_reduce(buf, group=self._group_for(buf))
                buf.div_(self.size)

    def allgather(self, rows, name):
        """``all_gather`` of ``rows`` padded to the longest rank's, then trimmed (the lengths
        are gathered first)."""
        group = self._group_for(rows)
        n = torch.tensor([len(rows)], device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        self.dist.all_gather(sizes, n, group=group)
        sizes = [int(s) for s in sizes]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[:len(rows)] = rows
        out = [torch.empty_like(padded) for _ in range(self.size)]
        self.dist.all_gather(out, padded, group=group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    def allgather_object(self, obj, name="object"):
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self):
        self.dist.barrier(group=self.group)

    def shutdown(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
