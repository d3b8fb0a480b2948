"""TensorBoard event files beside ``metrics.jsonl``: the same records, as scalars.

With ``train.tensorboard: true`` (the default) rank 0 writes every record it appends to
``metrics.jsonl`` also to ``RUN_DIR/tensorboard/`` through ``torch.utils.tensorboard``
(:class:`TensorBoardSink`, fed by :class:`~tsmtrain.train.metrics_log.MetricsWriter`), so that
``tensorboard --logdir runs/NAME/tensorboard`` shows the run while it trains. metrics.jsonl
stays the machine-readable record; the event files hold its numbers, nothing more.

Tags (:func:`scalars`), all at the record's optimizer step:

* a training record (it holds ``loss``): ``train/KEY`` for each number (``train/loss``,
  ``train/lr``, ``train/clips_per_s``, ``train/data_wait_fraction``, ``train/train_top1``,
  ``train/step_time_s``, ``train/skipped_videos``, ``train/epoch``, ...), and
  ``breakdown/PHASE_s`` for each phase of ``breakdown_s`` (:data:`~tsmtrain.train.BREAKDOWN`);
* an evaluation record (keys ``val_*``): ``val/KEY`` (``val/top1``, ``val/top5``, ``val/loss``,
  ``val/clips``, ``val/skipped_videos``); its ``epoch`` is the training record's of the same step
  and is not repeated;
* anything else: ``KEY`` for a number, ``KEY/SUB`` for a number in a mapping
  (``allreduce_benchmark/seconds``, ...).

Lists and strings have no scalar form and stay in metrics.jsonl only. tensorboard is imported
only when a sink is made, so that with ``train.tensorboard: false`` (and on every rank but 0)
it is not imported at all.
"""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path

from ..errors import TrainingError

__all__ = ["TensorBoardSink", "scalars", "check_tensorboard", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"
"""The folder of the run directory that holds the event files."""

_MISSING = ("train.tensorboard: true needs the tensorboard package, which is not installed in this "
            "environment (make setup installs it; or pip install tensorboard); or set train.tensorboard: false")


def check_tensorboard(enabled: bool) -> None:
    """Fail early, on every rank, when ``train.tensorboard`` is on and tensorboard is missing.

    Looks the package up without importing it (``importlib.util.find_spec``), so ranks that will
    not write event files pay nothing and every rank stops with the same message before any
    collective operation.

    Raises:
        TrainingError: ``enabled`` and no ``tensorboard`` package can be found.
    """
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError(_MISSING)


def scalars(record: dict) -> list[tuple[str, float]]:
    """The TensorBoard scalars of one ``metrics.jsonl`` record, as ``(tag, value)`` pairs.

    Args:
        record: what :meth:`~tsmtrain.train.metrics_log.MetricsWriter.write` appends (``step`` is
            the global step and is not itself a scalar).

    Returns:
        The tags described in this module's docstring, in the record's order. Booleans,
        strings, lists and ``None`` are left out (they stay in metrics.jsonl).
    """
    def number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    evaluation = any(key.startswith("val_") for key in record)
    training = "loss" in record
    out = []
    for key, value in record.items():
        if key == "step":
            continue
        if evaluation and key.startswith("val_"):
            tag = f"val/{key[len('val_'):]}"
        elif evaluation:
            continue  # the epoch of the training record at the same step
        elif key == "breakdown_s" and isinstance(value, dict):
            out += [(f"breakdown/{phase}_s", float(v)) for phase, v in value.items() if number(v)]
            continue
        elif isinstance(value, dict):
            out += [(f"{key}/{sub}", float(v)) for sub, v in value.items() if number(v)]
            continue
        else:
            tag = f"train/{key}" if training else key
        if number(value):
            out.append((tag, float(value)))
    return out


class TensorBoardSink:
    """Writes ``metrics.jsonl`` records as scalars into a TensorBoard log directory (rank 0).

    One ``torch.utils.tensorboard.SummaryWriter`` per start of the run: a resumed run adds a
    new event file to the same directory, and with ``purge_step`` the events that an earlier
    start wrote after its checkpoint (its steps from ``purge_step`` on, which the resumed run
    writes again) are hidden by TensorBoard's own purge rule (a ``SessionLog.START`` at that
    step), as torch documents for ``SummaryWriter(purge_step=...)``.

    Args:
        log_dir: the folder for the event files (created; ``RUN_DIR/tensorboard``).
        purge_step: the first optimizer step this start will log (the checkpoint's step + 1
            when resuming, 1 on a fresh start); ``None``: hide nothing.

    Raises:
        TrainingError: tensorboard cannot be imported (the message names ``train.tensorboard``).
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # missing, or an installation that does not import
            raise TrainingError(f"{_MISSING} ({err})") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def add(self, record: dict) -> None:
        """Queue a record's :func:`scalars` at its ``step`` (written by the writer's thread)."""
        step = record.get("step")
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write everything queued to the event file (at each epoch's end)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (end of the run, stop request, error)."""
        self.writer.close()
