"""Optimizers and the learning-rate schedule for large-batch training.

* SGD with momentum, and LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg,
  "Large Batch Training of Convolutional Networks", 2017, Algorithm 1).
* The linear scaling rule and gradual warmup (Goyal et al., "Accurate, Large Minibatch SGD:
  Training ImageNet in 1 Hour", 2017, sections 2.1 and 2.2), updated every iteration, then
  cosine (Loshchilov and Hutter 2017) or step decay.

Biases and normalisation parameters (every parameter with fewer than two dimensions) get no
weight decay and, with LARS, no trust ratio, as in the large-batch literature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LARS", "param_groups", "create_optimizer", "LRSchedule"]


class LARS(torch.optim.Optimizer):
    """LARS with momentum (You et al. 2017, Algorithm 1).

    For each parameter tensor ``w`` with gradient ``g`` in a group with ``lars=True``::

        trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 when ||w|| or ||g|| is 0)
        v     = momentum * v + lr * trust * (g + wd * w)
        w     = w - v

    In a group with ``lars=False`` (biases, norm layers) ``trust = 1`` and, as set up by
    :func:`param_groups`, ``wd = 0``: plain SGD with momentum.

    Args:
        params: parameters or param groups (groups may set ``lars``, ``weight_decay``, ...).
        lr: global learning rate (the schedule sets it every step).
        momentum: momentum ``m``.
        weight_decay: ``wd`` (L2 penalty).
        trust_coefficient: ``eta``.
        eps: added to the denominator of the trust ratio.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-9):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, eps, mom, lr = (group["weight_decay"], group["trust_coefficient"], group["eps"],
                                     group["momentum"], group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                update = g.add(p, alpha=wd) if wd else g.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / (g_norm + wd * w_norm + eps), torch.ones_like(w_norm)
                    )
                    update.mul_(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.mul_(lr)
                else:
                    buf.mul_(mom).add_(update, alpha=lr)
                p.sub_(buf)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (weights) and a plain group (biases, norms).

    Returns two param groups; the second has ``weight_decay=0`` and ``lars=False``.
    """
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else plain).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]


def create_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer a recipe's ``optim`` section asks for (``tsmtrain.recipe.OptimConfig``).

    The learning rate is set by :class:`LRSchedule` before every step.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.base_lr, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient, eps=cfg.lars_eps)
    for g in groups:
        g.pop("lars")
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class LRSchedule:
    """Learning rate as a function of the optimizer step.

    ``peak_lr`` is the linearly scaled rate (``base_lr * global_batch / base_batch``). During the
    first ``warmup_epochs`` it rises linearly, every iteration, from ``warmup_start_lr`` to
    ``peak_lr`` (Goyal et al. 2017, section 2.2); then it follows

    * ``cosine``: ``peak_lr * (1 + cos(pi * p)) / 2`` with p the fraction of post-warmup steps done,
    * ``step``: ``peak_lr * gamma ** (milestones passed)``, milestones in epochs,
    * ``none``: ``peak_lr``.

    The schedule has no state but the step, so a resumed run at step N gets the same rate.
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
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
