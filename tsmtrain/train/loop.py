"""The training loop: what ``tsmtrain run recipe.yaml`` does on every rank.

Read top to bottom: :func:`train` claims the run directory, sets the run up (:func:`_set_up`:
factory calls of :mod:`~tsmtrain.train.factory` for the device, the data and the network, then
the :class:`~tsmtrain.train.step.TrainStep` with its optimizer and schedule, and the latest
checkpoint when resuming), then runs epochs (:func:`_run`). :func:`_train_epoch` reads like
torchvision's ``train_one_epoch``: for each batch, the augmentation on the device, one call of
the step (forward and loss under autocast, backward with the ring-allreduce, and after the
last of ``dist.backward_passes_per_step`` passes the LARS/SGD step at the scheduled rate), and
the metrics out. Every ``eval_every`` epochs it evaluates (:mod:`~tsmtrain.eval.evaluate`),
every ``checkpoint_every`` it checkpoints (:mod:`~tsmtrain.train.checkpoint`). Rank 0 writes
the run directory:

* ``recipe.yaml``: the resolved recipe,
* ``metrics.jsonl``: one JSON object per logging interval and per evaluation
  (:mod:`~tsmtrain.train.metrics_log`),
* ``tensorboard/``: the same numbers as TensorBoard scalars (``train.tensorboard``,
  :mod:`~tsmtrain.train.tensorboard`),
* ``train.log``: the text log (also skipped videos, by path),
* ``checkpoint-STEP.pt``: see :mod:`tsmtrain.train.checkpoint`.

A run that finds checkpoints in its run directory continues from the latest one. SIGUSR2
(which Slurm sends before a time limit, ``sbatch --signal=USR2@SECONDS``, or on
``scancel --signal=USR2``) or SIGTERM asks for a clean stop (:mod:`tsmtrain.dist.stop`): the
ranks agree on it through an allreduce, stop together at the next optimizer step, rank 0 writes
a checkpoint, and the run ends with :data:`~tsmtrain.dist.stop.EXIT_PREEMPTED`, on which the
job script requeues itself (:mod:`tsmtrain.dist.slurm`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dist.base import Engine
from ..dist.local_sgd import LocalSGD, start_step
from ..dist.stop import EXIT_PREEMPTED, StopRequest
from ..dist.watchdog import Watchdog
from ..optim import batch_scaled_schedule, create_schedule, linear_scaling
from ..recipe import Recipe
from . import checkpoint as ckpt
from ..bench.allreduce import benchmark_allreduce
from ..eval.evaluate import evaluate_epoch
from .factory import (Loaders, announce_run, create_loaders, create_network, create_optimizers, resume_run,
                      start_rank)
from .multigrid import LR_RESOLUTION
from .precise_bn import recompute_bn_stats
from .metrics_log import Interval, MetricsWriter, PhaseClock
from .rundir import RunLock, claim_run_dir
from ..errors import TrainingError
from .setup import choose_engine, log, progress_bar, start_watchdog
from .step import NonFiniteLoss, TrainStep, targets
from .tensorboard import check_tensorboard

__all__ = ["train", "RunResult"]


@dataclass
class RunResult:
    """What :func:`train` ends with on this rank.

    Attributes:
        step: optimizer steps taken in total.
        epoch: epochs completed.
        eval: the last evaluation (``top1``, ``top5`` in percent, ``loss``, ``clips``,
            ``skipped_videos``); empty when nothing was evaluated.
        model: this rank's trained network.
        rank: this rank.
        preempted: the run stopped early on a stop request (:mod:`tsmtrain.dist.stop`), after writing a checkpoint.
    """

    step: int
    epoch: int
    eval: dict
    model: torch.nn.Module
    rank: int = 0
    preempted: bool = False


@dataclass
class _Run:
    """What one rank's run holds once it is set up (:func:`_set_up`)."""

    recipe: Recipe
    engine: Engine
    device: torch.device
    model: torch.nn.Module  # the eager module: optimised, saved, broadcast, evaluated
    step: TrainStep  # one optimizer step: passes, gradient wait, learning rate, fp16 scaler, optimizer
    data: Loaders
    metrics: MetricsWriter
    clock: PhaseClock
    stop_at: int  # the optimizer step the run ends at (last epoch's end, or train.stop_after_steps)
    sync: LocalSGD  # dist.sync: when the models are averaged, and the bytes allreduced
    watchdog: Watchdog | None = None  # told each optimizer step (its heartbeats carry it)

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return self.recipe.run_dir

    @property
    def passes(self) -> int:
        """Backward passes per optimizer step."""
        return self.step.passes

    @property
    def epochs(self) -> int:
        """Epochs of the run (``schedule.epochs``; multigrid: its schedule's)."""
        mg = self.data.multigrid
        return self.recipe.schedule.epochs if mg is None else mg.epochs

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        mg = self.data.multigrid
        return self.data.steps_per_epoch * self.epochs if mg is None else mg.total_steps

    def save(self, pos: ckpt.Position, stopping: bool = False) -> None:
        """Checkpoint the run at ``pos`` (every rank calls it; ``stopping``: a stop request's)."""
        self.data.seek(pos.epoch, pos.micro)  # where a resumed run goes on
        ckpt.save_run_checkpoint(self.engine, self.run_dir, self.model, self.step.optimizer, self.step, pos,
                                 self.data.transform_gen, self.recipe, sampler=self.data.sampler.state_dict(),
                                 stopping=stopping, local_sgd=self.sync.checkpoint_kind(pos.step))

    def evaluate(self, pos: ckpt.Position) -> dict:
        """Evaluate the model on the validation list and log the result at ``pos.step``; multigrid:
        with BatchNorm statistics recomputed at the base shape first (:mod:`~tsmtrain.train.precise_bn`)."""
        if self.data.multigrid is not None:
            recompute_bn_stats(self.model, self.data.train_records, self.recipe, self.device, self.data.val_tf,
                               pos.epoch)
        return evaluate_epoch(self.model, self.data.val_records, self.recipe, self.engine, self.device,
                              self.data.val_tf, self.metrics, pos.epoch, pos.step, self.step.head_parallel)


def train(recipe: Recipe, resume: bool | None = None) -> RunResult:
    """Run a recipe on this rank until its last epoch, ``train.stop_after_steps``, or a stop
    request (:data:`~tsmtrain.dist.stop.STOP_SIGNALS`).

    Rank 0 holds the run directory's lock (:func:`~tsmtrain.train.rundir.claim_run_dir`) from
    before it writes anything there until the run ends, however it ends.

    Args:
        recipe: a validated recipe (:func:`tsmtrain.recipe.load_recipe`).
        resume: ``None`` (default): continue from the latest checkpoint in the run directory
            when there is one (same step, learning rate, position in the epoch's sample order,
            random states, gradient scaler, and every rank's BatchNorm statistics); ``True``: a
            checkpoint must be there; ``False``: start afresh, which needs a run directory
            without checkpoints.

    Returns:
        A :class:`RunResult`.

    Raises:
        TrainingError: nothing to resume from, a checkpoint of another model, a dataset
            smaller than one global batch, torch.compile failing (``train.compile``), another
            run holding the run directory (:class:`~tsmtrain.train.rundir.RunDirInUse`), ...
        tsmtrain.data.ListFileError: a malformed list file.
    """
    with StopRequest() as stop:
        check_tensorboard(recipe.train.tensorboard)  # on every rank, before any collective
        engine = choose_engine(recipe)
        # a lost rank ends the job within dist.timeout_seconds; every exit from here says goodbye first
        watchdog, world = start_watchdog(recipe, engine)
        # one run per run directory: rank 0 locks it before writing anything there (other ranks: None)
        with watchdog or nullcontext(), claim_run_dir(engine, recipe.run_dir) or nullcontext() as lock:
            run, pos = _set_up(recipe, engine, lock, resume, world)
            run.watchdog = watchdog
            with run.metrics:  # closes the TensorBoard event file however the run ends
                return _run(run, pos, stop)


def _set_up(recipe: Recipe, engine: Engine, lock: RunLock | None,
            wanted: bool | None, world: str = "") -> tuple[_Run, ckpt.Position]:
    """Build this rank's run in the run directory that rank 0 holds (``lock``): device, data,
    network, the training step with its optimizer and learning rate schedule, and the position
    to start from (``wanted``: :func:`train`'s ``resume``). Rank 0 logs ``world`` (the ranks'
    hosts) first."""
    recipe = batch_scaled_schedule(recipe, engine.size)  # the epochs and warmup of this global batch
    t = recipe.train
    scaling = linear_scaling(recipe, engine.size)
    device = start_rank(recipe, engine, lock)
    if world and engine.rank == 0:
        log.info("%s", world)
    data = create_loaders(recipe, engine, device, scaling)
    model = create_network(recipe, engine, device)
    optimizer, head_optimizer, head_parallel = create_optimizers(recipe, engine, model)  # a sharded head: its own
    clock = PhaseClock(device, t.breakdown)
    d = recipe.dist  # (before the step wraps the model: local SGD changes the engine's gradient hook)
    sync = LocalSGD(engine, model, d.sync, d.local_sgd_period,
                    start_step(d.local_sgd_start, data.steps_per_epoch) if data.multigrid is None else
                    data.multigrid.step_at(d.local_sgd_start),
                    fp16_allreduce=d.fp16_allreduce, exclude=tuple(model.fc.parameters()) if head_parallel else ())
    # the step wraps the model for the engine (DDP), compiles it, and only then wraps the optimizer
    # (Horovod), so that compile's check fires no allreduce hooks; `model` is what is evaluated and saved
    schedule = (create_schedule(recipe, scaling, data.steps_per_epoch) if data.multigrid is None else
                data.multigrid.lr_schedule(create_schedule(recipe, scaling, LR_RESOLUTION)))
    step = TrainStep(model, device, precision=t.precision, channels_last=t.channels_last, compile=t.compile,
                     batch_shape=data.batch_shape, optimizer=optimizer, engine=engine, schedule=schedule,
                     passes=recipe.dist.backward_passes_per_step, fp16_allreduce=recipe.dist.fp16_allreduce,
                     clock=clock, loss=recipe.model.loss, head_parallel=head_parallel,
                     head_optimizer=head_optimizer, nonfinite=t.nonfinite, label_smoothing=t.label_smoothing)
    torch.manual_seed(t.seed * 1009 + engine.rank)  # dropout differs across ranks, like the data
    pos = resume_run(recipe, engine, step, data, wanted)
    metrics = MetricsWriter.for_rank(recipe.run_dir, engine.rank, t.tensorboard, resumed_at=pos.step)
    announce_run(recipe, engine, device, scaling, data.steps_per_epoch, data.multigrid and data.multigrid.epochs)
    run = _Run(recipe=recipe, engine=engine, device=device, model=model, step=step, data=data, metrics=metrics,
               clock=clock, stop_at=0, sync=sync)
    run.stop_at = min(run.total_steps, t.stop_after_steps or run.total_steps)
    if data.multigrid is not None and engine.rank == 0:
        for row in data.multigrid.rows(engine.size, scaling.lr):
            log.info("multigrid: %s", row)
    if engine.rank == 0 and engine.size > 1:
        log.info("%s", sync.describe())
    return run, pos


def _run(run: _Run, pos: ckpt.Position, stop: StopRequest) -> RunResult:
    """Epochs until the last, ``stop_at`` or a stop request; evaluation and checkpoints."""
    r, t, epochs = run, run.recipe.train, run.epochs
    if r.watchdog is not None:
        r.watchdog.step = pos.step
    bar = progress_bar(r.engine.rank == 0, r.total_steps, pos.step)
    if pos.pending_eval and r.data.val_records:  # the run stopped at an epoch's end before evaluating it
        pos.eval = r.evaluate(pos)
    pos.pending_eval = stopping = False
    with bar or nullcontext():
        while pos.epoch < epochs and pos.step < r.stop_at and not stopping:
            try:
                stopping = _train_epoch(r, pos, stop, bar)
            except NonFiniteLoss as err:  # on every rank at the same step, before the weights changed
                raise TrainingError(_nonfinite_message(err, r)) from None
            epoch_done = pos.micro == r.data.steps_in(pos.epoch) * r.passes
            if not epoch_done and pos.step < r.stop_at and not stopping:  # cannot happen unless the sampler is wrong
                raise RuntimeError(f"the loader ended after {pos.micro} of {r.data.steps_in(pos.epoch) * r.passes} "
                                   "batches")
            if epoch_done:
                pos.epoch, pos.micro = pos.epoch + 1, 0
                r.sync.epoch_done(pos.step)  # one model on every rank for evaluation and checkpoint
            last = pos.epoch == epochs
            wants_eval = epoch_done and bool(r.data.val_records) and (pos.epoch % t.eval_every == 0 or last)
            if wants_eval and not stopping:
                pos.eval = r.evaluate(pos)
            if (epoch_done and (pos.epoch % t.checkpoint_every == 0 or last)) or pos.step >= r.stop_at or stopping:
                pos.pending_eval = wants_eval and stopping
                r.save(pos, stopping=stopping)
            if epoch_done:
                r.metrics.flush()  # TensorBoard shows the epoch and its evaluation now
    if t.allreduce_benchmark and not stopping:
        r.metrics.write(step=pos.step, allreduce_benchmark=benchmark_allreduce(
            r.engine, r.model, t.allreduce_benchmark, fp16=r.recipe.dist.fp16_allreduce,
            skip=r.model.fc if r.step.head_parallel is not None else None))
    if stopping:
        log.info("stop requested (%s): stopped at step %d of %d with a checkpoint; exit status %d",
                 stop.signal_name or "another rank's signal", pos.step, r.total_steps, EXIT_PREEMPTED)
    return RunResult(pos.step, pos.epoch, pos.eval, r.model, r.engine.rank, preempted=stopping)


def _nonfinite_message(err: NonFiniteLoss, r: _Run) -> str:
    """The one line a run stopped by a non-finite loss ends with: the step, the last finite loss,
    and the checkpoint a rerun resumes from."""
    latest = ckpt.latest_checkpoint(r.run_dir)
    resume = (f"a rerun resumes from {latest.name} in {r.run_dir}" if latest is not None
              else "no checkpoint was written yet: a rerun starts afresh")
    return (f"{err}; the run stopped before applying it, without a checkpoint: {resume} (look at that "
            f"step's data, lower the learning rate, or set train.nonfinite: skip to skip such steps)")


def _train_epoch(r: _Run, pos: ckpt.Position, stop: StopRequest, bar) -> bool:
    """Optimizer steps from ``pos`` until the epoch ends, ``r.stop_at``, or the ranks agree on a
    stop request; advances ``pos``. Returns whether the run is stopping on request."""
    r.data.seek(pos.epoch, pos.micro)
    r.model.train()
    try:
        return _train_batches(r, pos, stop, bar)
    finally:
        if r.data.multigrid is not None:  # evaluation, checkpoints and what follows: the recipe's shape
            _set_shape(r, r.recipe.data.num_segments, r.recipe.data.input_size, 1)


def _set_shape(r: _Run, segments: int, size: int, bn_splits: int) -> None:
    """Multigrid: the network takes clips of ``segments`` segments, its BatchNorm layers normalise
    ``bn_splits`` sub-batches separately, the augmentation crops to ``size``."""
    r.model.set_segments(segments, bn_splits)
    r.data.train_tf.input_size = size


def _train_batches(r: _Run, pos: ckpt.Position, stop: StopRequest, bar) -> bool:
    """:func:`_train_epoch`'s steps, the loader already at ``pos``."""
    interval = Interval(r.device)  # sums of this logging interval, on this rank
    steps_in_epoch = r.data.steps_in(pos.epoch)
    for batch in _timed(r.data.train, interval):
        if r.data.multigrid is not None:  # this pass's clip shape (the loader's batch has its T)
            shape = r.data.multigrid.shape(pos.epoch, pos.micro)
            _set_shape(r, shape.segments, shape.size, r.data.multigrid.bn_splits(shape))
        r.clock.mark()
        if pos.micro % r.passes == 0:  # first pass of an optimizer step: vote on stopping after it
            vote = r.engine.allreduce_async(torch.tensor([float(stop.requested)], dtype=torch.float64),
                                            name="stop_request")
        x, y = _augment(r, batch, interval)  # (N, T, 3, H, W) float, (N,) on the device
        skipped = r.step.skipped_steps
        out = r.step(x, y, step=pos.step)  # forward, backward; after the last pass the optimizer step
        interval.add_batch(out.loss, out.best, y)
        pos.micro += 1
        if not out.stepped:
            continue  # accumulate another backward pass
        pos.step += 1
        if r.watchdog is not None:
            r.watchdog.step = pos.step
        if r.step.skipped_steps > skipped and r.engine.rank == 0:
            log.warning("step %d: the loss or a gradient is not finite: its update was skipped (train.nonfinite: "
                        "skip; %d skipped so far)", pos.step, r.step.skipped_steps)
        interval.steps += 1
        # (a request during the last step changes nothing: the run ends normally)
        stopping = r.engine.synchronize(vote).item() > 0 and pos.step < r.stop_at
        epoch_end = pos.micro == steps_in_epoch * r.passes
        r.sync.step_done(pos.step, epoch_end=epoch_end)  # local SGD: averages the models when due
        if pos.step % r.recipe.train.log_every == 0 or pos.step == r.stop_at or epoch_end or stopping:
            _log_interval(r, pos, interval, out.lr, bar)
        if pos.step >= r.stop_at or epoch_end or stopping:
            return stopping
    return False


def _augment(r: _Run, batch: dict, interval: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device, augmented: clips ``(N, T, C, H, W)`` float and labels ``(N,)``
    (multi-hot ``(N, K)`` for ``model.loss: sigmoid``, :func:`~tsmtrain.train.step.targets`);
    logs and counts the videos that could not be decoded. Laps ``augment`` on the clock."""
    for failed in batch["failed"]:
        log.warning("skipped unreadable video: %s", failed)
    interval.add("failed", len(batch["failed"]))
    x = r.data.train_tf(batch["frames"].to(r.device, non_blocking=True))
    y = targets(batch, r.recipe.model).to(r.device, non_blocking=True)
    r.clock.lap("augment")
    return x, y


def _timed(loader, interval: Interval):
    """The loader's batches; the seconds spent waiting for each go to the interval's ``data``."""
    t_ready = time.perf_counter()
    for batch in loader:
        interval.add("data", time.perf_counter() - t_ready)
        yield batch
        t_ready = time.perf_counter()


def _log_interval(r: _Run, pos: ckpt.Position, interval: Interval, lr: float, bar) -> None:
    """Close the logging interval (one allreduce), append its record to metrics.jsonl and show it."""
    steps = interval.steps
    record = dict(epoch=pos.epoch, step=pos.step, lr=lr, **interval.close(r.engine, r.clock.collect()))
    record["allreduce_bytes_per_step"] = r.sync.take_bytes() / max(steps, 1)  # gradients, or local SGD's averagings
    if r.step.scaler is not None:
        record["loss_scale"] = r.step.loss_scale()
    r.metrics.write(**record)
    if bar is not None:
        bar.update(bar.task_ids[0], completed=pos.step, epoch=pos.epoch, speed=record["clips_per_s"],
                   loss=record["loss"])
    elif r.engine.rank == 0:
        eta = (r.stop_at - pos.step) * record["step_time_s"]
        log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f clips/s data wait %.0f%% eta %.0fs",
                 pos.epoch, pos.step, r.total_steps, record["loss"], lr,
                 record["clips_per_s"], 100 * record["data_wait_fraction"], eta)
