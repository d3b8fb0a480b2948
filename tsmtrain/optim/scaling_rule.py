"""The linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
1 Hour", 2017, section 2.1): when the minibatch is multiplied by k, multiply the learning rate
by k. A recipe gives the rate ``optim.base_lr`` for a global batch of ``optim.base_batch``
clips; on N ranks the global batch and the rate follow from it.

Imports no torch: ``tsmtrain validate``, ``render``/``submit`` and the scaling sweep use it on
machines without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["LinearScaling", "linear_scaling"]


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
