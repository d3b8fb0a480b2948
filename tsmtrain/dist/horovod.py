"""``dist.engine: horovod``: Horovod data parallelism (Sergeev and Del Balso 2018).

Gradients are averaged by ``hvd.DistributedOptimizer`` (named parameters, ring-allreduce fused
by Horovod's background thread, optional fp16 compression, ``backward_passes_per_step`` for
gradient accumulation); rank 0's parameters and optimizer state are broadcast at start. Ranks
come from whatever started the processes: ``horovodrun`` (Gloo), ``mpirun``, or
``srun --mpi=pmix`` (MPI). Built by ``make setup`` with NCCL where nvcc is found
(``tsmtrain env`` prints what it was built with).
"""

from __future__ import annotations

import torch

from .base import Engine, average_flat, model_tensors

__all__ = ["HorovodEngine", "build_info"]


def build_info() -> dict[str, object]:
    """What the installed Horovod was built with: ``{"version", "nccl" (NCCL version code, 0 when
    built without), "cuda", "mpi", "gloo"}`` (no ``hvd.init()`` needed).

    Raises:
        ImportError: Horovod with PyTorch support is not installed.
    """
    import horovod
    import horovod.torch as hvd

    return {"version": horovod.__version__, "nccl": int(hvd.nccl_built()), "cuda": bool(hvd.cuda_built()),
            "mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built())}


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

    def sync_batchnorm(self, model):
        """``hvd.SyncBatchNorm`` on GPUs; on CPUs (which it refuses)
        :class:`tsmtrain.dist.syncbn.SyncBatchNorm` over Horovod's allreduce."""
        from .syncbn import convert_sync_batchnorm

        if next(model.parameters()).is_cuda:
            return convert_sync_batchnorm(model, lambda bn: self.hvd.SyncBatchNorm(
                bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats))
        hvd = self.hvd
        return convert_sync_batchnorm(model, reduce=lambda t: hvd.allreduce(t, op=hvd.Sum, name="sync_bn"))

    def wrap_optimizer(self, optimizer, model, fp16=False, backward_passes_per_step=1):
        hvd = self.hvd
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}  # not a sharded head's
        wrapped = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=[(name, p) for name, p in model.named_parameters() if id(p) in mine],
            compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none,
            backward_passes_per_step=backward_passes_per_step,
            op=hvd.Average,
        )
        if self.local_sgd_from is not None:
            self._local_after_start(wrapped)
        return wrapped

    def _local_after_start(self, optimizer) -> None:
        """Post-local SGD with Horovod, which has no built-in form: while :attr:`local_gradients`,
        the optimizer's allreduce of a gradient (started by its backward hooks, or by
        ``synchronize()`` for one that is missing) is replaced by a handle that gives the rank's
        own gradient back at once, so that its bookkeeping (``backward_passes_per_step``, the
        handles ``zero_grad`` checks) runs unchanged and nothing is sent."""
        allreduce = optimizer._allreduce_grad_async  # (the hooks look the method up on each call)

        def own_or_allreduce(p):
            if not self.local_gradients:
                return allreduce(p)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            return (lambda: grad), grad.dtype  # synchronize() calls a callable handle for its result

        optimizer._allreduce_grad_async = own_or_allreduce

    def broadcast_state(self, model, optimizer, exclude=None):
        state = model.state_dict()
        self.hvd.broadcast_parameters({k: v for k, v in state.items() if not (exclude and k.startswith(exclude))},
                                      root_rank=0)
        if optimizer is None:
            return
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

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

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

    @torch.no_grad()
    def average_model(self, model):
        """One fused ``hvd.allreduce_`` (``op=Average``) of the parameters and floating-point
        buffers in a flat buffer."""
        return average_flat(model_tensors(model), lambda flat: self.hvd.allreduce_(
            flat, op=self.hvd.Average, name="local_sgd.average"))

    def allgather(self, rows, name):
        return self.hvd.allgather(rows, name=name)  # sizes along dim 0 may differ

    def allgather_object(self, obj, name="object"):
        return self.hvd.allgather_object(obj, name=name)

    def barrier(self):
        self.hvd.barrier()

    def shutdown(self):
        self.hvd.shutdown()
