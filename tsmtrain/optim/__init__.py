"""Optimizers and the learning-rate schedule for large-batch training.

* :mod:`.lars`: LARS, layer-wise adaptive rate scaling (You, Gitman, Ginsburg, "Large Batch
  Training of Convolutional Networks", 2017, Algorithm 1).
* :mod:`.scaling_rule`: the linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD:
  Training ImageNet in 1 Hour", 2017, section 2.1) as a typed :class:`LinearScaling`.
* :mod:`.schedule`: :class:`LRSchedule`, gradual warmup updated every iteration (section 2.2),
  then cosine (Loshchilov and Hutter 2017) or step decay.
* :mod:`.factory`: :func:`create_optimizer` (SGD with momentum or LARS) and
  :func:`create_schedule`, what a recipe's ``optim`` and ``schedule`` sections ask for.

Biases and normalisation parameters get no weight decay and, with LARS, no trust ratio, as in
the large-batch literature (``optim.exclude_from_decay``, ``optim.lars_exclude``). Epochs and
warmup may grow with the global batch (``schedule.epochs_per_batch_doubling``,
``schedule.warmup_epochs_per_batch_doubling``: :func:`batch_scaled_schedule`).

The names of :mod:`.lars` and :mod:`.factory` (which import torch) are loaded lazily, on first
use (PEP 562 ``__getattr__``), so that the scaling rule and the schedule import without torch
(``tsmtrain validate``, the scaling sweep).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

from .scaling_rule import LinearScaling, batch_scaled_epochs, batch_scaled_schedule, linear_scaling
from .schedule import LRSchedule

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .factory import create_optimizer, create_schedule, param_groups
    from .lars import LARS

__all__ = ["LARS", "param_groups", "create_optimizer", "create_schedule", "LRSchedule", "LinearScaling",
           "linear_scaling", "batch_scaled_epochs", "batch_scaled_schedule"]

_LAZY = {"LARS": ".lars", "param_groups": ".factory", "create_optimizer": ".factory", "create_schedule": ".factory"}
"""Public names imported on first use (with torch), each with the submodule that defines it."""


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
