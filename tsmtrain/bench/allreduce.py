"""The allreduce benchmark: a network's gradients allreduced on their own, not overlapped with
backward (``train.allreduce_benchmark``, ``tsmtrain doctor``); the scaling model compares it
with the wait measured in training."""

from __future__ import annotations

import time

import torch

from ..dist.base import Engine

__all__ = ["benchmark_allreduce"]


def benchmark_allreduce(engine: Engine, model: torch.nn.Module, repeats: int, fp16: bool = False,
                        skip: torch.nn.Module | None = None) -> dict:
    """Time a gradient allreduce on its own, not overlapped with backward.

    Every trainable parameter's gradient tensor but ``skip``'s (a sharded head's, which training
    never allreduces) (zeros where there is none) is allreduced the way
    the engine does it during backward (:meth:`~tsmtrain.dist.base.Engine.allreduce_gradients`:
    Horovod's named asynchronous allreduces fused by its background thread, DDP's 25 MB
    buckets), ``repeats`` times after a barrier each; the scaling model
    (:mod:`tsmtrain.scaling`) compares this with the wait measured in training to find how much
    of the allreduce backward hides.

    Returns:
        ``{"seconds": median over repeats of the mean over ranks, "times_s": [...], "repeats": R,
        "bytes": bytes sent into one allreduce (2 per value with fp16 compression, else 4),
        "parameters": number of parameters}``.
    """
    skipped = set() if skip is None else {id(p) for p in skip.parameters()}
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for p in model.parameters() if p.requires_grad and id(p) not in skipped]
    if fp16:
        grads = [g.half() for g in grads]
    times = []
    for _ in range(repeats):
        engine.barrier()
        t0 = time.perf_counter()
        engine.allreduce_gradients(grads)
        if grads and grads[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = engine.allreduce(torch.tensor(times, dtype=torch.float64), average=True).tolist()
    return dict(seconds=sorted(times)[len(times) // 2], times_s=times, repeats=repeats,
                bytes=sum(g.numel() * g.element_size() for g in grads),
                parameters=sum(p.numel() for p in model.parameters()))
