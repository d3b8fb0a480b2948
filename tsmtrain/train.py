"""The training loop: what ``tsmtrain run recipe.yaml`` does on every rank.

Read top to bottom, :func:`train` is the whole run: set up the engine, data, model,
optimizer and schedule; restore the latest checkpoint when resuming; broadcast rank 0's state;
then for each epoch take optimizer steps (T-frame clips -> batched augmentation on the device ->
forward -> loss -> backward with ring-allreduce -> LARS/SGD step at the scheduled rate),
evaluate every ``eval_every`` epochs, and checkpoint. Rank 0 writes the run directory:

* ``recipe.yaml``: the resolved recipe,
* ``metrics.jsonl``: one JSON object per logging step and per evaluation,
* ``train.log``: the text log (also skipped videos, by path),
* ``checkpoint-STEP.pt``: see :mod:`tsmtrain.checkpoint`.

A run that finds checkpoints in its run directory continues from the latest one. SIGUSR2
(which Slurm sends before a time limit, ``sbatch --signal=USR2@SECONDS``, or on
``scancel --signal=USR2``) or SIGTERM (``scancel``, Slurm's preemption, ``kill``) asks for a
clean stop: the ranks agree on it through an allreduce, stop together at the next optimizer
step, rank 0 writes a checkpoint, and the run ends with :data:`EXIT_PREEMPTED`, on which the job
script requeues itself (:mod:`tsmtrain.dist.slurm`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data import ShardSampler, build_loader, clip_dataset, read_list
from .data.decoding import cuda_decoding_device
from .dist import DistError, create_engine, launched_by_launcher
from .dist.base import Engine, LocalEngine
from .dist.local import EXIT_PREEMPTED, PREEMPTED_FILE
from .models import create_model
from .optim import LRSchedule, create_optimizer
from .recipe import Recipe, derived_values, dump_recipe
from .data.transforms import VideoTransform

__all__ = ["train", "evaluate", "predict", "clip_dataset", "benchmark_allreduce", "TrainingError", "RunResult",
           "EXIT_PREEMPTED", "STOP_SIGNAL", "STOP_SIGNALS", "BREAKDOWN"]

log = logging.getLogger("tsmtrain")

STOP_SIGNAL = signal.SIGUSR2
"""The signal that asks a run to checkpoint and stop (Slurm's ``--signal=USR2@SECONDS``). Not
SIGUSR1, which NCCL may use."""

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""Every signal that asks a run to checkpoint and stop: :data:`STOP_SIGNAL`, and SIGTERM, which
``scancel`` and Slurm's preemption send (SIGKILL follows after ``KillWait``, 30 s by default)."""


class _StopRequest:
    """Notes any of :data:`STOP_SIGNALS` in a flag; the training loop polls it once per optimizer step.

    The handler only sets the flag (nothing else is safe inside a signal handler); the ranks
    then agree through an allreduce, so that all of them stop after the same step.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class TrainingError(RuntimeError):
    """A run cannot proceed for a reason the user can fix (named in the message)."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so rich's progress bar can redirect it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(rank: int, run_dir: Path) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    console = _StderrHandler()
    console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def _choose_engine(recipe: Recipe) -> Engine:
    if recipe.dist.engine != "none" and not launched_by_launcher():
        return LocalEngine()  # one process started by hand: nothing to allreduce
    cuda = recipe.train.device != "cpu" and torch.cuda.is_available()
    try:
        return create_engine(recipe.dist.engine, recipe.dist, cuda=cuda)
    except ImportError as err:
        raise TrainingError(f"dist.engine: {recipe.dist.engine}: cannot import it ({err}); run make setup") from None
    except DistError as err:
        raise TrainingError(str(err)) from None


def _choose_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("train.device: cuda was asked for but no GPU is visible")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda", torch.cuda.current_device())


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
        preempted: the run stopped early on :data:`STOP_SIGNAL`, after writing a checkpoint.
    """

    step: int
    epoch: int
    eval: dict
    model: torch.nn.Module
    rank: int = 0
    preempted: bool = False


class _Metrics:
    """Appends JSON records to metrics.jsonl on rank 0."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# what each rank sums over a logging interval (indices into one float64 tensor, allreduced at its end)
_ACC = ("loss", "clips", "correct", "failed", "data", "augment", "forward_backward", "allreduce_wait", "optimizer",
        "elapsed")
_LOSS, _CLIPS, _CORRECT, _FAILED, _DATA, _AUGMENT, _FORWARD_BACKWARD, _ALLREDUCE_WAIT, _OPTIMIZER, _ELAPSED = range(len(_ACC))
BREAKDOWN = ("data", "augment", "forward_backward", "allreduce_wait", "optimizer", "other")
"""The phases of an optimizer step in ``metrics.jsonl``'s ``breakdown_s`` (seconds per step, mean
over ranks): waiting for the DataLoader; host-to-device copy and batched augmentation; forward
and backward (the gradient allreduce runs beside backward); waiting for that allreduce after
backward, i.e. the part backward did not hide (Horovod: ``optimizer.synchronize()``; DDP, which
waits inside ``backward()``: from the last gradient computed to the last bucket averaged,
:meth:`~tsmtrain.dist.base.Engine.hidden_wait_s`); the optimizer step; the rest (stop-request
vote, bookkeeping). They add up to ``step_time_s``."""


class _PhaseClock:
    """Adds the seconds since a time mark to one entry of the interval sums.

    Disabled (``train.breakdown: false``) it does nothing at all. Enabled on a GPU it
    synchronises the device first, so that the asynchronous kernels of a phase count in it.
    """

    def __init__(self, acc: torch.Tensor | None, device: torch.device, enabled: bool):
        self.acc, self.enabled, self.cuda = acc, enabled, device.type == "cuda"

    def lap(self, index: int, since: float) -> float:
        if not self.enabled:
            return since
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.acc[index] += now - since
        return now


def _interval_record(tot: torch.Tensor, size: int, steps: int, breakdown: bool) -> dict:
    """The metrics.jsonl fields of one logging interval from the sums over all ranks ``tot``
    (indexed by ``_ACC``): clips/s use the mean over ranks of the interval's wall time."""
    elapsed = tot[_ELAPSED].item() / size  # mean over ranks, seconds
    clips = tot[_CLIPS].item()
    record = dict(loss=tot[_LOSS].item() / clips, train_top1=100 * tot[_CORRECT].item() / clips,
                  clips_per_s=clips / max(elapsed, 1e-9), clips_per_s_per_rank=clips / max(elapsed, 1e-9) / size,
                  data_wait_fraction=tot[_DATA].item() / max(tot[_ELAPSED].item(), 1e-9),
                  skipped_videos=int(tot[_FAILED].item()), interval_steps=steps, step_time_s=elapsed / steps)
    if breakdown:
        phases = {name: tot[i].item() / size / steps
                  for name, i in zip(BREAKDOWN, (_DATA, _AUGMENT, _FORWARD_BACKWARD, _ALLREDUCE_WAIT, _OPTIMIZER))}
        phases["other"] = max(0.0, elapsed / steps - sum(phases.values()))
        record["breakdown_s"] = phases
    return record


def benchmark_allreduce(engine: Engine, model: torch.nn.Module, repeats: int, fp16: bool = False) -> dict:
    """Time a gradient allreduce on its own, not overlapped with backward.

    Every trainable parameter's gradient tensor (zeros where there is none) is allreduced the way
    the engine does it during backward (:meth:`~tsmtrain.dist.base.Engine.allreduce_gradients`:
    Horovod's named asynchronous allreduces fused by its background thread, DDP's 25 MB
    buckets), ``repeats`` times after a barrier each; the scaling model
    (:mod:`tsmtrain.scaling`) compares this with the wait measured in training to find how much
    of the allreduce backward hides.

    Returns:
        ``{"seconds": median over repeats of the mean over ranks, "times_s": [...], "repeats": R,
        "bytes": bytes sent into one allreduce (2 per value with fp16 compression, else 4),
        "parameters": number of parameters}``.
    """
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for p in model.parameters() if p.requires_grad]
    if fp16:
        grads = [g.half() for g in grads]
    times = []
    for _ in range(repeats):
        engine.barrier()
        t0 = time.perf_counter()
        engine.allreduce_gradients(grads)
        if grads and grads[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = engine.allreduce(torch.tensor(times, dtype=torch.float64), average=True).tolist()
    return dict(seconds=sorted(times)[len(times) // 2], times_s=times, repeats=repeats,
                bytes=sum(g.numel() * g.element_size() for g in grads),
                parameters=sum(p.numel() for p in model.parameters()))


def _progress(enabled: bool, total: int, completed: int):
    """A rich progress bar with clips/s and ETA on an interactive rank 0; otherwise none."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]:.1f} clips/s  loss {task.fields[loss]:.3f}"),
                   TimeRemainingColumn(), transient=False)
    bar.add_task("train", total=total, completed=completed, epoch=0, speed=0.0, loss=float("nan"))
    return bar


def train(recipe: Recipe, resume: bool | None = None) -> RunResult:
    """Run a recipe on this rank until its last epoch, ``train.stop_after_steps``, or a stop
    request (:data:`STOP_SIGNAL`).

    Args:
        recipe: a validated recipe (:func:`tsmtrain.recipe.load_recipe`).
        resume: ``None`` (default): continue from the latest checkpoint in the run directory
            when there is one (same step, learning rate, position in the epoch's sample order,
            random states, and every rank's BatchNorm statistics); ``True``: a checkpoint must
            be there; ``False``: start afresh, which needs a run directory without checkpoints.

    Returns:
        A :class:`RunResult`.

    Raises:
        TrainingError: nothing to resume from, a checkpoint of another model, a dataset
            smaller than one global batch, ...
        tsmtrain.data.ListFileError: a malformed list file.
    """
    with _StopRequest() as stop:
        return _train(recipe, resume, stop)


def _train(recipe: Recipe, resume: bool | None, stop: _StopRequest) -> RunResult:
    engine = _choose_engine(recipe)
    rank0 = engine.rank == 0
    run_dir = Path(recipe.run.dir) / recipe.run.name
    _setup_logging(engine.rank, run_dir)
    if rank0:
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # a stop of an earlier start is history now
    slurm_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) if "SLURM_JOB_ID" in os.environ else 0
    torch.set_num_threads(recipe.train.threads or slurm_cpus or max(1, (os.cpu_count() or 1) // engine.local_size))
    device = _choose_device(recipe.train.device, engine.local_rank)
    print(f"[rank {engine.rank}] rank {engine.rank} of {engine.size} ({engine.name}) on {socket.gethostname()}, "
          f"local rank {engine.local_rank} of {engine.local_size}, device {device}, {torch.get_num_threads()} threads",
          file=sys.stderr, flush=True)
    d, t = recipe.data, recipe.train
    derived = derived_values(recipe, engine.size)

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
            f"{d.train_list}: {len(train_set)} videos give no full global batch of {derived['global_batch']} clips "
            f"(train.batch_size x ranks x dist.backward_passes_per_step); lower train.batch_size"
        )
    transform_gen = torch.Generator().manual_seed(t.seed * 1009 + engine.rank)
    train_tf = VideoTransform(train=True, input_size=d.input_size, scales=tuple(d.scales), flip=d.flip,
                              mean=d.mean, std=d.std, generator=transform_gen)
    val_tf = VideoTransform(train=False, input_size=d.input_size, mean=d.mean, std=d.std)

    # ---- model, optimizer, schedule
    torch.manual_seed(t.seed)  # same initial weights everywhere (rank 0's are broadcast anyway)
    model = create_model(recipe.model, d.num_segments).to(device)
    if recipe.model.sync_bn:
        model = engine.sync_batchnorm(model)  # BatchNorm over the global batch
    net = engine.wrap_model(model, fp16=recipe.dist.fp16_allreduce)  # trains through it; `model` is saved
    optimizer = engine.wrap_optimizer(create_optimizer(model, recipe.optim), model,
                                      fp16=recipe.dist.fp16_allreduce, backward_passes_per_step=bpps)
    s = recipe.schedule
    schedule = LRSchedule(derived["lr"], steps_per_epoch, s.epochs, s.warmup_epochs,
                          s.warmup_start_lr if s.warmup_start_lr is not None else min(recipe.optim.base_lr, derived["lr"]),
                          s.decay, s.milestones, s.gamma)
    step, epoch, micro_done, last_eval, pending_eval, rank_buffers = 0, 0, 0, {}, False, None
    torch.manual_seed(t.seed * 1009 + engine.rank)  # dropout differs across ranks, like the data
    path = ckpt.latest_checkpoint(run_dir)
    if resume and path is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir}")
    if resume is False and path is not None:
        raise TrainingError(f"{run_dir} already holds {path.name}: resume it, or choose another run.name")
    if path is not None:
        state = ckpt.load_checkpoint(path)
        # (sync_bn changes how statistics are computed, not the weights: a run may switch it)
        theirs = {k: v for k, v in state["recipe"]["model"].items() if k != "sync_bn"}
        ours = recipe.model.model_dump(mode="json", exclude={"sync_bn"})
        if theirs != ours:
            diff = ", ".join(f"model.{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k])
            raise TrainingError(f"{path} is a checkpoint of another model ({diff}); choose another run.name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, micro_done = state["step"], state["epoch"], state["micro"]
        last_eval, pending_eval = state.get("eval", {}), state.get("pending_eval", False)
        saved_order = state.get("sampler")
        if saved_order and (saved_order["size"], saved_order["seed"]) != (len(train_set), t.seed):
            log.warning("the training list has %d videos (seed %d); the checkpoint's sample order was for %d "
                        "(seed %d): the rest of this epoch follows a different order",
                        len(train_set), t.seed, saved_order["size"], saved_order["seed"])
        if state["world_size"] == engine.size:
            ckpt.set_rng_state(state["rng"][engine.rank], transform_gen)
            rank_buffers = (state.get("rank_buffers") or [None] * engine.size)[engine.rank]
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: random streams restart",
                        state["world_size"], engine.size)
        log.info("resuming from %s at step %d (epoch %d)", path, step, epoch)
    engine.broadcast_state(model, optimizer)
    if rank_buffers is not None:  # stopped mid-epoch: each rank's own BatchNorm statistics
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in rank_buffers:
                    buf.copy_(rank_buffers[name])

    metrics = _Metrics(run_dir / "metrics.jsonl" if rank0 else None)
    if rank0:
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        log.info("run %s: %s, %d ranks (%s), device %s, global batch %d, lr %.4g, %d steps/epoch x %d epochs",
                 run_dir, "TSM" if recipe.model.shift else "TSN", engine.size, engine.name, device,
                 derived["global_batch"], derived["lr"], steps_per_epoch, s.epochs)

    total_steps = steps_per_epoch * s.epochs
    stop_at = min(total_steps, t.stop_after_steps or total_steps)
    bar = _progress(rank0, total_steps, step)
    if pending_eval and val_records:  # the run stopped at an epoch's end before evaluating it
        last_eval = _evaluate_epoch(model, val_records, recipe, engine, device, val_tf, metrics, epoch, step)
    stopping = False
    stop_flag = torch.zeros(1, dtype=torch.float64)
    clock = _PhaseClock(acc=None, device=device, enabled=t.breakdown)

    # one loader for the whole run: its workers persist across epochs (the sampler, which runs in
    # this process, says which epoch and where in it)
    loader = build_loader(train_set, train_sampler, t.batch_size, d.workers, drop_last=True,
                          pin_memory=device.type == "cuda", persistent=True)
    with bar or nullcontext():
        while epoch < s.epochs and step < stop_at and not stopping:
            train_sampler.set_epoch(epoch, skip=micro_done * t.batch_size)
            model.train()
            # per logging interval, on each rank: the sums in _ACC (seconds, clips, ...); loss and
            # correct accumulate on the device so that no step waits for a .item()
            acc = torch.zeros(len(_ACC), dtype=torch.float64)
            clock.acc = acc
            on_device = torch.zeros(2, dtype=torch.float64, device=device)
            interval_steps = 0
            t_last = time.perf_counter()
            t_ready = t_last
            for batch in loader:
                t_got = time.perf_counter()
                acc[_DATA] += t_got - t_ready
                if micro_done % bpps == 0:  # first pass of an optimizer step: vote on stopping after it
                    stop_flag[0] = float(stop.requested)
                    vote = engine.allreduce_async(stop_flag, name="stop_request")
                for failed in batch["failed"]:
                    log.warning("skipped unreadable video: %s", failed)
                acc[_FAILED] += len(batch["failed"])
                x = train_tf(batch["frames"].to(device, non_blocking=True))
                y = batch["label"].to(device, non_blocking=True)
                t_prev = clock.lap(_AUGMENT, t_got)
                with engine.accumulate(net, last=(micro_done + 1) % bpps == 0):  # DDP: no_sync() until the last
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                    (loss / bpps).backward()
                on_device[0] += loss.detach() * len(y)
                on_device[1] += (logits.argmax(1) == y).sum()
                acc[_CLIPS] += len(y)
                micro_done += 1
                t_prev = clock.lap(_FORWARD_BACKWARD, t_prev)
                if micro_done % bpps == 0:
                    engine.wait_gradients(optimizer)
                    t_prev = clock.lap(_ALLREDUCE_WAIT, t_prev)
                    if clock.enabled:  # DDP waited inside backward(): count that as allreduce wait
                        hidden = min(engine.hidden_wait_s(), acc[_FORWARD_BACKWARD].item())
                        acc[_FORWARD_BACKWARD] -= hidden
                        acc[_ALLREDUCE_WAIT] += hidden
                    lr = schedule.apply(optimizer, step)
                    engine.step(optimizer)
                    optimizer.zero_grad()  # (Horovod's override takes no set_to_none)
                    clock.lap(_OPTIMIZER, t_prev)
                    step += 1
                    interval_steps += 1
                    # (a request during the last step changes nothing: the run ends normally)
                    stopping = engine.synchronize(vote).item() > 0 and step < stop_at
                    if (step % t.log_every == 0 or step == stop_at or micro_done == steps_per_epoch * bpps
                            or stopping):
                        acc[_LOSS], acc[_CORRECT] = on_device.tolist()
                        acc[_ELAPSED] = time.perf_counter() - t_last
                        record = _interval_record(engine.allreduce(acc, average=False), engine.size,
                                                  interval_steps, t.breakdown)
                        record = dict(epoch=epoch, step=step, lr=lr, **record)
                        metrics.write(**record)
                        if bar is not None:
                            bar.update(bar.task_ids[0], completed=step, epoch=epoch, speed=record["clips_per_s"],
                                       loss=record["loss"])
                        elif rank0:
                            eta = (stop_at - step) * record["step_time_s"]
                            log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f clips/s data wait %.0f%% eta %.0fs",
                                     epoch, step, total_steps, record["loss"], lr, record["clips_per_s"],
                                     100 * record["data_wait_fraction"], eta)
                        acc.zero_()
                        on_device.zero_()
                        interval_steps = 0
                        t_last = time.perf_counter()
                    if step >= stop_at or micro_done == steps_per_epoch * bpps or stopping:
                        break
                t_ready = time.perf_counter()
            epoch_done = micro_done == steps_per_epoch * bpps
            if not epoch_done and step < stop_at and not stopping:  # cannot happen unless the sampler is wrong
                raise RuntimeError(f"the loader ended after {micro_done} of {steps_per_epoch * bpps} batches")
            if epoch_done:
                epoch, micro_done = epoch + 1, 0
                engine.average_buffers(model)  # one model on every rank for evaluation and checkpoint
            last = epoch == s.epochs
            wants_eval = epoch_done and bool(val_records) and (epoch % t.eval_every == 0 or last)
            if wants_eval and not stopping:
                last_eval = _evaluate_epoch(model, val_records, recipe, engine, device, val_tf, metrics, epoch, step)
            if (epoch_done and (epoch % t.checkpoint_every == 0 or last)) or step >= stop_at or stopping:
                train_sampler.set_epoch(epoch, skip=micro_done * t.batch_size)  # where a resumed run goes on
                _save(engine, run_dir, model, optimizer, step, epoch, micro_done, transform_gen, recipe, last_eval,
                      pending_eval=wants_eval and stopping, sampler=train_sampler.state_dict(), stopping=stopping)
    if t.allreduce_benchmark and not stopping:
        metrics.write(step=step, allreduce_benchmark=benchmark_allreduce(engine, model, t.allreduce_benchmark,
                                                                         fp16=recipe.dist.fp16_allreduce))
    if stopping:
        log.info("stop requested (%s): stopped at step %d of %d with a checkpoint; exit status %d",
                 stop.signal_name or "another rank's signal", step, total_steps, EXIT_PREEMPTED)
    return RunResult(step, epoch, last_eval, model, engine.rank, preempted=stopping)


def _evaluate_epoch(model, val_records, recipe, engine, device, val_tf, metrics, epoch, step) -> dict:
    """Evaluate after epoch ``epoch - 1``, log it and append it to metrics.jsonl."""
    result = evaluate(model, val_records, recipe, engine, device, val_tf)
    metrics.write(epoch=epoch - 1, step=step, **{f"val_{k}": v for k, v in result.items()})
    log.info("epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d clips)",
             epoch - 1, result["top1"], result["top5"], result["loss"], result["clips"])
    return result


def _save(engine, run_dir, model, optimizer, step, epoch, micro, transform_gen, recipe, last_eval,
          pending_eval=False, sampler=None, stopping=False) -> None:
    """Rank 0 writes the checkpoint; every rank returns only once it is on disk.

    Mid-epoch (``micro > 0``) the ranks' BatchNorm statistics still differ (they are averaged
    at epoch ends), so each rank's own are stored too, and a resumed run continues exactly.
    When ``stopping`` (a stop signal), rank 0 then writes :data:`~tsmtrain.dist.local.PREEMPTED_FILE`, so
    the launcher knows the stop was clean whatever status it sees.
    """
    rngs = engine.allgather_object(ckpt.rng_state(transform_gen), name="rng_states")  # every rank's streams
    buffers = None
    if micro and engine.size > 1:
        own = {k: v.detach().cpu() for k, v in model.named_buffers() if v.is_floating_point()}
        buffers = engine.allgather_object(own, name="rank_buffers")
    if engine.rank == 0:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
            "micro": micro, "world_size": engine.size, "rng": rngs, "rank_buffers": buffers, "sampler": sampler, "eval": last_eval,
            "pending_eval": pending_eval, "recipe": recipe.model_dump(mode="json"),
        }
        path = ckpt.save_checkpoint(state, run_dir, step, keep=recipe.train.keep_checkpoints)
        log.info("checkpoint %s", path)
        if stopping:
            ckpt.write_json(run_dir / PREEMPTED_FILE, {"step": step, "checkpoint": path.name,
                                                       "job": os.environ.get("SLURM_JOB_ID"), "time": time.time()})
    engine.barrier()  # no rank exits (and ends the job step) while the checkpoint is being written


def prepare_dataset(recipe: Recipe) -> None:
    """Build the dataset a recipe's ``data.generate`` names (``demo``: rendered with ffmpeg;
    ``arrow_of_time``: cut from ``data.source``) in ``data.root``; nothing when it is not set.
    Both builders skip what is already there."""
    d = recipe.data
    if d.generate is None:
        return
    log.info("preparing the %s dataset in %s", d.generate, d.root)
    if d.generate == "demo":
        from .data.synthetic import generate_demo_dataset

        generate_demo_dataset(d.root, num_classes=recipe.model.num_classes)
    else:
        from .data.arrow import build_arrow_of_time

        build_arrow_of_time(d.source, d.root)


@torch.no_grad()
def predict(model, records, recipe: Recipe, engine: Engine, device, transform):
    """Run ``model`` in evaluation mode over this rank's shard of ``records``.

    Yields ``(logits (N, K), labels (N,), failed paths)`` per batch, on ``device``; videos are
    sampled at segment centres and centre-cropped by ``transform``.
    """
    dataset = clip_dataset(recipe, records, train=False,
                           decode_device=cuda_decoding_device(recipe.data.decode_device, torch.device(device)))
    sampler = ShardSampler(len(dataset), engine.rank, engine.size, shuffle=False, pad=False)
    loader = build_loader(dataset, sampler, recipe.train.batch_size, recipe.data.workers, drop_last=False)
    was_training = model.training
    model.eval()
    for batch in loader:
        yield model(transform(batch["frames"].to(device))), batch["label"].to(device), batch["failed"]
    model.train(was_training)


def evaluate(model, records, recipe: Recipe, engine: Engine, device, transform) -> dict:
    """Top-1, top-5 (percent) and mean cross-entropy loss on a list of videos, over all ranks.

    Each rank evaluates its own shard (:func:`predict`); sums are allreduced, so every video
    counts once whatever the number of ranks.
    """
    k = min(5, recipe.model.num_classes)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, clips, failed
    for logits, y, failed in predict(model, records, recipe, engine, device, transform):
        for path in failed:
            log.warning("skipped unreadable video: %s", path)
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(1).sum().item()
        sums[3] += len(y)
        sums[4] += len(failed)
    tot = engine.allreduce(sums, average=False)
    n = max(tot[3].item(), 1)
    return {"top1": 100 * tot[1].item() / n, "top5": 100 * tot[2].item() / n, "loss": tot[0].item() / n,
            "clips": int(tot[3].item()), "skipped_videos": int(tot[4].item())}
