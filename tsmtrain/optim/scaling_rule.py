"""The linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
1 Hour", 2017, section 2.1): when the minibatch is multiplied by k, multiply the learning rate
by k. A recipe gives the rate ``optim.base_lr`` for a global batch of ``optim.base_batch``
clips; on N ranks the global batch and the rate follow from it.

When the batch grows, large-batch recipes also train longer and warm up longer (MLPerf's
ResNet-50: 37 epochs with 2 of warmup at a global batch of 3,264, 90 with 31 at 67,456):
:func:`batch_scaled_schedule` adds ``schedule.epochs_per_batch_doubling`` epochs and
``schedule.warmup_epochs_per_batch_doubling`` warmup epochs per doubling of the global batch
over ``optim.base_batch``.

Imports no torch: ``tsmtrain validate``, ``render``/``submit`` and the scaling sweep use it on
machines without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["LinearScaling", "linear_scaling", "batch_scaled_epochs", "batch_scaled_schedule"]


@dataclass(frozen=True)
class LinearScaling:
    """What a recipe's batch and learning rate become on ``world_size`` ranks.

    Attributes:
        world_size: ranks (data-parallel workers).
        global_batch: clips per optimizer step, ``train.batch_size * world_size *
            dist.backward_passes_per_step``.
        lr: the peak learning rate, ``optim.base_lr * global_batch / optim.base_batch``
            (Goyal et al. 2017, section 2.1, with k = global_batch / base_batch).
        warmup_steps: optimizer steps of gradual warmup (section 2.2),
            ``round(schedule.warmup_epochs * steps_per_epoch)``; None when the steps per epoch
            were not given (they depend on the dataset).
    """

    world_size: int
    global_batch: int
    lr: float
    warmup_steps: int | None = None


def linear_scaling(recipe: Recipe, world_size: int | None = None,
                   steps_per_epoch: int | None = None) -> LinearScaling:
    """The linear scaling rule for ``recipe`` on ``world_size`` ranks.

    Args:
        recipe: a validated recipe (its ``train.batch_size``, ``dist.backward_passes_per_step``,
            ``optim.base_lr``, ``optim.base_batch`` and ``schedule.warmup_epochs`` are read).
        world_size: ranks; None (or 0): the recipe's ``dist.np``.
        steps_per_epoch: optimizer steps per epoch, for ``warmup_steps``; None: not computed.

    Returns:
        The :class:`LinearScaling`: global batch in clips, scaled learning rate, warmup steps.
    """
    ws = world_size or recipe.dist.np
    global_batch = recipe.train.batch_size * ws * recipe.dist.backward_passes_per_step
    warmup = None if steps_per_epoch is None else round(recipe.schedule.warmup_epochs * steps_per_epoch)
    return LinearScaling(world_size=ws, global_batch=global_batch,
                         lr=recipe.optim.base_lr * global_batch / recipe.optim.base_batch, warmup_steps=warmup)


def batch_scaled_epochs(epochs: int, warmup_epochs: float, global_batch: int, base_batch: int,
                        epochs_per_doubling: float = 0.0, warmup_per_doubling: float = 0.0) -> tuple[int, float]:
    """Epochs and warmup epochs at ``global_batch``: with ``d = log2(global_batch / base_batch)``
    doublings (0 at or below ``base_batch``),

        epochs' = ceil(epochs + epochs_per_doubling * d),  warmup' = warmup_epochs + warmup_per_doubling * d

    so that each doubling of the batch adds the same number of epochs, as MLPerf's two ResNet-50
    points (37 epochs, warmup 2, at 3,264; 90 and 31 at 67,456: 12.1 and 6.6 per doubling) do.
    Epochs are whole (the loop counts them); the warmup may be fractional (it is rounded to steps).

    Returns:
        ``(epochs', warmup')``; ``(epochs, warmup_epochs)`` unchanged when both rates are 0.
    """
    d = max(0.0, math.log2(global_batch / base_batch))
    if not (epochs_per_doubling or warmup_per_doubling) or d == 0:
        return epochs, warmup_epochs
    scaled = math.ceil(round(epochs + epochs_per_doubling * d, 9))  # (round: 4 + 1.5 * 2 is 7, not 8)
    return scaled, warmup_epochs + warmup_per_doubling * d


def batch_scaled_schedule(recipe: Recipe, world_size: int | None = None) -> Recipe:
    """``recipe`` with the epochs and warmup of its global batch on ``world_size`` ranks
    (:func:`batch_scaled_epochs` with ``schedule.epochs_per_batch_doubling`` and
    ``schedule.warmup_epochs_per_batch_doubling``), those two set to 0: the recipe a run at that
    batch trains (and writes to its run directory). Step-decay milestones stay where they are.

    Returns:
        ``recipe`` itself when both per-doubling fields are 0 (every existing recipe); else a copy.
    """
    s = recipe.schedule
    if not (s.epochs_per_batch_doubling or s.warmup_epochs_per_batch_doubling):
        return recipe
    scaling = linear_scaling(recipe, world_size)
    epochs, warmup = batch_scaled_epochs(s.epochs, s.warmup_epochs, scaling.global_batch, recipe.optim.base_batch,
                                         s.epochs_per_batch_doubling, s.warmup_epochs_per_batch_doubling)
    schedule = s.model_copy(update={"epochs": epochs, "warmup_epochs": warmup, "epochs_per_batch_doubling": 0.0,
                                    "warmup_epochs_per_batch_doubling": 0.0})
    return recipe.model_copy(update={"schedule": schedule})
