"""The optimizer and the schedule a recipe asks for, built in one place (as timm's
``create_optimizer_v2`` and ``create_scheduler``).

Biases and the weights and biases of normalisation layers get no weight decay and, with LARS,
no trust ratio, as in the large-batch literature (MLPerf's ResNet-50: no weight decay on
BatchNorm and biases, LARS on the weights only); ``optim.exclude_from_decay`` and
``optim.lars_exclude`` (``norm_and_bias | none``) turn either off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .lars import LARS
from .scaling_rule import LinearScaling
from .schedule import LRSchedule

if TYPE_CHECKING:
    from ..recipe import OptimConfig, Recipe

__all__ = ["param_groups", "norm_and_bias", "create_optimizer", "create_schedule"]

EXCLUDES = ("norm_and_bias", "none")
"""``optim.exclude_from_decay`` and ``optim.lars_exclude``: which parameters are left out."""

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
"""Normalisation layers (BatchNorm and SyncBatchNorm, instance norm, GroupNorm, LayerNorm, RMSNorm)."""


def norm_and_bias(model: nn.Module) -> set[int]:
    """The ids of ``model``'s normalisation parameters (weights and biases of BatchNorm,
    SyncBatchNorm, GroupNorm, LayerNorm layers) and biases (any parameter named ``bias``): what
    MLPerf's large-batch recipes leave out of weight decay and LARS. In every network tsmtrain
    builds these are exactly its parameters with fewer than two dimensions
    (``tests/test_large_batch_knobs.py`` checks this by name)."""
    return {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
            if isinstance(m, _NORMS) or name == "bias"}


def param_groups(model: nn.Module, weight_decay: float, skip: nn.Module | None = None,
                 exclude_from_decay: str = "norm_and_bias", lars_exclude: str = "norm_and_bias") -> list[dict]:
    """Split parameters into weights and the normalisation parameters and biases
    (:func:`norm_and_bias`).

    Args:
        model: the network; parameters with ``requires_grad=False`` are left out.
        weight_decay: L2 penalty of the decayed parameters.
        skip: a submodule whose parameters are left out (a sharded head, which has its own
            optimizer).
        exclude_from_decay: ``norm_and_bias``: the second group gets no weight decay; ``none``:
            it gets ``weight_decay`` too.
        lars_exclude: ``norm_and_bias``: the second group has ``lars=False`` (no trust ratio);
            ``none``: ``lars=True``.

    Returns:
        Two param groups, each in ``model.parameters()`` order: the weights (convolution kernels,
        linear matrices) with ``weight_decay`` and ``lars=True``; the normalisation parameters
        and biases with ``weight_decay=0`` and ``lars=False`` by default.

    Raises:
        ValueError: an unknown ``exclude_from_decay`` or ``lars_exclude``.
    """
    for key, value in (("exclude_from_decay", exclude_from_decay), ("lars_exclude", lars_exclude)):
        if value not in EXCLUDES:
            raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(EXCLUDES)}")
    decay, plain = [], []
    skipped = set() if skip is None else {id(p) for p in skip.parameters()}
    excluded = norm_and_bias(model)
    for p in model.parameters():
        if p.requires_grad and id(p) not in skipped:
            (plain if id(p) in excluded else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0 if exclude_from_decay == "norm_and_bias" else weight_decay,
         "lars": lars_exclude == "none"},
    ]


def create_optimizer(model: nn.Module, cfg: OptimConfig, skip: nn.Module | None = None,
                     sum_across=None) -> torch.optim.Optimizer | None:
    """The optimizer a recipe's ``optim`` section asks for.

    Args:
        model: the network (its parameters split by :func:`param_groups`, as ``optim.exclude_from_decay``
            and ``optim.lars_exclude`` say).
        cfg: the recipe's ``optim`` section (:class:`tsmtrain.recipe.OptimConfig`).
        skip: a submodule left out (:func:`param_groups`).
        sum_across: ``model``'s tensors are shards of tensors split across ranks: LARS's norms
            are summed over the ranks with it (:class:`~tsmtrain.optim.lars.LARS`).

    Returns:
        :class:`~tsmtrain.optim.lars.LARS` (``optim.name: lars``, You et al. 2017) or
        ``torch.optim.SGD`` with momentum (``sgd``), at ``optim.base_lr``: the schedule
        (:func:`create_schedule`) sets the rate before every step.
    """
    groups = param_groups(model, cfg.weight_decay, skip, cfg.exclude_from_decay, cfg.lars_exclude)
    if not any(g["params"] for g in groups):
        return None
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.base_lr, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient, eps=cfg.lars_eps, sum_across=sum_across)
    for g in groups:
        g.pop("lars")
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def create_schedule(recipe: Recipe, scaling: LinearScaling, steps_per_epoch: int) -> LRSchedule:
    """The learning-rate schedule of a recipe's ``schedule`` section, peaking at the linearly
    scaled rate.

    Args:
        recipe: the recipe (its ``schedule`` and ``optim.base_lr`` are read).
        scaling: the linear scaling rule for the run's ranks (:func:`~tsmtrain.optim.linear_scaling`):
            ``scaling.lr`` is the peak rate.
        steps_per_epoch: optimizer steps per epoch (each of ``scaling.global_batch`` clips).

    Returns:
        An :class:`~tsmtrain.optim.schedule.LRSchedule` that warms up linearly over
        ``schedule.warmup_epochs`` from ``schedule.warmup_start_lr`` (default: ``optim.base_lr``, or
        ``scaling.lr`` when that is lower: Goyal et al. 2017, section 2.2, start at the rate of the
        small batch) to ``scaling.lr``, then decays as ``schedule.decay`` says.

    Raises:
        ValueError: ``steps_per_epoch`` is below 1.
    """
    s = recipe.schedule
    start = s.warmup_start_lr if s.warmup_start_lr is not None else min(recipe.optim.base_lr, scaling.lr)
    return LRSchedule(scaling.lr, steps_per_epoch, s.epochs, s.warmup_epochs, start, s.decay, s.milestones, s.gamma)
