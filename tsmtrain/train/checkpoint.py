"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, the optimizer state, the schedule position (optimizer step),
the epoch and the position inside it (``micro``, and the sampler's state: epoch, clips to skip,
seed, list size), every rank's random-number-generator states, every rank's BatchNorm
statistics when it was written mid-epoch (``rank_buffers``; they are averaged at epoch ends),
whether the epoch's evaluation is still due (``pending_eval``), the fp16 gradient scaler's state
(``scaler``), and the recipe. Rank 0 writes it atomically (:func:`tsmtrain.io.write_atomic`):
into a temporary file in the run directory (``.checkpoint-*.pt.part-*``), flushed and fsync'ed,
then renamed over the final name (and the folder fsync'ed), so a job killed mid-write leaves
the previous checkpoint intact and never a truncated one; the next start removes the temporary
file such a kill leaves (:func:`remove_stale_temporaries`). A write that fails (a full disk)
removes its temporary file and stops every rank with one line naming the file and the cause
(:class:`CheckpointWriteError`).

With a classifier sharded across ranks (``model.head_parallel``) every rank also writes its
shard of the head, before rank 0's file (:mod:`~tsmtrain.train.head_slices`); a checkpoint
with a shard missing or damaged is skipped as a damaged one is.

Files are checked before they are unpickled (:func:`check_checkpoint`: not empty, a
complete zip archive whose members all pass their CRC check): a truncated file, which a disk
or filesystem failure can still leave, makes torch's loader raise a long traceback, and an
empty one aborts the interpreter. A run resumes from the newest intact checkpoint and says
which newer ones it skipped (:func:`resume_checkpoint`).

Every file is read with ``torch.load(..., weights_only=True)`` (:func:`~tsmtrain.tensorfile.read_tensors`): tensors and
plain Python values only. A file whose pickle names any other Python object (a crafted
checkpoint's ``os.system``) is refused before it is unpickled (:class:`UnsafeCheckpointError`):
such a file is an attack, not damage, so a resumed run stops instead of skipping it. What a
checkpoint holds besides tensors is plain (the random states: :func:`rng_state`); checkpoints
written before, whose NumPy random state is a NumPy array, load with exactly the NumPy types of
that state allowed (:data:`OLD_NUMPY_STATE`), and resume exactly.

:func:`resume_checkpoint`, :func:`save_run_checkpoint` and :func:`restore_run` are what the
training loop calls; the functions before them only handle files and random states.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dist.stop import PREEMPTED_FILE
from ..tensorfile import OLD_NUMPY_STATE, CheckpointError, UnsafeCheckpointError, first_line, read_tensors
from ..io import FileWriteError, write_atomic, write_json
from .head_slices import head_state, missing_slices, slice_files, slice_path
from ..errors import TrainingError
from .setup import log

__all__ = ["save_checkpoint", "latest_checkpoint", "checkpoints", "check_checkpoint", "load_checkpoint",
           "remove_stale_temporaries", "rng_state", "set_rng_state", "Position", "resume_checkpoint",
           "save_run_checkpoint", "restore_run", "CheckpointError", "CheckpointWriteError", "CORRUPT_SUFFIX",
           "UnsafeCheckpointError", "read_tensors", "OLD_NUMPY_STATE"]

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")
_TEMPORARIES = (".checkpoint-*.part-*",  # tsmtrain.io.write_atomic's temporary files of checkpoint-*.pt
                ".checkpoint-*.tmp")  # and those of tsmtrain versions before it
_NEARLY_FULL = 64 * 2**20  # bytes: less free space than this after a failed write means the disk is full

CORRUPT_SUFFIX = ".corrupt"
"""Appended to the name of a damaged checkpoint a resumed run skipped (``checkpoint-00000050.pt.corrupt``):
kept for inspection, no longer taken for a checkpoint, counted among the kept ones, or resumed."""


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (the message names the file, the cause, and the previous
    checkpoint, which is intact); its temporary file is removed."""


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``run_dir/checkpoint-STEP.pt`` atomically; keep the newest ``keep``.

    Returns:
        The path written.

    Raises:
        CheckpointWriteError: the file cannot be written (a full disk, a quota, an I/O error;
            torch's ``RuntimeError`` on a short write included). The message is one line naming
            the file and the cause; the temporary file is removed and the earlier checkpoints
            are untouched.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:08d}.pt"
    write_atomically(state, final, latest_checkpoint(run_dir))
    for old in checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
        for shard in slice_files(old):  # a sharded head's files go with their checkpoint
            shard.unlink(missing_ok=True)
    return final


def write_atomically(state: dict[str, Any], final: Path, previous: Path | None = None) -> None:
    """``torch.save`` ``state`` into a temporary file beside ``final``, flushed and fsync'ed, then
    renamed over it (:func:`save_checkpoint`; also a sharded head's files).

    Raises:
        CheckpointWriteError: as :func:`save_checkpoint` (``previous``: the checkpoint the
            message says is intact).
    """
    run_dir = final.parent
    sink = None
    try:
        with write_atomic(final) as part, open(part, "wb") as f:  # fsync, rename, fsync of the folder
            sink = _Sink(f)
            torch.save(state, sink)
    except (FileWriteError, RuntimeError) as exc:  # the temporary file is gone, the old files untouched
        err = exc.__cause__ or exc if isinstance(exc, FileWriteError) else exc  # FileWriteError: from the OSError
        cause = _write_cause(err, sink.error if sink else None, run_dir)  # while the temporary file fills the disk
        kept = (f"the previous checkpoint {previous.name} is intact" if previous is not None
                else "no earlier checkpoint was written")
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {cause}; {kept}") from exc


class _Sink:
    """The file torch.save writes into, noting the ``OSError`` of a failed write: torch turns it
    into a ``RuntimeError`` (``unexpected pos``) that no longer says why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_cause(exc: BaseException, noted: OSError | None, run_dir: Path) -> str:
    """A failed write's cause in a few words: the ``OSError``'s (``no space left on device``); for
    torch's ``RuntimeError``, no space left when the disk is (nearly) full, else its first line."""
    err = exc if isinstance(exc, OSError) else noted
    if err is not None:
        if err.errno == errno.ENOSPC:
            return "no space left on device"
        if err.errno == errno.EDQUOT:
            return "disk quota exceeded"
        text = err.strerror or str(err) or type(err).__name__
        return text[:1].lower() + text[1:]
    try:
        if shutil.disk_usage(run_dir).free < _NEARLY_FULL:
            return "no space left on device"
    except OSError:
        pass
    return first_line(exc)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files (``.checkpoint-*.pt.part-*``; ``.checkpoint-*.tmp`` of earlier
    versions) of checkpoint writes that were killed (``kill -9``, a node failure) from
    ``run_dir``, saying so in the log. Call it only while
    holding the run directory (:mod:`~tsmtrain.train.rundir`): a running run's file would go too.

    Returns:
        The files removed.
    """
    removed = []
    for tmp in sorted(p for pattern in _TEMPORARIES for p in Path(run_dir).glob(pattern)):
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s (%.1f MB), left by a checkpoint write that was killed", tmp, size / 1e6)
        removed.append(tmp)
    return removed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or ``None``; it is not checked
    (:func:`check_checkpoint`)."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints (``checkpoint-STEP.pt``) in ``run_dir``, highest step first; ``[]`` when
    there are none or no such directory."""
    found = [p for p in Path(run_dir).glob("checkpoint-*.pt") if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def check_checkpoint(path: str | Path, crc: bool = True) -> str | None:
    """Why ``path`` is not an intact checkpoint file, or ``None`` when it is one: not empty, a
    complete zip archive (what ``torch.save`` writes) and, with ``crc``, every member passing its
    CRC-32 check (this reads the whole file; without it only the archive's directory at its end
    is read). Never unpickles: torch's loader aborts the interpreter on an empty file.

    Returns:
        ``None``, or the reason in a few words: ``empty (0 bytes)``, ``truncated (not a complete
        zip archive)``, ``corrupt (...)``, ``unreadable (...)``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty (0 bytes)"
        if not zipfile.is_zipfile(path):
            return "truncated (not a complete zip archive)"
        if crc:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"corrupt (member {bad} fails its CRC check)"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except Exception as err:  # noqa: BLE001 - zipfile raises BadZipFile, EOFError, struct.error, ...
        return f"corrupt ({first_line(err)})"
    return None


def load_checkpoint(path: str | Path, crc: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU, after checking the file
    (:func:`check_checkpoint`; ``crc``: all of it).

    Returns:
        The state dictionary.

    Raises:
        UnsafeCheckpointError: the file holds Python objects that could run code
            (:func:`read_tensors`); nothing of it was unpickled.
        CheckpointError: the file is missing, empty, truncated, corrupt, or torch cannot load it
            (``reason`` says which).
    """
    reason = check_checkpoint(path, crc=crc)
    if reason is not None:
        raise CheckpointError(path, reason)
    state = read_tensors(path)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a checkpoint (holds a {type(state).__name__})")
    return state


def rng_state(extra: torch.Generator | None = None) -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states, and ``extra``'s, as
    tensors and plain values (what ``torch.load(weights_only=True)`` reads): NumPy's Mersenne
    Twister as ``{"kind", "key" (int64 tensor (624,) of the uint32 key), "pos", "has_gauss",
    "gauss"}``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if extra is not None:
        state["extra"] = extra.get_state()
    return state


def set_rng_state(state: dict[str, Any], extra: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` returned (or, in checkpoints written before, the same with
    ``np.random.get_state()``'s tuple as it is)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if extra is not None and "extra" in state:
        extra.set_state(state["extra"])


@dataclass
class Position:
    """Where a run is; what a checkpoint restores besides weights and random states.

    Attributes:
        step: optimizer steps done.
        epoch: epochs done.
        micro: backward passes done in the current epoch.
        eval: the last evaluation (:func:`tsmtrain.eval.evaluate`'s result), ``{}`` before one.
        pending_eval: the run stopped at an epoch's end before evaluating it.
    """

    step: int = 0
    epoch: int = 0
    micro: int = 0
    eval: dict = field(default_factory=dict)
    pending_eval: bool = False


def resume_checkpoint(engine, run_dir: Path, resume: bool | None) -> tuple[Path | None, dict | None]:
    """The checkpoint a run continues from: rank 0 picks the newest intact one in ``run_dir`` and
    every rank gets its path (one ``allgather_object``), so that all load the same file. Every
    rank must call it.

    Damaged checkpoints newer than the one picked are skipped with a warning naming each and why
    (``skipped checkpoint-00000050.pt: truncated (not a complete zip archive)``) and renamed with
    :data:`CORRUPT_SUFFIX`: the run continues from an earlier step, and they are no longer taken
    for checkpoints (nor counted among the kept ones). Call it only while holding the run
    directory (:mod:`~tsmtrain.train.rundir`).

    Args:
        engine: the run's engine.
        run_dir: the run directory.
        resume: ``None``: the newest intact checkpoint if there is any checkpoint; ``True``: there
            must be one; ``False``: there must be none (a fresh start).

    Returns:
        ``(path, state)``: the checkpoint (``None``: start afresh) and, on rank 0, its state as
        loaded (:func:`load_checkpoint`; ``None`` on other ranks, which load it themselves).

    Raises:
        TrainingError: on every rank: ``resume`` and no checkpoint; ``resume is False`` and a
            checkpoint; checkpoints but none intact (the message names each and why).
    """
    choice, state = (None, None), None
    if engine.rank == 0:
        try:
            path, state = _pick_checkpoint(Path(run_dir), resume)
            choice = (None if path is None else str(path), None)
        except TrainingError as err:
            choice = (None, str(err))
    path, refusal = engine.allgather_object(choice, name="resume_checkpoint")[0]
    if refusal is not None:
        raise TrainingError(refusal)
    return (None if path is None else Path(path)), state


def _pick_checkpoint(run_dir: Path, resume: bool | None) -> tuple[Path | None, dict | None]:
    """Rank 0's part of :func:`resume_checkpoint`."""
    found = checkpoints(run_dir)
    if not found:
        if resume:
            raise TrainingError(f"--resume: no checkpoint in {run_dir}")
        return None, None
    if resume is False:
        raise TrainingError(f"{run_dir} already holds {found[0].name}: resume it, or choose another run.name")
    skipped = []
    for path in found:
        try:
            state = load_checkpoint(path)  # UnsafeCheckpointError (an attack, not damage) stops the run
            if not {"model", "step", "recipe"} <= state.keys():
                raise CheckpointError(path, "not a checkpoint of a run (no model, step or recipe)")
            reason = missing_slices(path, state, check_checkpoint)
            if reason is not None:
                raise CheckpointError(path, reason)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            skipped.append((path, err.reason))
            continue
        for bad, reason in skipped:
            kept = bad.with_name(bad.name + CORRUPT_SUFFIX)
            try:
                os.replace(bad, kept)
                log.warning("skipped %s: %s; kept as %s", bad.name, reason, kept.name)
            except OSError as err:
                log.warning("skipped %s: %s (cannot rename it: %s)", bad.name, reason, err.strerror or err)
        return path, state
    listed = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
    raise TrainingError(f"no intact checkpoint to resume from in {run_dir} ({listed}): move them out of the run "
                        f"directory to start afresh, or choose another run.name")


def save_run_checkpoint(engine, run_dir: Path, model, optimizer, train_step, pos: Position, transform_gen,
                        recipe, sampler: dict | None = None, stopping: bool = False,
                        local_sgd: str | None = None) -> None:
    """Rank 0 writes the run's checkpoint; every rank returns only once it is on disk.

    Mid-epoch (``pos.micro > 0``) the ranks' BatchNorm statistics still differ (they are averaged
    at epoch ends), so each rank's own are stored too, and a resumed run continues exactly.
    Under local SGD (``dist.sync: local_sgd``, :mod:`tsmtrain.dist.local_sgd`) the ranks' optimizer
    states (momentum) differ, and between averagings their parameters and buffers too:
    ``local_sgd`` says which (:meth:`~tsmtrain.dist.local_sgd.LocalSGD.checkpoint_kind`:
    ``"optimizer"`` or ``"model"``), and every rank's are stored (``rank_states``, gathered
    onto rank 0 through ``allgather_object``: the file grows by the ranks' models and optimizer
    states). With ``"model"`` the checkpoint's ``model`` is the ranks' average (what ``tsmtrain
    test`` and ``predict`` read), computed on copies: training goes on unchanged.
    When ``stopping`` (a stop signal), rank 0 then writes :data:`~tsmtrain.dist.stop.PREEMPTED_FILE`, so
    the launcher knows the stop was clean whatever status it sees. Every rank must call it: the
    ranks end it with one ``allgather_object`` that carries rank 0's outcome, so that none waits
    for a rank 0 that failed.

    Raises:
        TrainingError: on every rank, when rank 0 could not write the checkpoint or the stop
            marker (one line: the file and the cause, e.g. ``no space left on device``; the
            previous checkpoint is intact). Rank 0 raises an unexpected error (a bug) as it is,
            after telling the other ranks.
    """
    rngs = engine.allgather_object(rng_state(transform_gen), name="rng_states")  # every rank's streams
    buffers = rank_states = averaged = None
    if local_sgd and engine.size > 1:
        rank_states, averaged = _local_sgd_states(engine, model, optimizer, local_sgd)
    elif pos.micro and engine.size > 1:
        own = {k: v.detach().cpu() for k, v in model.named_buffers() if v.is_floating_point()}
        buffers = engine.allgather_object(own, name="rank_buffers")
    sharded = getattr(train_step, "head_parallel", None)  # (a sharded head)
    failure, unexpected = _write_head_shard(engine, run_dir, model, train_step, pos.step), None
    if engine.rank == 0 and failure is None:
        try:
            weights = model.state_dict() if averaged is None else averaged
            if sharded is not None:  # each rank's head slice is in its own file
                weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
            state = {
                "model": weights, "optimizer": None if optimizer is None else optimizer.state_dict(),
                "scaler": train_step.state_dict(),
                "head_shards": None if sharded is None else {"size": engine.size, "ranges": sharded.ranges,
                                                             "num_classes": sharded.num_classes},
                "step": pos.step, "epoch": pos.epoch, "micro": pos.micro, "world_size": engine.size, "rng": rngs,
                "rank_buffers": buffers, "rank_states": rank_states, "sampler": sampler, "eval": pos.eval, "pending_eval": pos.pending_eval,
                "recipe": recipe.model_dump(mode="json"),
            }
            path = save_checkpoint(state, run_dir, pos.step, keep=recipe.train.keep_checkpoints)
            log.info("checkpoint %s", path)
            if stopping:
                marker = run_dir / PREEMPTED_FILE
                try:
                    write_json(marker, {"step": pos.step, "checkpoint": path.name,
                                        "job": os.environ.get("SLURM_JOB_ID"), "time": time.time()})
                except FileWriteError as err:
                    raise TrainingError(f"cannot write {marker}: {_write_cause(err.__cause__ or err, None, run_dir)}; "
                                        f"the checkpoint {path.name} is intact") from err
        except TrainingError as err:
            failure = str(err)
        except Exception as err:  # noqa: BLE001 - told to every rank below, then raised as it is
            failure = f"rank 0 failed while writing the checkpoint ({type(err).__name__}: {first_line(err)})"
            unexpected = err
    # no rank exits (and ends the job step) while the checkpoint is being written, and every rank
    # learns whether it was
    failure = engine.allgather_object(failure, name="checkpoint_written")[0]
    if unexpected is not None:
        raise unexpected
    if failure is not None:
        raise TrainingError(failure)


def _local_sgd_states(engine, model, optimizer, kind: str) -> tuple[list[dict], dict | None]:
    """Every rank's ``{"model": its floating-point parameters and buffers (``kind == "model"``,
    else ``None``), "optimizer": its optimizer's state}``, and (``"model"``) the ranks' average
    of the model's state on rank 0 (``None`` elsewhere, or for ``"optimizer"``)."""
    own = {"model": None, "optimizer": None if optimizer is None else optimizer.state_dict()}
    averaged = None
    if kind == "model":
        own["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        averaged = {k: engine.allreduce(v.detach(), average=True).cpu() if v.is_floating_point() else v.detach().cpu()
                    for k, v in model.state_dict().items()}
    states = engine.allgather_object(own, name="rank_states")
    return states, (averaged if engine.rank == 0 else None)


def _write_head_shard(engine, run_dir: Path, model, train_step, step: int) -> str | None:
    """With a sharded head, every rank writes its shard (:mod:`~tsmtrain.train.head_slices`)
    and learns whether all did; returns the first failure (one line) or ``None``."""
    sharded = getattr(train_step, "head_parallel", None)  # (a sharded head)
    if sharded is None:
        return None
    failure = None
    path = slice_path(run_dir / f"checkpoint-{step:08d}.pt", engine.rank, engine.size)
    optimizer = train_step.head_optimizer
    try:
        write_atomically({"fc": model.fc.state_dict(), "classes": (sharded.lo, sharded.hi),
                          "optimizer": None if optimizer is None else optimizer.state_dict()}, path)
    except TrainingError as err:
        failure = f"rank {engine.rank}: {err}"
    return next((f for f in engine.allgather_object(failure, name="head_shard_written") if f), None)


def _check_same_multigrid(path: Path, saved: dict, recipe) -> None:
    """A run continues only with the multigrid schedule it was written under (its steps, epochs and
    shapes follow from it); ``multigrid.bn_clips`` and ``multigrid.precise_bn_clips`` may change. A
    checkpoint without the section was written without multigrid.

    Raises:
        TrainingError: the ``multigrid`` fields differ (names them).
    """
    ours = recipe.multigrid.model_dump(mode="json", exclude={"bn_clips", "precise_bn_clips"})
    theirs = {**type(recipe.multigrid)().model_dump(mode="json"), **(saved.get("multigrid") or {})}
    diff = [f"multigrid.{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise TrainingError(f"{path} was written under another multigrid schedule ({', '.join(diff)}); its steps "
                            "and epochs mean other clips here: choose another run.name")


def restore_run(path: Path, engine, model, optimizer, train_step, transform_gen, recipe,
                dataset_size: int, state: dict | None = None) -> tuple[Position, dict | None]:
    """Load a checkpoint written by :func:`save_run_checkpoint` into this rank's model, optimizer,
    gradient scaler and random streams.

    Args:
        path: the checkpoint (:func:`resume_checkpoint`'s choice).
        state: its contents when already loaded (rank 0's :func:`resume_checkpoint`); ``None``:
            read ``path`` (checked without the CRC pass, which rank 0 has made).

    Returns:
        ``(position, own)``: what of this rank's own state to load after the broadcast of rank
        0's, when the checkpoint was written by as many ranks, else ``None``: ``{"tensors":
        name -> tensor of the model's state, "optimizer": state_dict or None}``: its BatchNorm
        statistics (written mid-epoch), or under local SGD its parameters and buffers (between
        averagings) and optimizer state.

    Raises:
        TrainingError: the checkpoint is of another model (names the differing ``model.*`` keys).
        CheckpointError: ``path`` cannot be loaded.
    """
    if state is None:
        state = load_checkpoint(path, crc=False)
    # (sync_bn changes how statistics are computed, not the weights: a run may switch it)
    theirs = {k: v for k, v in state["recipe"]["model"].items() if k != "sync_bn"}
    ours = recipe.model.model_dump(mode="json", exclude={"sync_bn"})
    if theirs != ours:
        diff = ", ".join(f"model.{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k])
        raise TrainingError(f"{path} is a checkpoint of another model ({diff}); choose another run.name")
    _check_same_multigrid(path, state["recipe"], recipe)
    sharded = getattr(train_step, "head_parallel", None)  # (a sharded head)
    if sharded is not None and state.get("head_shards"):  # this rank's classes, from the shards that hold them
        fc, head_optimizer = head_state(path, state, sharded.lo, sharded.hi, lambda p: load_checkpoint(p, crc=False))
        model.load_state_dict({**state["model"], **{f"fc.{k}": v for k, v in fc.items()}})
        if head_optimizer is not None and train_step.head_optimizer is not None:
            train_step.head_optimizer.load_state_dict(head_optimizer)
    else:
        model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    train_step.load_state_dict(state.get("scaler"))
    pos = Position(state["step"], state["epoch"], state["micro"], state.get("eval", {}), state.get("pending_eval", False))
    saved_order, seed = state.get("sampler"), recipe.train.seed
    if saved_order and (saved_order["size"], saved_order["seed"]) != (dataset_size, seed):
        log.warning("the training list has %d videos (seed %d); the checkpoint's sample order was for %d "
                    "(seed %d): the rest of this epoch follows a different order",
                    dataset_size, seed, saved_order["size"], saved_order["seed"])
    own = None
    if state["world_size"] == engine.size:
        set_rng_state(state["rng"][engine.rank], transform_gen)
        buffers = (state.get("rank_buffers") or [None] * engine.size)[engine.rank]
        local = (state.get("rank_states") or [None] * engine.size)[engine.rank]  # local SGD
        if buffers is not None or local is not None:
            own = {"tensors": buffers if local is None else local["model"] or {},
                   "optimizer": None if local is None else local["optimizer"]}
    else:
        log.warning("checkpoint was written by %d ranks, this run has %d: random streams restart",
                    state["world_size"], engine.size)
    log.info("resuming from %s at step %d (epoch %d)", path, pos.step, pos.epoch)
    return pos, own
