"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, the optimizer state, the schedule position (optimizer step),
the epoch and the position inside it (``micro``, and the sampler's state: epoch, clips to skip,
seed, list size), every rank's random-number-generator states, every rank's BatchNorm
statistics when it was written mid-epoch (``rank_buffers``; they are averaged at epoch ends),
whether the epoch's evaluation is still due (``pending_eval``), and the recipe. Rank 0 writes it atomically: into a temporary file in the run directory, flushed and
fsync'ed, then renamed over the final name, so a job killed mid-write leaves the previous
checkpoint intact and never a truncated one.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "write_json"]

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
