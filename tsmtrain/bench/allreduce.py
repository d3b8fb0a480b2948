"""The allreduce benchmark: a network's gradients allreduced on their own, not overlapped with
backward (``train.allreduce_benchmark``, ``tsmtrain doctor``); the scaling model compares it
with the wait measured in training."""

from __future__ import annotations

import socket
import time

import torch

from ..dist.base import Engine
from ..errors import UserError
from ..scaling.model import bus_bandwidth

__all__ = ["benchmark_allreduce", "bench_allreduce", "parse_sizes", "allreduce_sizes", "format_allreduce_row", "ALLREDUCE_HEADER"]


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


def allreduce_sizes(engine: Engine, sizes: list[int], repeats: int = 5, warmup: int = 1,
                    say=None) -> list[dict]:
    """Time allreduces of float32 tensors of each size in ``sizes`` (bytes) across all ranks, the
    way the engine averages gradients (:meth:`~tsmtrain.dist.base.Engine.allreduce_gradients`).

    Every rank must call it with the same arguments. Each size: ``warmup`` untimed allreduces,
    then ``repeats`` timed ones, each after a barrier; a repeat's time is the slowest rank's (the
    allreduce is done when every rank has the sum).

    Returns:
        One dict per size: ``{"bytes", "count" (float32 values), "seconds" (mean over repeats),
        "min_s", "max_s", "algbw_gb_per_s", "busbw_gb_per_s"}`` (GB = 1e9 bytes; see
        :func:`tsmtrain.scaling.model.bus_bandwidth`). ``say``: called with one line per size on rank 0.
    """
    rows = []
    for size in sizes:
        tensor = torch.ones(max(1, size // 4), dtype=torch.float32)
        for _ in range(warmup):
            engine.allreduce_gradients([tensor])
        times = []
        for _ in range(repeats):
            engine.barrier()
            t0 = time.perf_counter()
            engine.allreduce_gradients([tensor])
            times.append(time.perf_counter() - t0)
        slowest = _max_over_ranks(engine, times)
        mean = sum(slowest) / len(slowest)
        nbytes = tensor.numel() * 4
        algbw = nbytes / mean
        row = dict(bytes=nbytes, count=tensor.numel(), seconds=mean, min_s=min(slowest), max_s=max(slowest),
                   algbw_gb_per_s=algbw / 1e9, busbw_gb_per_s=bus_bandwidth(algbw, engine.size) / 1e9)
        rows.append(row)
        if say is not None and engine.rank == 0:
            say(format_allreduce_row(row))
    return rows


def _max_over_ranks(engine: Engine, times: list[float]) -> list[float]:
    gathered = engine.allgather_object(times, name=f"allreduce_sizes.times.{len(times)}")
    return [float(max(column)) for column in zip(*gathered)]


ALLREDUCE_HEADER = ("#       size(B)        count    time(ms)  algbw(GB/s)  busbw(GB/s)\n"
                    "#  (float32, sum over all ranks; busbw = algbw x 2(n-1)/n, as nccl-tests reports it)")


def format_allreduce_row(row: dict) -> str:
    """One line of the table :func:`allreduce_sizes` measures, in nccl-tests' columns."""
    return (f"{row['bytes']:15d} {row['count']:12d} {row['seconds'] * 1e3:11.3f} {row['algbw_gb_per_s']:12.4f} "
            f"{row['busbw_gb_per_s']:12.4f}")


class SizeError(UserError):
    """A ``--sizes`` entry that is not a size in bytes."""


def parse_sizes(text: str) -> list[int]:
    """``"1MB,45MB,256MiB"`` -> bytes, in the given order (units as
    :func:`tsmtrain.prep.tar_writer.parse_size` reads them).

    Raises:
        SizeError: an entry that is not a size, one under 4 bytes (one float32), or none at all.
    """
    from ..prep.tar_writer import parse_size

    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            size = parse_size(item)
        except (UserError, ValueError):
            raise SizeError(f"--sizes: {item!r} is not a size in bytes (e.g. 1MB, 45MB, 256MiB)") from None
        if size < 4:
            raise SizeError(f"--sizes: {item!r} is under 4 bytes, one float32")
        sizes.append(size)
    if not sizes:
        raise SizeError(f"--sizes: {text!r} names no size; give e.g. 1MB,64MB")
    return sizes


def bench_allreduce(engine: Engine, sizes: list[int], repeats: int = 5, warmup: int = 1, say=print) -> dict:
    """``tsmtrain bench allreduce`` on every rank of a job: rank 0 says (``say``) a header with
    the ranks and their hosts, then one nccl-tests row per size (:func:`allreduce_sizes`).

    Returns:
        ``{"tsmtrain_bench_allreduce": 1, "engine", "ranks", "hosts" (one per rank), "rows"}``.
    """
    hosts = engine.allgather_object(socket.gethostname(), name="bench_allreduce.hosts")
    if engine.rank == 0:
        say(f"# allreduce: {engine.size} ranks ({engine.name}) on {len(set(hosts))} host(s): "
            f"{', '.join(dict.fromkeys(hosts))}")
        say(ALLREDUCE_HEADER)
    rows = allreduce_sizes(engine, sizes, repeats=repeats, warmup=warmup, say=say)
    return {"tsmtrain_bench_allreduce": 1, "engine": engine.name, "ranks": engine.size, "hosts": hosts, "rows": rows}
