"""Checkpoints of a classifier sharded across ranks (``model.head_parallel``).

Beside rank 0's ``checkpoint-STEP.pt`` (the backbone, its optimizer, the position; the head's
``fc.*`` left out, ``head_shards`` naming the split), every rank writes its shard:
``checkpoint-STEP.head-R-of-S.pt`` with its classes ``[lo, hi)``, the head's parameters and its
optimizer's state (momentum). The shards are written first, atomically, and rank 0's file last,
so a checkpoint whose main file exists has all its shards.

Every parameter of a head, and every optimizer state tensor of the same shape, is class-major
(rows ``c * r .. (c + 1) * r`` belong to class ``c``: ``r = 1`` for a linear head, ``M`` for an
MoE head's gates and experts), so the shards of S ranks can be joined and split again for any
other number of ranks (:func:`head_state`): a run resumes on another number of ranks, and
``tsmtrain test`` loads the whole head (:func:`full_model_state`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["slice_path", "slice_files", "head_state", "full_model_state", "missing_slices"]

_SHARD = re.compile(r"^checkpoint-(\d{8})\.head-(\d+)-of-(\d+)\.pt$")


def slice_path(checkpoint: Path, rank: int, size: int) -> Path:
    """``checkpoint-STEP.head-R-of-S.pt`` beside the main file ``checkpoint``."""
    return checkpoint.with_name(f"{checkpoint.stem}.head-{rank}-of-{size}.pt")


def slice_files(checkpoint: Path) -> list[Path]:
    """Every shard file of ``checkpoint`` found on disk (of any number of ranks)."""
    return sorted(p for p in checkpoint.parent.glob(f"{checkpoint.stem}.head-*-of-*.pt") if _SHARD.match(p.name))


def missing_slices(checkpoint: Path, state: dict[str, Any], check) -> str | None:
    """Why the head shards ``state["head_shards"]`` names are not all there and intact, or
    ``None`` (also for a checkpoint without shards). ``check``: the file check
    (:func:`tsmtrain.train.checkpoint.check_checkpoint`)."""
    split = state.get("head_shards")
    if not split:
        return None
    for rank in range(split["size"]):
        path = slice_path(checkpoint, rank, split["size"])
        if not path.is_file():
            return f"its head shard {path.name} is missing"
        reason = check(path)
        if reason is not None:
            return f"its head shard {path.name} is {reason}"
    return None


def head_state(checkpoint: Path, state: dict[str, Any], lo: int, hi: int, load) -> tuple[dict, dict | None]:
    """The head parameters and optimizer state of classes ``[lo, hi)`` from ``checkpoint``'s shards.

    Args:
        checkpoint: the main file; ``state``: its contents (``head_shards``: ``size``, ``ranges``).
        lo, hi: the classes wanted (this rank's now, or all of them).
        load: reads a shard file (:func:`tsmtrain.train.checkpoint.load_checkpoint`).

    Returns:
        ``(fc_state, optimizer_state)``: the head's ``state_dict`` for those classes and its
        optimizer's ``state_dict`` (``None`` when the shards hold none), sliced from the shards
        that overlap ``[lo, hi)`` and joined.
    """
    split = state["head_shards"]
    parts = []
    for rank, (a, b) in enumerate(split["ranges"]):
        if a < hi and lo < b:
            shard = load(slice_path(checkpoint, rank, split["size"]))
            parts.append((a, b, shard))
    fc = {name: _join([(a, b, s["fc"][name]) for a, b, s in parts], lo, hi) for name in parts[0][2]["fc"]}
    optimizer = parts[0][2].get("optimizer")
    if optimizer is None:
        return fc, None
    joined = {"param_groups": optimizer["param_groups"], "state": {}}
    for index, entry in optimizer["state"].items():
        joined["state"][index] = {
            key: _join([(a, b, s["optimizer"]["state"][index][key]) for a, b, s in parts], lo, hi)
            if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in entry.items()}
    return fc, joined


def _join(pieces: list[tuple[int, int, torch.Tensor]], lo: int, hi: int) -> torch.Tensor:
    """The rows of classes ``[lo, hi)`` from class-major shards ``(a, b, tensor)``, joined."""
    out = []
    for a, b, t in pieces:
        rows = t.shape[0] // (b - a)
        first, last = max(lo, a), min(hi, b)
        out.append(t[(first - a) * rows:(last - a) * rows])
    return torch.cat(out)


def full_model_state(checkpoint: Path, state: dict[str, Any], load) -> dict[str, torch.Tensor]:
    """The whole model's ``state_dict`` of a checkpoint: as saved, or with the head joined from
    its shards when it was sharded (``tsmtrain test``, ``predict`` and ``extract`` load it into
    one unsharded network, whatever the number of ranks that trained it)."""
    if not state.get("head_shards"):
        return state["model"]
    fc, _ = head_state(checkpoint, state, 0, state["head_shards"]["num_classes"], load)
    return {**state["model"], **{f"fc.{k}": v for k, v in fc.items()}}
