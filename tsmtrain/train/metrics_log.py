"""What the training loop measures and writes: ``metrics.jsonl`` (and the same records as
TensorBoard scalars, :mod:`~tsmtrain.train.tensorboard`), the per-interval sums, and the clock
of the step's phases.

Every ``train.log_every`` optimizer steps (a *logging interval*) each rank's sums (loss, clips,
correct, skipped videos, seconds per phase, wall time) are allreduced once and rank 0 appends
one record to ``metrics.jsonl`` (:meth:`Interval.close`).

A run that resumes from the checkpoint of step S logs steps S+1, ... again, so rank 0 first
drops what an earlier start logged after S (:func:`truncate_metrics`), and every step appears
once, as TensorBoard's ``purge_step`` does for the event files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..dist.base import Engine
from ..io import FileWriteError, write_bytes
from ..scaling.records import BREAKDOWN  # the phases of breakdown_s, defined once for the scaling study
from ..errors import TrainingError
from .setup import log
from .tensorboard import TENSORBOARD_DIR, TensorBoardSink

__all__ = ["MetricsWriter", "PhaseClock", "Interval", "BREAKDOWN", "truncate_metrics"]

# what each rank sums over a logging interval: one float64 tensor, allreduced at its end
_SUMS = ("loss", "clips", "correct", "failed", "data", "augment", "forward_backward", "allreduce_wait", "optimizer",
         "elapsed")
_AT = {name: i for i, name in enumerate(_SUMS)}
_TIMED = BREAKDOWN[1:-1]  # the phases PhaseClock times; data is always timed on the host


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl`` on rank 0 (``path`` None on the other ranks),
    and the same records as TensorBoard scalars when given a ``tensorboard`` sink.
    ``metrics.jsonl`` is an append-only journal, by design not written through
    :mod:`tsmtrain.io`: a line cut short by a kill is dropped on resume (:func:`truncate_metrics`).

    A context manager: leaving it closes the sink, whether the run ended, stopped on request or
    failed.

    Args:
        path: ``RUN_DIR/metrics.jsonl``, or ``None`` (ranks other than 0: nothing written).
        tensorboard: a :class:`~tsmtrain.train.tensorboard.TensorBoardSink`, or ``None``.
    """

    def __init__(self, path: Path | None, tensorboard: TensorBoardSink | None = None):
        self.path = path
        self.tensorboard = tensorboard

    @classmethod
    def for_rank(cls, run_dir: Path, rank: int, tensorboard: bool, resumed_at: int = 0) -> "MetricsWriter":
        """The writer of rank ``rank``: rank 0 writes ``run_dir/metrics.jsonl`` and, with
        ``tensorboard`` (``train.tensorboard``), ``run_dir/tensorboard/``; other ranks write
        nothing and never import tensorboard.

        Rank 0 first drops the records an earlier start logged after ``resumed_at``
        (:func:`truncate_metrics`), which this start logs again.

        Args:
            run_dir: the run directory.
            rank: this rank.
            tensorboard: ``train.tensorboard``.
            resumed_at: the checkpoint's optimizer step when resuming (0 on a fresh start):
                metrics.jsonl keeps what an earlier start logged up to it, and TensorBoard hides
                what it logged after it (steps from ``resumed_at + 1`` on, which this start logs
                again).

        Raises:
            TrainingError: rank 0, ``tensorboard`` on, and tensorboard cannot be imported; or
                metrics.jsonl cannot be rewritten.
        """
        if rank != 0:
            return cls(None)
        path = run_dir / "metrics.jsonl"
        truncate_metrics(path, resumed_at)
        sink = None
        if tensorboard:
            sink = TensorBoardSink(run_dir / TENSORBOARD_DIR, purge_step=resumed_at + 1)
        return cls(path, sink)

    def write(self, **record) -> None:
        """Append ``record`` (a JSON-serialisable dict with ``step``) to metrics.jsonl and the sink."""
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add(record)

    def flush(self) -> None:
        """Write the TensorBoard events queued so far (metrics.jsonl is written at once)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Close the TensorBoard sink (idempotent)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Make ``path`` (``metrics.jsonl``) hold only records with ``step <= last_step``: a run that
    resumes from the checkpoint of ``last_step`` logs the later steps again. Lines that are not a
    JSON object (the last one, cut short by a kill mid-write) go too. The file is rewritten
    atomically (:func:`tsmtrain.io.write_bytes`), and only when it changes.

    Returns:
        The number of lines removed (0 also when there is no such file).

    Raises:
        TrainingError: the file cannot be read or rewritten (names it and the cause).
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise TrainingError(f"cannot read {path}: {err.strerror or err}") from None
    ends_cut = lines[-1] != b""  # no newline after the last line: the write was cut short
    if not ends_cut:
        lines.pop()
    keep, later, malformed = [], 0, 0
    for line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            malformed += 1
            continue
        if isinstance(record.get("step"), (int, float)) and record["step"] > last_step:
            later += 1
        else:
            keep.append(line)
    if not (later or malformed or ends_cut):
        return 0
    try:
        write_bytes(path, b"".join(line + b"\n" for line in keep))
    except FileWriteError as err:  # "PATH: cannot write: why"
        raise TrainingError(str(err)) from None
    if later:
        log.info("%s: dropped %d records of steps after %d, logged by an earlier start after its checkpoint",
                 path, later, last_step)
    if malformed:
        log.warning("%s: dropped %d malformed lines (a write cut short)", path, malformed)
    return later + malformed


class PhaseClock:
    """Seconds spent in each phase of the steps of one logging interval.

    :meth:`mark` starts timing (the batch has arrived); :meth:`lap` ends a phase and starts the
    next; :meth:`collect` returns the sums since the last collect, in seconds.

    * CPU: laps of the host clock (``time.perf_counter``).
    * GPU: a CUDA event on the current stream at every mark and lap; the spans between them are
      read only in :meth:`collect`, after one wait for the last event, so that no step waits for
      the device. A span is GPU time between two points of the stream, so a phase that only
      queues work is charged when the device runs it.
    * Disabled (``train.breakdown: false``): nothing at all; :meth:`collect` returns ``None``.

    Args:
        device: the training device.
        enabled: time the phases.
        event: makes an event (``torch.cuda.Event(enable_timing=True)`` on a GPU); with it the
            clock works on events whatever the device, which lets a test drive the GPU path.
    """

    def __init__(self, device: torch.device, enabled: bool, event: Callable[[], object] | None = None):
        self.enabled = enabled
        if event is None and device.type == "cuda":
            event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        self._event = event
        self._spare: list = []  # events read in an earlier collect, to reuse
        self._spans: list[tuple[str, object, object]] = []
        self._since: object = None
        self._sums = dict.fromkeys(_TIMED, 0.0)
        self._moves: list[tuple[str, str, float]] = []

    def _now(self):
        if self._event is None:
            return time.perf_counter()
        e = self._spare.pop() if self._spare else self._event()
        e.record()
        return e

    def mark(self) -> None:
        """Start timing: the next :meth:`lap` counts from here."""
        if self.enabled:
            self._since = self._now()

    def lap(self, phase: str) -> None:
        """Charge the time since the last mark or lap to ``phase`` (one of ``augment``,
        ``forward_backward``, ``allreduce_wait``, ``optimizer``)."""
        if not self.enabled:
            return
        now = self._now()
        if self._event is None:
            self._sums[phase] += now - self._since
        else:
            self._spans.append((phase, self._since, now))
        self._since = now

    def move(self, source: str, target: str, seconds: float) -> None:
        """Count ``seconds`` (host seconds) of ``source``'s time as ``target``'s instead, at most
        all of ``source``'s: DDP finishes its allreduce inside ``backward()``, and the part after
        the last gradient (:meth:`~tsmtrain.dist.base.Engine.hidden_wait_s`) is allreduce wait."""
        if self.enabled and seconds > 0:
            self._moves.append((source, target, seconds))

    def collect(self) -> dict[str, float] | None:
        """Seconds per phase since the last collect (``None`` when disabled); resets the sums."""
        if not self.enabled:
            return None
        if self._spans:
            self._spans[-1][2].synchronize()
            for phase, start, end in self._spans:
                self._sums[phase] += start.elapsed_time(end) / 1000.0  # ms -> s
            used = {id(e): e for _, start, end in self._spans for e in (start, end)}
            used.pop(id(self._since), None)  # still the start of the next span
            self._spare.extend(used.values())
            self._spans.clear()
        for source, target, seconds in self._moves:
            moved = min(seconds, self._sums[source])
            self._sums[source] -= moved
            self._sums[target] += moved
        self._moves.clear()
        sums, self._sums = self._sums, dict.fromkeys(_TIMED, 0.0)
        return sums


class Interval:
    """One logging interval's sums on this rank, and its record in ``metrics.jsonl``.

    Loss and correct predictions accumulate on the device (:meth:`add_batch`), so that no step
    waits for a ``.item()``; the rest on the host (:meth:`add`). :meth:`close` allreduces them
    once and starts the next interval.
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.on_device = torch.zeros(2, dtype=torch.float64, device=device)  # loss * clips, correct
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, name: str, value: float) -> None:
        """Add ``value`` to the sum ``name`` (``failed`` videos, ``data`` wait in seconds, ...)."""
        self.sums[_AT[name]] += value

    def add_batch(self, loss: torch.Tensor, best: torch.Tensor, y: torch.Tensor) -> None:
        """Count one batch: mean ``loss``, each clip's best class ``best (N,)`` int64, labels
        ``y (N,)`` or multi-hot ``(N, K)`` (then the best class counts as correct when it is one
        of the clip's labels: Hit@1)."""
        self.on_device[0] += loss.detach() * len(y)
        self.on_device[1] += (best == y).sum() if y.dim() == 1 else y.gather(1, best[:, None]).sum()
        self.sums[_AT["clips"]] += len(y)

    def close(self, engine: Engine, phases: dict[str, float] | None) -> dict:
        """The interval's record, summed over all ranks (one allreduce); resets for the next.

        Args:
            engine: for the allreduce (every rank calls this at the same step).
            phases: :meth:`PhaseClock.collect`, or ``None`` without the breakdown.

        Returns:
            ``loss`` (mean per clip), ``train_top1`` (%), ``clips_per_s`` (all ranks, by the mean
            over ranks of the interval's wall time), ``clips_per_s_per_rank``,
            ``data_wait_fraction``, ``skipped_videos``, ``interval_steps``, ``step_time_s`` and,
            with ``phases``, ``breakdown_s``: seconds per step of each :data:`BREAKDOWN` phase,
            mean over ranks, ``other`` being the rest of ``step_time_s``.
        """
        self.sums[_AT["loss"]], self.sums[_AT["correct"]] = self.on_device.tolist()
        self.sums[_AT["elapsed"]] = time.perf_counter() - self.start
        for name, seconds in (phases or {}).items():
            self.sums[_AT[name]] = seconds
        tot = engine.allreduce(self.sums, average=False)
        size, steps = engine.size, self.steps
        elapsed = tot[_AT["elapsed"]].item() / size  # mean over ranks, seconds
        clips = tot[_AT["clips"]].item()
        record = dict(loss=tot[_AT["loss"]].item() / clips, train_top1=100 * tot[_AT["correct"]].item() / clips,
                      clips_per_s=clips / max(elapsed, 1e-9), clips_per_s_per_rank=clips / max(elapsed, 1e-9) / size,
                      data_wait_fraction=tot[_AT["data"]].item() / max(tot[_AT["elapsed"]].item(), 1e-9),
                      skipped_videos=int(tot[_AT["failed"]].item()), interval_steps=steps, step_time_s=elapsed / steps)
        if phases is not None:
            breakdown = {name: tot[_AT[name]].item() / size / steps for name in BREAKDOWN[:-1]}
            breakdown["other"] = max(0.0, elapsed / steps - sum(breakdown.values()))
            record["breakdown_s"] = breakdown
        self.sums.zero_()
        self.on_device.zero_()
        self.steps = 0
        self.start = time.perf_counter()
        return record
