"""What a run needs around its training loop: the error type, logging, the engine, the device and
thread count, the host allocator, the progress bar, and the datasets a recipe describes. The stop
request (SIGUSR2, SIGTERM) is :class:`tsmtrain.dist.stop.StopRequest`."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

from ..dist import DistError, create_engine, launched_by_launcher
from ..dist.base import Engine, LocalEngine
from ..errors import TrainingError
from ..recipe import Recipe

__all__ = ["setup_logging", "choose_engine", "start_watchdog", "choose_device", "set_threads", "keep_freed_memory",
           "progress_bar", "log"]

log = logging.getLogger("tsmtrain")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so rich's progress bar can redirect it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank: int, run_dir) -> None:
    """Log INFO to stderr on rank 0 (WARNING on the others) and to ``run_dir/train.log`` on rank 0."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    console = _StderrHandler()
    console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def choose_engine(recipe: Recipe) -> Engine:
    """The recipe's engine; a process that no launcher started gets :class:`LocalEngine`.

    Raises:
        TrainingError: the engine's library cannot be imported, or its ranks cannot meet (the
            message names the recipe key).
    """
    if recipe.dist.engine != "none" and not launched_by_launcher():
        return LocalEngine()  # one process started by hand: nothing to allreduce
    cuda = recipe.train.device != "cpu" and torch.cuda.is_available()
    try:
        return create_engine(recipe.dist.engine, recipe.dist, cuda=cuda)
    except ImportError as err:
        raise TrainingError(f"dist.engine: {recipe.dist.engine}: cannot import it ({err}); run make setup") from None
    except DistError as err:
        raise TrainingError(str(err)) from None


def start_watchdog(recipe: Recipe, engine: Engine):
    """This rank's liveness watchdog (:func:`tsmtrain.dist.watchdog.start_watchdog`, timeout
    ``dist.timeout_seconds``; rank 0 is reached at the interface the environment names, which the
    job script sets from ``cluster.network_interface``, else at any of its addresses):
    ``(watchdog, world line)``,
    ``(None, "")`` for one process. Every rank calls it right after :func:`choose_engine`."""
    from ..dist.netif import named_interface
    from ..dist.watchdog import start_watchdog as start

    return start(engine, recipe.dist.timeout_seconds, named_interface())


def choose_device(setting: str, local_rank: int) -> torch.device:
    """``train.device`` resolved: ``auto`` is this rank's GPU (``local_rank`` modulo the GPUs)
    when there is one, else the CPU.

    Raises:
        TrainingError: ``cuda`` asked for and no GPU visible.
    """
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("train.device: cuda was asked for but no GPU is visible")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", torch.cuda.current_device())


def set_threads(threads: int | None, local_size: int = 1) -> int:
    """Set torch's CPU threads: ``threads``, else Slurm's ``SLURM_CPUS_PER_TASK`` inside a job,
    else the host's cores divided by the ranks on it. Returns the number set."""
    slurm_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) if "SLURM_JOB_ID" in os.environ else 0
    torch.set_num_threads(threads or slurm_cpus or max(1, (os.cpu_count() or 1) // local_size))
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that tensors free for the next step, instead of
    handing it back to the kernel; returns whether it could (Linux with glibc).

    By default glibc serves blocks above a threshold (128 KiB, rising with use up to 32 MiB)
    with their own ``mmap`` and unmaps them when freed, and trims the heap's free top; PyTorch's
    CPU tensors are allocated with plain malloc, so every training step gets its activations and
    gradients as fresh pages and pays a page fault (and the kernel zeroing the page) per 4 KiB of
    them. Measured with ``tsmtrain bench step`` on TSM-ResNet50 (2 clips x 8 frames at 112x112, 2
    threads), this was most of what TSM cost over TSN, whose step allocates 16 fewer activations
    (the shifted copies that ``conv1`` keeps for its backward). ``mallopt(M_MMAP_MAX, 0)`` serves
    every block from the heap and ``mallopt(M_TRIM_THRESHOLD, 2 GiB)`` keeps its free top, as
    jemalloc and tcmalloc keep freed memory; the process's resident size then stays at the peak
    of one step (which every step reaches anyway). Process-wide; data-loading workers forked
    afterwards inherit it. GPU memory is not concerned (PyTorch caches it itself).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def progress_bar(enabled: bool, total: int, completed: int):
    """A rich progress bar with clips/s and ETA on an interactive rank 0; otherwise none."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]:.1f} clips/s  loss {task.fields[loss]:.3f}"),
                   TimeRemainingColumn(), transient=False)
    bar.add_task("train", total=total, completed=completed, epoch=0, speed=0.0, loss=float("nan"))
    return bar


