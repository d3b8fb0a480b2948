"""The training loop: what ``tsmtrain run recipe.yaml`` does on every rank.

Read top to bottom: :func:`train` sets the run up (:func:`_set_up`: engine, data, model, step,
optimizer and schedule; the latest checkpoint when resuming; rank 0's state broadcast), then
runs epochs (:func:`_run`). :func:`_train_epoch` is one optimizer step after another: T-frame
clips -> batched augmentation on the device -> forward and loss under autocast -> backward with
ring-allreduce -> LARS/SGD step at the scheduled rate (:class:`~tsmtrain.train.step.TrainStep`
holds precision, channels_last and compile). Every ``eval_every`` epochs it evaluates
(:mod:`~tsmtrain.train.evaluate`), every ``checkpoint_every`` it checkpoints
(:mod:`~tsmtrain.train.checkpoint`). Rank 0 writes the run directory:

* ``recipe.yaml``: the resolved recipe,
* ``metrics.jsonl``: one JSON object per logging interval and per evaluation
  (:mod:`~tsmtrain.train.metrics`),
* ``tensorboard/``: the same numbers as TensorBoard scalars (``train.tensorboard``,
  :mod:`~tsmtrain.train.tensorboard`),
* ``train.log``: the text log (also skipped videos, by path),
* ``checkpoint-STEP.pt``: see :mod:`tsmtrain.train.checkpoint`.

A run that finds checkpoints in its run directory continues from the latest one. SIGUSR2
(which Slurm sends before a time limit, ``sbatch --signal=USR2@SECONDS``, or on
``scancel --signal=USR2``) asks for a clean stop: the ranks agree on it through an allreduce,
stop together at the next optimizer step, rank 0 writes a checkpoint, and the run ends with
:data:`EXIT_PREEMPTED`, on which the job script requeues itself (:mod:`tsmtrain.dist.slurm`).
"""

from __future__ import annotations

import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import ShardSampler, build_loader, clip_dataset, read_list
from ..data.decoding import cuda_decoding_device
from ..data.transforms import VideoTransform
from ..dist.base import Engine
from ..dist.local import EXIT_PREEMPTED, PREEMPTED_FILE
from ..models import create_model
from ..optim import LRSchedule, create_optimizer, create_schedule, linear_scaling
from ..recipe import Recipe, dump_recipe
from . import checkpoint as ckpt
from .bench import benchmark_allreduce
from .evaluate import evaluate_epoch
from .metrics import Interval, MetricsWriter, PhaseClock
from .rundir import RunLock, claim_run_dir
from .runtime import (StopRequest, TrainingError, choose_device, choose_engine, keep_freed_memory, log,
                      prepare_dataset, progress_bar, set_threads, setup_logging)
from .step import TrainStep, half_precision_note
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
        preempted: the run stopped early on :data:`~tsmtrain.train.STOP_SIGNAL`, after writing a checkpoint.
    """

    step: int
    epoch: int
    eval: dict
    model: torch.nn.Module
    rank: int = 0
    preempted: bool = False


@dataclass
class _Run:
    """What one rank's run holds once it is set up."""

    recipe: Recipe
    engine: Engine
    device: torch.device
    run_dir: Path
    model: torch.nn.Module  # the eager module: optimised, saved, broadcast, evaluated
    step: TrainStep  # forward/backward and the optimizer step (precision, channels_last, compile)
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    loader: torch.utils.data.DataLoader
    sampler: ShardSampler
    train_tf: VideoTransform
    val_tf: VideoTransform
    val_records: list
    transform_gen: torch.Generator
    metrics: MetricsWriter
    clock: PhaseClock
    steps_per_epoch: int
    stop_at: int  # the optimizer step the run ends at (last epoch's end, or train.stop_after_steps)

    @property
    def passes(self) -> int:
        """Backward passes per optimizer step."""
        return self.recipe.dist.backward_passes_per_step

    def save(self, pos: ckpt.Position, stopping: bool = False) -> None:
        self.sampler.set_epoch(pos.epoch, skip=pos.micro * self.recipe.train.batch_size)  # where a resumed run goes on
        ckpt.save_run_checkpoint(self.engine, self.run_dir, self.model, self.optimizer, self.step, pos,
                                 self.transform_gen, self.recipe, sampler=self.sampler.state_dict(), stopping=stopping)


def train(recipe: Recipe, resume: bool | None = None) -> RunResult:
    """Run a recipe on this rank until its last epoch, ``train.stop_after_steps``, or a stop
    request (:data:`~tsmtrain.train.STOP_SIGNAL`).

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
            smaller than one global batch, torch.compile failing (``train.compile``), ...
        tsmtrain.data.ListFileError: a malformed list file.
    """
    with StopRequest() as stop:
        run, pos = _set_up(recipe, resume)
        with run.metrics:  # closes the TensorBoard event file however the run ends
            return _run(run, pos, stop)


def _set_up(recipe: Recipe, resume: bool | None) -> tuple[_Run, ckpt.Position]:
    check_tensorboard(recipe.train.tensorboard)  # on every rank, before any collective
    engine = choose_engine(recipe)
    run_dir = recipe.run_dir
    # one run per run directory: rank 0 locks it before writing anything there, every rank raises
    # if another run holds it; run.metrics releases the lock when train() ends
    lock = claim_run_dir(engine, run_dir)
    try:
        return _set_up_locked(recipe, resume, engine, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _set_up_locked(recipe: Recipe, resume: bool | None, engine: Engine, run_dir: Path,
                   lock: RunLock | None) -> tuple[_Run, ckpt.Position]:
    """The rest of :func:`_set_up`, once rank 0 holds the run directory (``lock``)."""
    rank0 = engine.rank == 0
    setup_logging(engine.rank, run_dir)
    if rank0:
        if lock.note:
            log.warning("%s", lock.note)
        ckpt.remove_stale_temporaries(run_dir)  # killed checkpoint writes (no run writes here now)
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # a stop of an earlier start is history now
    threads = set_threads(recipe.train.threads, engine.local_size)
    kept = keep_freed_memory()  # steps reuse freed activations instead of page-faulting fresh ones
    device = choose_device(recipe.train.device, engine.local_rank)
    print(f"[rank {engine.rank}] rank {engine.rank} of {engine.size} ({engine.name}) on {socket.gethostname()}, "
          f"local rank {engine.local_rank} of {engine.local_size}, device {device}, {threads} threads"
          + (", freed memory kept (glibc mallopt)" if kept else ""),
          file=sys.stderr, flush=True)
    d, t = recipe.data, recipe.train
    scaling = linear_scaling(recipe, engine.size)

    # ---- data
    if d.generate is not None:
        if rank0:
            prepare_dataset(recipe)
        engine.barrier()
    train_records = read_list(d.train_list, d.root, recipe.model.num_classes)
    val_records = read_list(d.val_list, d.root, recipe.model.num_classes) if d.val_list else []
    train_set = clip_dataset(recipe, train_records, train=True,
                             decode_device=cuda_decoding_device(d.decode_device, device))
    train_sampler = ShardSampler(len(train_set), engine.rank, engine.size, shuffle=True, pad=True, seed=t.seed)
    bpps = recipe.dist.backward_passes_per_step
    steps_per_epoch = len(train_sampler.shard()) // t.batch_size // bpps
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{d.train_list}: {len(train_set)} videos give no full global batch of {scaling.global_batch} clips "
            f"(train.batch_size x ranks x dist.backward_passes_per_step); lower train.batch_size"
        )
    transform_gen = torch.Generator().manual_seed(t.seed * 1009 + engine.rank)
    train_tf = VideoTransform(train=True, input_size=d.input_size, scales=tuple(d.scales), flip=d.flip,
                              mean=d.mean, std=d.std, generator=transform_gen)
    val_tf = VideoTransform(train=False, input_size=d.input_size, mean=d.mean, std=d.std)
    # one loader for the whole run: its workers persist across epochs (the sampler, which runs in
    # this process, says which epoch and where in it)
    loader = build_loader(train_set, train_sampler, t.batch_size, d.workers, drop_last=True,
                          pin_memory=device.type == "cuda", persistent=True)

    # ---- model, step, optimizer, schedule
    torch.manual_seed(t.seed)  # same initial weights everywhere (rank 0's are broadcast anyway)
    model = create_model(recipe.model, d.num_segments).to(device)
    if recipe.model.sync_bn:
        model = engine.sync_batchnorm(model)  # BatchNorm over the global batch
    # before Horovod wraps the optimizer, so that compile's check fires no allreduce hooks; the
    # step trains through the engine's wrapper (DDP), and `model` is what is evaluated and saved
    step = TrainStep(model, device, t.precision, t.channels_last, t.compile,
                     batch_shape=(t.batch_size, d.num_segments, 3, d.input_size, d.input_size),
                     wrap=lambda m: engine.wrap_model(m, fp16=recipe.dist.fp16_allreduce))
    optimizer = engine.wrap_optimizer(create_optimizer(model, recipe.optim), model,
                                      fp16=recipe.dist.fp16_allreduce, backward_passes_per_step=bpps)
    s = recipe.schedule
    schedule = create_schedule(recipe, scaling, steps_per_epoch)
    torch.manual_seed(t.seed * 1009 + engine.rank)  # dropout differs across ranks, like the data

    # ---- resume
    pos, rank_buffers = ckpt.Position(), None
    path, state = ckpt.resume_checkpoint(engine, run_dir, resume)  # rank 0's choice: the newest intact one
    if path is not None:
        pos, rank_buffers = ckpt.restore_run(path, engine, model, optimizer, step, transform_gen, recipe, len(train_set),
                                             state=state)
        del state
    engine.broadcast_state(model, optimizer)
    if rank_buffers is not None:  # stopped mid-epoch: each rank's own BatchNorm statistics
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in rank_buffers:
                    buf.copy_(rank_buffers[name])

    metrics = MetricsWriter.for_rank(run_dir, engine.rank, t.tensorboard, resumed_at=pos.step, run_lock=lock)
    note = half_precision_note(t.precision, device)
    if rank0 and note:
        log.warning("%s", note)
    if rank0:
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        log.info("run %s: %s, %d ranks (%s), device %s, %s%s%s, global batch %d, lr %.4g, %d steps/epoch x %d epochs",
                 run_dir, "TSM" if recipe.model.shift else "TSN", engine.size, engine.name, device, t.precision,
                 ", channels_last" if t.channels_last else "", ", compiled" if t.compile else "",
                 scaling.global_batch, scaling.lr, steps_per_epoch, s.epochs)
    total_steps = steps_per_epoch * s.epochs
    run = _Run(recipe, engine, device, run_dir, model, step, optimizer, schedule, loader, train_sampler, train_tf,
               val_tf, val_records, transform_gen, metrics, PhaseClock(device, t.breakdown), steps_per_epoch,
               stop_at=min(total_steps, t.stop_after_steps or total_steps))
    return run, pos


def _run(run: _Run, pos: ckpt.Position, stop: StopRequest) -> RunResult:
    """Epochs until the last, ``stop_at`` or a stop request; evaluation and checkpoints."""
    r, t, epochs = run, run.recipe.train, run.recipe.schedule.epochs
    bar = progress_bar(r.engine.rank == 0, r.steps_per_epoch * epochs, pos.step)
    if pos.pending_eval and r.val_records:  # the run stopped at an epoch's end before evaluating it
        pos.eval = evaluate_epoch(r.model, r.val_records, r.recipe, r.engine, r.device, r.val_tf, r.metrics,
                                  pos.epoch, pos.step)
    pos.pending_eval = stopping = False
    with bar or nullcontext():
        while pos.epoch < epochs and pos.step < r.stop_at and not stopping:
            stopping = _train_epoch(r, pos, stop, bar)
            epoch_done = pos.micro == r.steps_per_epoch * r.passes
            if not epoch_done and pos.step < r.stop_at and not stopping:  # cannot happen unless the sampler is wrong
                raise RuntimeError(f"the loader ended after {pos.micro} of {r.steps_per_epoch * r.passes} batches")
            if epoch_done:
                pos.epoch, pos.micro = pos.epoch + 1, 0
                r.engine.average_buffers(r.model)  # one model on every rank for evaluation and checkpoint
            last = pos.epoch == epochs
            wants_eval = epoch_done and bool(r.val_records) and (pos.epoch % t.eval_every == 0 or last)
            if wants_eval and not stopping:
                pos.eval = evaluate_epoch(r.model, r.val_records, r.recipe, r.engine, r.device, r.val_tf, r.metrics,
                                          pos.epoch, pos.step)
            if (epoch_done and (pos.epoch % t.checkpoint_every == 0 or last)) or pos.step >= r.stop_at or stopping:
                pos.pending_eval = wants_eval and stopping
                r.save(pos, stopping=stopping)
            if epoch_done:
                r.metrics.flush()  # TensorBoard shows the epoch and its evaluation now
    if t.allreduce_benchmark and not stopping:
        r.metrics.write(step=pos.step, allreduce_benchmark=benchmark_allreduce(
            r.engine, r.model, t.allreduce_benchmark, fp16=r.recipe.dist.fp16_allreduce))
    if stopping:
        log.info("stop requested (%s): stopped at step %d of %d with a checkpoint; exit status %d",
                 stop.signal_name or "another rank's signal", pos.step, r.steps_per_epoch * epochs, EXIT_PREEMPTED)
    return RunResult(pos.step, pos.epoch, pos.eval, r.model, r.engine.rank, preempted=stopping)


def _train_epoch(r: _Run, pos: ckpt.Position, stop: StopRequest, bar) -> bool:
    """Optimizer steps from ``pos`` until the epoch ends, ``r.stop_at``, or the ranks agree on a
    stop request; advances ``pos``. Returns whether the run is stopping on request."""
    r.sampler.set_epoch(pos.epoch, skip=pos.micro * r.recipe.train.batch_size)
    r.model.train()
    interval = Interval(r.device)  # sums of this logging interval, on this rank
    for batch in _timed(r.loader, interval):
        r.clock.mark()
        if pos.micro % r.passes == 0:  # first pass of an optimizer step: vote on stopping after it
            vote = r.engine.allreduce_async(torch.tensor([float(stop.requested)], dtype=torch.float64),
                                            name="stop_request")
        for failed in batch["failed"]:
            log.warning("skipped unreadable video: %s", failed)
        interval.add("failed", len(batch["failed"]))
        x = r.train_tf(batch["frames"].to(r.device, non_blocking=True))  # (N, T, 3, H, W) float
        y = batch["label"].to(r.device, non_blocking=True)
        r.clock.lap("augment")
        with r.engine.accumulate(r.step.forward_model, last=(pos.micro + 1) % r.passes == 0):  # DDP: no_sync()
            logits, loss = r.step.forward_backward(x, y, passes=r.passes)  # the allreduce runs during backward
        interval.add_batch(loss, logits, y)
        pos.micro += 1
        r.clock.lap("forward_backward")
        if pos.micro % r.passes:
            continue  # accumulate another backward pass
        r.engine.wait_gradients(r.optimizer)
        r.clock.lap("allreduce_wait")
        r.clock.move("forward_backward", "allreduce_wait", r.engine.hidden_wait_s())  # DDP waited in backward()
        lr = r.schedule.apply(r.optimizer, pos.step)
        r.step.apply(r.engine, r.optimizer)  # (fp16: unscale, step unless inf/NaN, update the scale)
        r.clock.lap("optimizer")
        pos.step += 1
        interval.steps += 1
        # (a request during the last step changes nothing: the run ends normally)
        stopping = r.engine.synchronize(vote).item() > 0 and pos.step < r.stop_at
        epoch_end = pos.micro == r.steps_per_epoch * r.passes
        if pos.step % r.recipe.train.log_every == 0 or pos.step == r.stop_at or epoch_end or stopping:
            _log_interval(r, pos, interval, lr, bar)
        if pos.step >= r.stop_at or epoch_end or stopping:
            return stopping
    return False


def _timed(loader, interval: Interval):
    """The loader's batches; the seconds spent waiting for each go to the interval's ``data``."""
    t_ready = time.perf_counter()
    for batch in loader:
        interval.add("data", time.perf_counter() - t_ready)
        yield batch
        t_ready = time.perf_counter()


def _log_interval(r: _Run, pos: ckpt.Position, interval: Interval, lr: float, bar) -> None:
    """Close the logging interval (one allreduce), append its record to metrics.jsonl and show it."""
    record = dict(epoch=pos.epoch, step=pos.step, lr=lr, **interval.close(r.engine, r.clock.collect()))
    if r.step.scaler is not None:
        record["loss_scale"] = r.step.loss_scale()
    r.metrics.write(**record)
    if bar is not None:
        bar.update(bar.task_ids[0], completed=pos.step, epoch=pos.epoch, speed=record["clips_per_s"],
                   loss=record["loss"])
    elif r.engine.rank == 0:
        eta = (r.stop_at - pos.step) * record["step_time_s"]
        log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f clips/s data wait %.0f%% eta %.0fs",
                 pos.epoch, pos.step, r.steps_per_epoch * r.recipe.schedule.epochs, record["loss"], lr,
                 record["clips_per_s"], 100 * record["data_wait_fraction"], eta)
