"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, the optimizer state, the schedule position (optimizer step),
the epoch and the position inside it (``micro``, and the sampler's state: epoch, clips to skip,
seed, list size), every rank's random-number-generator states, every rank's BatchNorm
statistics when it was written mid-epoch (``rank_buffers``; they are averaged at epoch ends),
whether the epoch's evaluation is still due (``pending_eval``), the fp16 gradient scaler's state
(``scaler``), and the recipe. Rank 0 writes it atomically: into a temporary file in the run
directory, flushed and fsync'ed, then renamed over the final name, so a job killed mid-write
leaves the previous checkpoint intact and never a truncated one.

:func:`save_run_checkpoint` and :func:`restore_run` are what the training loop calls; the
functions before them only handle files and random states.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dist.local import PREEMPTED_FILE
from .runtime import TrainingError, log

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "write_json",
           "Position", "save_run_checkpoint", "restore_run"]

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``run_dir/checkpoint-STEP.pt`` atomically; keep the newest ``keep``.

    Returns the path written. Raises ``OSError`` if the file cannot be written (the previous
    checkpoints are then untouched).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in sorted(run_dir.glob("checkpoint-*.pt"))[:-keep]:
        if _NAME.match(old.name):
            old.unlink(missing_ok=True)
    return final


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` atomically (a temporary file beside it, then a rename), so
    a reader sees the old file or the new one, never half of one. Creates the parent folder.
    Raises ``OSError`` if it cannot be written and ``TypeError`` for values JSON cannot hold."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or ``None``."""
    found = [p for p in Path(run_dir).glob("checkpoint-*.pt") if _NAME.match(p.name)]
    return max(found, key=lambda p: int(_NAME.match(p.name).group(1))) if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(extra: torch.Generator | None = None) -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states, and ``extra``'s."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if extra is not None:
        state["extra"] = extra.get_state()
    return state


def set_rng_state(state: dict[str, Any], extra: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        eval: the last evaluation (:func:`tsmtrain.train.evaluate`'s result), ``{}`` before one.
        pending_eval: the run stopped at an epoch's end before evaluating it.
    """

    step: int = 0
    epoch: int = 0
    micro: int = 0
    eval: dict = field(default_factory=dict)
    pending_eval: bool = False


def save_run_checkpoint(engine, run_dir: Path, model, optimizer, train_step, pos: Position, transform_gen,
                        recipe, sampler: dict | None = None, stopping: bool = False) -> None:
    """Rank 0 writes the run's checkpoint; every rank returns only once it is on disk.

    Mid-epoch (``pos.micro > 0``) the ranks' BatchNorm statistics still differ (they are averaged
    at epoch ends), so each rank's own are stored too, and a resumed run continues exactly.
    When ``stopping`` (a stop signal), rank 0 then writes :data:`~tsmtrain.dist.local.PREEMPTED_FILE`, so
    the launcher knows the stop was clean whatever status it sees. Every rank must call it.
    """
    rngs = engine.allgather_object(rng_state(transform_gen), name="rng_states")  # every rank's streams
    buffers = None
    if pos.micro and engine.size > 1:
        own = {k: v.detach().cpu() for k, v in model.named_buffers() if v.is_floating_point()}
        buffers = engine.allgather_object(own, name="rank_buffers")
    if engine.rank == 0:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": train_step.state_dict(),
            "step": pos.step, "epoch": pos.epoch, "micro": pos.micro, "world_size": engine.size, "rng": rngs,
            "rank_buffers": buffers, "sampler": sampler, "eval": pos.eval, "pending_eval": pos.pending_eval,
            "recipe": recipe.model_dump(mode="json"),
        }
        path = save_checkpoint(state, run_dir, pos.step, keep=recipe.train.keep_checkpoints)
        log.info("checkpoint %s", path)
        if stopping:
            write_json(run_dir / PREEMPTED_FILE, {"step": pos.step, "checkpoint": path.name,
                                                  "job": os.environ.get("SLURM_JOB_ID"), "time": time.time()})
    engine.barrier()  # no rank exits (and ends the job step) while the checkpoint is being written


def restore_run(path: Path, engine, model, optimizer, train_step, transform_gen, recipe,
                dataset_size: int) -> tuple[Position, dict | None]:
    """Load a checkpoint written by :func:`save_run_checkpoint` into this rank's model, optimizer,
    gradient scaler and random streams.

    Returns:
        ``(position, rank_buffers)``: this rank's own BatchNorm statistics when the checkpoint
        was written mid-epoch by as many ranks (to load after the broadcast of rank 0's
        state), else ``None``.

    Raises:
        TrainingError: the checkpoint is of another model (names the differing ``model.*`` keys).
    """
    state = load_checkpoint(path)
    # (sync_bn changes how statistics are computed, not the weights: a run may switch it)
    theirs = {k: v for k, v in state["recipe"]["model"].items() if k != "sync_bn"}
    ours = recipe.model.model_dump(mode="json", exclude={"sync_bn"})
    if theirs != ours:
        diff = ", ".join(f"model.{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k])
        raise TrainingError(f"{path} is a checkpoint of another model ({diff}); choose another run.name")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    train_step.load_state_dict(state.get("scaler"))
    pos = Position(state["step"], state["epoch"], state["micro"], state.get("eval", {}), state.get("pending_eval", False))
    saved_order, seed = state.get("sampler"), recipe.train.seed
    if saved_order and (saved_order["size"], saved_order["seed"]) != (dataset_size, seed):
        log.warning("the training list has %d videos (seed %d); the checkpoint's sample order was for %d "
                    "(seed %d): the rest of this epoch follows a different order",
                    dataset_size, seed, saved_order["size"], saved_order["seed"])
    rank_buffers = None
    if state["world_size"] == engine.size:
        set_rng_state(state["rng"][engine.rank], transform_gen)
        rank_buffers = (state.get("rank_buffers") or [None] * engine.size)[engine.rank]
    else:
        log.warning("checkpoint was written by %d ranks, this run has %d: random streams restart",
                    state["world_size"], engine.size)
    log.info("resuming from %s at step %d (epoch %d)", path, pos.step, pos.epoch)
    return pos, rank_buffers
