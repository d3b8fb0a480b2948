"""Multigrid training (Wu, Girshick, He, Feichtenhofer, Krähenbühl, "A Multigrid Method for Efficiently
Training Video Models", CVPR 2020): the schedule of clip shapes, batch sizes and learning rates.

Our own code after PySlowFast's (``slowfast/utils/multigrid.py``, ``slowfast/datasets/multigrid_helper.py``),
in the terms of a recipe (``data.num_segments`` T0, ``data.input_size`` S0, ``train.batch_size`` B0):

* **Long cycle** (``multigrid.long_cycle``): each ``(t, s)`` of ``multigrid.long_cycle_factors`` is a
  stage of clips of ``T = max(1, round(T0 t))`` segments and side ``S = max(8, round(S0 s))`` pixels,
  with ``B = B0 * max(1, round(T0 S0^2 / (T S^2)))`` clips per rank per backward pass, so that a step
  costs about as much as one at the base shape. The baseline's epochs are cut into intervals (its
  step-decay milestones, PySlowFast's ``SOLVER.STEPS``; one interval with cosine or no decay); every
  interval but the last is one long cycle, its stages given epochs in proportion to their mean batch
  (so each stage takes about as many steps); the last interval
  (``multigrid.base_shape_fraction``) is trained at the base shape, with as few steps as the
  saving of the cycles says. All epochs are then scaled to ``multigrid.epoch_factor`` times
  ``schedule.epochs`` and the stage ends rounded to whole epochs (a stage may round to none).
* **Short cycle** (``multigrid.short_cycle``): within any stage, optimizer steps cycle through
  three shapes: side ``round(S0 f)`` for each f of ``multigrid.short_cycle_factors`` with the
  batch times ``round((S / side)^2)``, then the stage's own shape; the cycle restarts every epoch.
  Alone (without the long cycle) it trains ``epoch_factor`` times the epochs at T0.
* **BatchNorm** normalises sub-batches of ``multigrid.bn_clips`` clips (``train.batch_size`` when
  unset) separately (:mod:`tsmtrain.models.sub_batch_norm`), as PySlowFast's ``BN_BASE_SIZE``.
* **Learning rate**: the baseline's curve (warmup, cosine or step decay, peak from the linear
  scaling rule) is stretched piecewise linearly onto the multigrid epochs (each long cycle onto
  its interval), then multiplied by the stage's batch over ``train.batch_size`` (the linear rule for
  the stage's global batch, as PySlowFast's ``SOLVER.LRS``); the short cycle's larger batches keep
  their stage's rate, as in PySlowFast.

All ranks hold the same number of clips per epoch (:class:`~tsmtrain.data.RankSampler` pads), so
they take the same steps. Imports no torch: ``tsmtrain validate`` prints the schedule.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ..errors import TrainingError

if TYPE_CHECKING:
    from ..optim.schedule import LRSchedule
    from ..recipe import Recipe

__all__ = ["Shape", "Stage", "MultigridSchedule", "multigrid_on", "plan_stages", "LR_RESOLUTION"]

LR_RESOLUTION = 100_000
"""Steps per baseline epoch of the learning-rate curve that :class:`MultigridSchedule` stretches
(fine enough that its rounding of warmup and fractions is invisible)."""


@dataclass(frozen=True)
class Shape:
    """The shape of one optimizer step's backward passes.

    Attributes:
        batch: clips per rank per backward pass.
        segments: T, segments per clip.
        size: S, the side of the square crop in pixels.
    """

    batch: int
    segments: int
    size: int


@dataclass(frozen=True)
class Stage:
    """A run of whole epochs at one long-cycle shape.

    Attributes:
        cycle: the long cycle (0-based); the base-shape part at the end has the next index.
        first_epoch, end_epoch: its epochs, ``first_epoch <= e < end_epoch``.
        shapes: the short cycle in step order (one shape without it); the last is the stage's own.
        lr_factor: the learning rate's factor, the stage's batch over ``train.batch_size``.
    """

    cycle: int
    first_epoch: int
    end_epoch: int
    shapes: tuple[Shape, ...]
    lr_factor: float


def multigrid_on(recipe: Recipe) -> bool:
    """Whether ``recipe`` trains with multigrid (a long or short cycle)."""
    return recipe.multigrid.long_cycle or recipe.multigrid.short_cycle


def _stage_shapes(recipe: Recipe, t_factor: float, s_factor: float) -> tuple[tuple[Shape, ...], float]:
    """The short cycle of the stage ``(t_factor, s_factor)`` and the mean of the batch factors that
    PySlowFast's schedule weighs its epochs by (``round(T0 S0^2 / (T s^2))`` per shape)."""
    mg, t0, s0, b0 = recipe.multigrid, recipe.data.num_segments, recipe.data.input_size, recipe.train.batch_size
    t, s = max(1, round(t0 * t_factor)), max(8, round(s0 * s_factor))
    batch = b0 * max(1, round(t0 * s0 * s0 / (t * s * s)))
    own = Shape(batch, t, s)
    shapes = [own]
    if mg.short_cycle:
        sides = [max(8, round(s0 * f)) for f in mg.short_cycle_factors]
        shapes = [Shape(batch * max(1, round((s / side) ** 2)), t, side) for side in sides] + [own]
    weights = [round(t0 * s0 * s0 / (x.segments * x.size ** 2)) for x in shapes]
    return tuple(shapes), sum(weights) / len(weights)


def _intervals(recipe: Recipe) -> tuple[list[float], float]:
    """The baseline epochs each long cycle stands for (boundaries ``[0, ..., split]``) and where the
    base-shape part starts (``split``)."""
    s, mg = recipe.schedule, recipe.multigrid
    milestones = list(s.milestones) if s.decay == "step" else []
    if mg.base_shape_fraction is None and milestones:
        return [0.0, *map(float, milestones)], float(milestones[-1])
    split = s.epochs * (1 - (0.2 if mg.base_shape_fraction is None else mg.base_shape_fraction))
    return [0.0, *(float(m) for m in milestones if m < split), split], split


def plan_stages(recipe: Recipe) -> tuple[list[Stage], list[tuple[float, float]]]:
    """The stages of ``recipe``'s multigrid schedule (those that round to no epoch left out) and the
    knots ``(multigrid epoch, baseline epoch)`` of the learning-rate curve's stretch.

    Raises:
        ValueError: multigrid is off.
    """
    if not multigrid_on(recipe):
        raise ValueError("multigrid is off in this recipe")
    mg, epochs = recipe.multigrid, recipe.schedule.epochs
    base = _stage_shapes(recipe, 1.0, 1.0)
    if not mg.long_cycle:  # the short cycle alone: epoch_factor times the epochs at the base shape
        end = max(1, int(epochs * mg.epoch_factor))  # PySlowFast: int(MAX_EPOCH * EPOCH_FACTOR)
        return [Stage(0, 0, end, base[0], 1.0)], [(0.0, 0.0), (float(end), float(epochs))]
    cycle = [_stage_shapes(recipe, t, s) for t, s in mg.long_cycle_factors]
    bounds, split = _intervals(recipe)
    weight = sum(avg for _, avg in cycle)
    planned: list[tuple[int, tuple[Shape, ...], float]] = []  # (cycle, shapes, epochs before scaling)
    iters = 0.0
    for i in range(len(bounds) - 1):
        length = bounds[i + 1] - bounds[i]
        for shapes, avg in cycle:
            planned.append((i, shapes, length * avg / weight))
            iters += length / weight
    saving = split / iters if iters else 1.0  # how many times fewer steps the cycles take
    planned.append((len(bounds) - 1, base[0], (epochs - split) / saving * base[1]))
    scale = epochs * mg.epoch_factor / sum(p[2] for p in planned)
    stages, knots, done, first = [], [], 0.0, 0
    for i, shapes, length in planned:
        done += length * scale
        end = round(done)
        if end <= first:
            continue
        if not stages or stages[-1].cycle != i:  # the first stage of a cycle: where its interval starts
            knots.append((float(first), bounds[i]))  # (the base-shape part's: bounds[-1], the split)
        own = shapes[-1]
        stages.append(Stage(i, first, end, shapes, own.batch / recipe.train.batch_size))
        first = end
    knots.append((float(first), float(epochs)))
    return stages, knots


class MultigridSchedule:
    """The steps of a multigrid run on one rank: the shape of every optimizer step, the epochs, and
    the learning rate.

    Args:
        recipe: a recipe with ``multigrid.long_cycle`` or ``multigrid.short_cycle`` on.
        clips_per_rank: this rank's clips per epoch (the padded share, the same on every rank);
            None: unknown (``tsmtrain validate`` before the dataset exists): only the stages, no steps.

    Raises:
        TrainingError: a step of some stage needs more clips than a rank has per epoch (names the
            stage's shape and batch).
    """

    def __init__(self, recipe: Recipe, clips_per_rank: int | None):
        self.recipe, self.clips_per_rank = recipe, clips_per_rank
        self.passes = recipe.dist.backward_passes_per_step
        self.stages, self.knots = plan_stages(recipe)
        self.epochs = self.stages[-1].end_epoch
        self._steps: dict[Stage, list[Shape]] = {}  # each stage's steps of an epoch
        for stage in self.stages if clips_per_rank is not None else ():
            biggest = max(stage.shapes, key=lambda x: x.batch)
            if biggest.batch * self.passes > clips_per_rank:
                raise TrainingError(
                    f"multigrid: epochs {stage.first_epoch}..{stage.end_epoch - 1} take steps of "
                    f"{biggest.batch} clips of {biggest.segments}x{biggest.size}x{biggest.size} (T x S x S) per rank "
                    f"(x {self.passes} passes), more than the {clips_per_rank} clips per rank of an epoch; lower "
                    "train.batch_size or use a longer training list")

    def stage(self, epoch: int) -> Stage:
        """The stage of ``epoch`` (the last stage for an epoch past the end)."""
        return next((s for s in self.stages if epoch < s.end_epoch), self.stages[-1])

    def epoch_steps(self, epoch: int) -> list[Shape]:
        """The shape of each optimizer step of ``epoch``, in order: the stage's short cycle from its
        start, while a whole step's clips (``passes x batch``) are left (the rest is dropped)."""
        return self._steps_of(self.stage(epoch))

    def _steps_of(self, stage: Stage) -> list[Shape]:
        cache = self._steps
        if stage not in cache:
            steps, used = [], 0
            while True:
                shape = stage.shapes[len(steps) % len(stage.shapes)]
                if used + shape.batch * self.passes > self.clips_per_rank:
                    break
                steps.append(shape)
                used += shape.batch * self.passes
            cache[stage] = steps
        return cache[stage]

    def micro_batches(self, epoch: int) -> list[tuple[int, int]]:
        """``(batch, segments)`` of every backward pass of ``epoch`` (``passes`` per step): what the
        loader's batch sampler serves."""
        return [(s.batch, s.segments) for s in self.epoch_steps(epoch) for _ in range(self.passes)]

    def shape(self, epoch: int, micro: int) -> Shape:
        """The shape of backward pass ``micro`` (0-based) of ``epoch``."""
        return self.epoch_steps(epoch)[micro // self.passes]

    def bn_splits(self, shape: Shape) -> int:
        """Sub-batches each BatchNorm normalises separately at ``shape``: ``batch / multigrid.bn_clips``
        (``train.batch_size`` when unset), lowered to a divisor of the batch; 1 with ``model.sync_bn``."""
        if self.recipe.model.sync_bn:
            return 1
        k = max(1, shape.batch // (self.recipe.multigrid.bn_clips or self.recipe.train.batch_size))
        while shape.batch % k:
            k -= 1
        return k

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch``."""
        return len(self.epoch_steps(epoch))

    @cached_property
    def _starts(self) -> list[int]:
        """The first step of each epoch, and the total at the end."""
        starts = [0]
        for epoch in range(self.epochs):
            starts.append(starts[-1] + self.steps_in(epoch))
        return starts

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self._starts[-1]

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, step in that epoch)`` of optimizer step ``step`` (0-based)."""
        epoch = min(bisect.bisect_right(self._starts, step) - 1, self.epochs - 1)
        return epoch, step - self._starts[epoch]

    def step_at(self, epoch: float) -> int:
        """The optimizer step (0-based) at which the run has trained ``epoch`` epochs, fractions
        rounded to whole steps of that epoch (``dist.local_sgd_start``)."""
        whole = min(int(epoch), self.epochs)
        if whole == self.epochs:
            return self.total_steps
        return self._starts[whole] + int(round((epoch - whole) * self.steps_in(whole)))

    def baseline_epoch(self, step: int) -> float:
        """Where optimizer step ``step`` lies on the baseline's epoch axis (the learning-rate
        curve's): its multigrid epoch, ``epoch + k / steps_in(epoch)``, mapped piecewise linearly
        through :attr:`knots`."""
        epoch, k = self.locate(step)
        x = epoch + k / max(1, self.steps_in(epoch))
        for (x0, y0), (x1, y1) in zip(self.knots, self.knots[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return self.knots[-1][1]

    def lr_schedule(self, baseline: LRSchedule) -> "MultigridLR":
        """The learning rate per step from ``baseline``, the recipe's schedule built with
        :data:`LR_RESOLUTION` steps per epoch (:func:`tsmtrain.optim.create_schedule`)."""
        return MultigridLR(self, baseline)

    def rows(self, world_size: int = 1, peak_lr: float | None = None) -> list[dict]:
        """One dict per stage for ``tsmtrain validate`` and the run's log: its epochs (first-last),
        long cycle, the short cycle's shapes as ``T x S x S`` (``/`` between them) with the batch
        per rank, the global batch (``world_size`` ranks, ``passes`` each) and the clips per
        BatchNorm sub-batch of each, the learning-rate factor (and the
        stage's peak rate, given the run's ``peak_lr``), and the steps per epoch and in all (when
        the clips per rank are known)."""
        rows = []
        for s in self.stages:
            row = {"epochs": f"{s.first_epoch}-{s.end_epoch - 1}", "cycle": s.cycle,
                   "shapes": " / ".join(f"{x.segments}x{x.size}x{x.size}" for x in s.shapes),
                   "batch_per_rank": " / ".join(str(x.batch) for x in s.shapes),
                   "global_batch": " / ".join(str(x.batch * world_size * self.passes) for x in s.shapes),
                   "bn_clips": " / ".join(str(x.batch // self.bn_splits(x)) for x in s.shapes),
                   "lr_factor": s.lr_factor}
            if peak_lr is not None:
                row["peak_lr"] = peak_lr * s.lr_factor
            if self.clips_per_rank is not None:
                steps = len(self._steps_of(s))
                row.update(steps_per_epoch=steps, steps=steps * (s.end_epoch - s.first_epoch))
            rows.append(row)
        return rows


class MultigridLR:
    """The learning rate of a multigrid run per optimizer step: ``baseline`` at the step's place
    on the baseline's epoch axis (:meth:`MultigridSchedule.baseline_epoch`) times its stage's
    ``lr_factor``; during warmup the ramp still starts at the baseline's start rate and rises to the
    stage's peak (Goyal et al. 2017, 2.2: start at the small batch's rate). Stateless, like
    :class:`~tsmtrain.optim.schedule.LRSchedule`, so a resumed run gets the same rates."""

    def __init__(self, schedule: MultigridSchedule, baseline: LRSchedule):
        self.schedule, self.baseline = schedule, baseline

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        epoch, _ = self.schedule.locate(step)
        at = self.schedule.baseline_epoch(step) * self.baseline.steps_per_epoch
        factor, b = self.schedule.stage(epoch).lr_factor, self.baseline
        if at < b.warmup_steps:
            return b.start_lr + (b.peak_lr * factor - b.start_lr) * at / b.warmup_steps
        return b(at) * factor

    def apply(self, optimizer, step: int) -> float:
        """Set the rate for ``step`` in every param group of ``optimizer``; returns it."""
        from ..optim.schedule import set_rate  # (here: this module imports no torch)

        return set_rate(optimizer, self(step))
