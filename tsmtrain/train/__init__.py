"""Training: the loop that ``tsmtrain run`` runs on every rank, ``tsmtrain test`` / ``predict``, and
``tsmtrain bench step``.

Modules, from the top:

* :mod:`.loop`: :func:`train`, the run: set-up, epochs, one call of the step per batch
* :mod:`.factory`: the parts of a run that :func:`train` builds (device, loaders, network,
  resuming from a checkpoint)
* :mod:`.step`: :class:`TrainStep`, one optimizer step (passes, gradient wait, learning rate,
  autocast, GradScaler, channels_last, torch.compile), shared by the loop and the benchmark
* :mod:`.evaluate`: :func:`evaluate` and :func:`predict` over every rank's shard
* :mod:`.testing`: ``tsmtrain test`` and ``tsmtrain predict``: a checkpoint under a K clips x C
  crops protocol, per-video softmax (multi-label: sigmoid) averages, figures and report files
* :mod:`.metrics`: ``metrics.jsonl``, the logging interval's sums, the phase clock
* :mod:`.tensorboard`: the same records as TensorBoard scalars (``train.tensorboard``)
* :mod:`.checkpoint`: checkpoint files, and saving and restoring a run
* :mod:`.head_shards`: the per-rank files of a sharded head, joined and split for any number of ranks
* :mod:`.multilabel`: mAP, GAP@20 and Hit@1 of multi-label runs
* :mod:`.runtime`: the error type, logging, engine, device, embedded datasets
* :mod:`.bench`: ``tsmtrain bench step`` and the standalone allreduce benchmark
"""

from ..dist.stop import EXIT_PREEMPTED, STOP_SIGNAL, STOP_SIGNALS  # the stop protocol, re-exported
from .bench import benchmark_allreduce
from .evaluate import evaluate, predict
from .loop import RunResult, train
from ..scaling.records import BREAKDOWN
from ..data import clip_dataset
from .runtime import TrainingError, prepare_dataset
from .step import PRECISIONS, TrainStep

__all__ = ["train", "evaluate", "predict", "clip_dataset", "prepare_dataset", "benchmark_allreduce", "TrainingError",
           "RunResult", "EXIT_PREEMPTED", "STOP_SIGNAL", "STOP_SIGNALS", "BREAKDOWN", "TrainStep", "PRECISIONS"]
