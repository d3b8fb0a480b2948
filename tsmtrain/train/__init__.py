"""Training: the loop that ``tsmtrain run`` runs on every rank.

Modules, from the top:

* :mod:`.loop`: :func:`train`, the run: set-up, epochs, one call of the step per batch
* :mod:`.factory`: the parts of a run that :func:`train` builds (device, loaders, network,
  resuming from a checkpoint)
* :mod:`.step`: :class:`TrainStep`, one optimizer step (passes, gradient wait, learning rate,
  autocast, GradScaler, channels_last, torch.compile), shared by the loop and ``bench step``
* :mod:`.metrics_log`: ``metrics.jsonl``, the logging interval's sums, the phase clock
* :mod:`.tensorboard`: the same records as TensorBoard scalars (``train.tensorboard``)
* :mod:`.checkpoint`: checkpoint files, and saving and restoring a run
* :mod:`.head_slices`: the per-rank files of a classifier split by classes across ranks (head
  slices), joined and split again for any number of ranks
* :mod:`.rundir`: the run directory: its lock, its recipe, its latest checkpoint
* :mod:`.setup`: what a run sets up around its loop: logging, engine, device, threads, the host
  allocator, the progress bar

Validation and testing are :mod:`tsmtrain.eval`; ``bench step`` and ``doctor`` are
:mod:`tsmtrain.bench`; the embedded datasets are built by :mod:`tsmtrain.prep.datasets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..dist.stop import EXIT_PREEMPTED, STOP_SIGNAL, STOP_SIGNALS  # the stop protocol, re-exported
from ..errors import TrainingError
from ..lazy import lazy_exports
from ..scaling.records import BREAKDOWN

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .loop import RunResult, train
    from .step import PRECISIONS, TrainStep

__all__ = ["train", "TrainingError", "RunResult", "EXIT_PREEMPTED", "STOP_SIGNAL", "STOP_SIGNALS", "BREAKDOWN",
           "TrainStep", "PRECISIONS"]

_LAZY = {"train": ".loop", "RunResult": ".loop", "TrainStep": ".step", "PRECISIONS": ".step"}
"""Names imported on first use (PEP 562), so that importing one module of the package (the
metrics log, the step's helpers) does not import the loop, which imports :mod:`tsmtrain.eval`."""

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
