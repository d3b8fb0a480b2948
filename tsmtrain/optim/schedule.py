"""The learning-rate schedule: gradual linear warmup per iteration (Goyal et al., "Accurate, Large
Minibatch SGD: Training ImageNet in 1 Hour", 2017, section 2.2), then cosine (Loshchilov and
Hutter, "SGDR", 2017) or step decay. Imports no torch: an optimizer is only given rates.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LRSchedule", "set_rate"]


class LRSchedule:
    """Learning rate as a function of the optimizer step.

    ``peak_lr`` is the linearly scaled rate (``base_lr * global_batch / base_batch``). During the
    first ``warmup_epochs`` it rises linearly, every iteration, from ``warmup_start_lr`` to
    ``peak_lr`` (Goyal et al. 2017, section 2.2); then it follows

    * ``cosine``: ``peak_lr * (1 + cos(pi * p)) / 2`` with p the fraction of post-warmup steps done,
    * ``step``: ``peak_lr * gamma ** (milestones passed)``, milestones in epochs,
    * ``none``: ``peak_lr``.

    The schedule has no state but the step, so a resumed run at step N gets the same rate.

    Args:
        peak_lr: the rate after warmup.
        steps_per_epoch: optimizer steps per epoch.
        epochs: length of the schedule (cosine decays to 0 at its end).
        warmup_epochs: warmup length in epochs (may be fractional; rounded to whole steps).
        warmup_start_lr: rate at step 0; None: ``peak_lr`` (no ramp).
        decay: ``cosine``, ``step`` or ``none``.
        milestones: ``step`` decay: the epochs at which the rate is multiplied by ``gamma``.
        gamma: ``step`` decay factor.

    Raises:
        ValueError: ``steps_per_epoch`` is below 1.
    """

    def __init__(self, peak_lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                 warmup_start_lr: float | None = None, decay: str = "cosine",
                 milestones: list[int] | tuple[int, ...] = (), gamma: float = 0.1):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.peak_lr = peak_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        self.start_lr = peak_lr if warmup_start_lr is None else warmup_start_lr
        self.decay, self.milestones, self.gamma = decay, list(milestones), gamma

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        if self.decay == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "step":
            epoch = step / self.steps_per_epoch
            return self.peak_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return self.peak_lr

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the rate for ``step`` in every param group; returns it."""
        return set_rate(optimizer, self(step))


def set_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set learning rate ``lr`` in every param group of ``optimizer``; returns it (what a schedule's
    ``apply`` does with the rate of a step: :class:`LRSchedule`, ``tsmtrain.train.multigrid.MultigridLR``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
