"""Extracted features on disk (``tsmtrain extract``) and their dataset (``data.features``).

A features folder holds one sub-folder per list (``train/``, ``val/``), each with:

* ``features-00000.npz``, ``features-00001.npz``, ...: shards of up to ``shard_videos``
  consecutive videos of the list. Arrays: ``features`` ``(n, D)`` (float16 by default), ``index``
  int64 ``(n,)`` (line of the video in the list, 0-based), ``labels`` int32 (every label of the n
  videos, one after the other) and ``label_counts`` int32 ``(n,)``; ``failed_index`` and
  ``failed_error`` for the videos of the shard that could not be read (never silently left out:
  :func:`write_index` lists them); ``source``: the digest of what made it (:func:`source_digest`).
  Each shard is written to a temporary name and renamed, so a shard file that exists is complete.
* ``source.json``, written before the first shard: what makes the features (checkpoint SHA-256,
  protocol, dtype, shard size, list SHA-256, D, the recipe fields that shape the views). A rerun
  with other settings is refused (:func:`check_source`) instead of mixing two extractions' shards.
* ``index.json``, written last: the list, its SHA-256, the number of videos, ``dim`` D, the
  dtype, ``num_classes``, ``multi_label``, the shards, the unreadable videos, and what made the
  features (checkpoint, protocol, the recipe's ``model`` and ``data`` sections).

:class:`FeatureDataset` serves a folder's features to the training loop in the shape of the
video loader's batches (:func:`collate_features`), so the loop, its metrics and checkpoints do
not change. This module imports no network.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...io import JsonFileError, read_json
from ..loader import DataError
from .tar import outside_folder

__all__ = ["FeatureDataset", "collate_features", "feature_file_path", "read_feature_file", "read_index",
           "check_feature_file", "list_digest", "file_digest", "source_digest", "check_source", "INDEX", "SOURCE"]

INDEX = "index.json"
"""The name of a split's index file."""

SOURCE = "source.json"
"""The name of a split's record of what makes its features (:func:`check_source`)."""


def list_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a list file's bytes: which videos, in which order, with which labels."""
    return file_digest(path)


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks (a checkpoint of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(source: dict[str, Any]) -> str:
    """SHA-256 (hex) of a source record (:func:`check_source`), as each shard stores it."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def check_source(split_dir: Path, source: dict[str, Any]) -> None:
    """Refuse a split folder whose features come from other settings than ``source`` (the
    checkpoint's SHA-256, protocol, dtype, shard size, list, recipe fields): resuming there would
    mix two extractions in one index. An absent or empty folder passes.

    Raises:
        DataError: ``source.json`` differs (names the differing keys), or shards lie there without
            one (of an unknown extraction); one line, naming the folder.
    """
    path = Path(split_dir) / SOURCE
    if not path.is_file():
        if any(Path(split_dir).glob("features-*.npz")):
            raise DataError(f"{split_dir} holds feature shards of an unknown extraction (no {SOURCE}): "
                            f"extract into another --out, or delete {split_dir}")
        return
    try:
        theirs = read_json(path, "features source record")
    except JsonFileError as err:  # names the file (and the line)
        raise DataError(f"{err}; delete {split_dir} and extract again") from None
    if theirs != source:
        keys = sorted(k for k in set(theirs) | set(source) if theirs.get(k) != source.get(k))
        raise DataError(f"{split_dir} holds features extracted with other settings (they differ in "
                        f"{', '.join(keys)}): extract into another --out, or delete {split_dir} to extract again")


def feature_file_path(split_dir: Path, shard: int) -> Path:
    """``split_dir/features-NNNNN.npz``."""
    return Path(split_dir) / f"features-{shard:05d}.npz"


def read_feature_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one shard (:func:`write_feature_file`).

    Raises:
        DataError: the file is missing, truncated or not a shard (names the file).
    """
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable features shard ({type(err).__name__}: {err})") from None


def check_feature_file(path: Path, z: dict[str, np.ndarray], dim: int, num_classes: int | None) -> None:
    """Refuse a shard's arrays (:func:`read_feature_file`) that a head cannot train on: ``features`` not
    ``(n, dim)``, ``index`` or ``label_counts`` not ``(n,)``, label counts that do not add up to
    ``labels``, a label outside ``0..num_classes-1`` (or negative, without ``num_classes``), a
    NaN or infinite feature.

    Raises:
        DataError: one line naming ``path``, the video (its line in the list, 1-based) and the value.
    """
    try:
        features, index, labels, counts = z["features"], z["index"], z["labels"], z["label_counts"]
    except KeyError as err:
        raise DataError(f"{path}: not a features shard (no array {err})") from None
    if features.ndim != 2 or features.shape[1] != dim:
        raise DataError(f"{path}: features of shape {tuple(features.shape)}, the index says dim {dim} "
                        f"(expected (videos, {dim})); extract again")
    n = len(features)
    if index.shape != (n,) or counts.shape != (n,) or (counts < 0).any() or int(counts.sum()) != len(labels):
        raise DataError(f"{path}: {n} feature rows but index {tuple(index.shape)}, label_counts "
                        f"{tuple(counts.shape)} adding up to {int(counts.sum())} for {len(labels)} labels")
    owner = np.repeat(np.arange(n), counts)  # the row of each label
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes) if isinstance(num_classes, int) else labels < 0)
    if len(bad):
        row = int(owner[bad[0]])
        valid = f"0..{num_classes - 1} (num_classes {num_classes})" if isinstance(num_classes, int) else ">= 0"
        raise DataError(f"{path}: label {int(labels[bad[0]])} of the video on line {int(index[row]) + 1} of the list "
                        f"(row {row}) is outside {valid}; {len(bad)} labels are")
    finite = np.isfinite(features)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise DataError(f"{path}: feature [{row}, {col}] of the video on line {int(index[row]) + 1} of the list is "
                        f"{features[row, col]} ({int((~finite).sum())} values not finite); extract again")


def read_index(split_dir: str | Path) -> dict[str, Any]:
    """A split's ``index.json``.

    Raises:
        DataError: no index (extraction unfinished or another folder) or an unreadable one; the
            message names the file.
    """
    path = Path(split_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: no features index; run tsmtrain extract RECIPE --out {Path(split_dir).parent} "
                        "(an interrupted extraction resumes)")
    try:
        return read_json(path, "features index")
    except JsonFileError as err:  # names the file (and the line)
        raise DataError(str(err)) from None


class FeatureDataset(torch.utils.data.Dataset):
    """The features of one split, held in memory as float32 ``(V, D)`` (V readable videos).

    Items (keyed by an index or :class:`~tsmtrain.data.RankSampler`'s ``(index, epoch)``) are
    ``{"frames": (D,) float32, "label": int, "labels": tuple}``: the video loader's keys, so the
    training loop runs unchanged (``frames`` are the features).

    Args:
        split_dir: ``DIR/train`` or ``DIR/val``.

    Attributes:
        index: the split's ``index.json``; ``dim``: D; ``unreadable``: ``(line, error)`` of the
        videos that have no features.

    Raises:
        DataError: no index, a missing or damaged shard (names it); a shard named outside the
            split's folder, features of another dimension than the index's ``dim``, a label
            outside ``0..num_classes-1``, a NaN or infinite feature (:func:`check_feature_file`: names the
            file, the video's line and the value).
    """

    def __init__(self, split_dir: str | Path):
        self.split_dir = Path(split_dir)
        self.index = read_index(self.split_dir)
        index_file = self.split_dir / INDEX
        dim, names = self.index.get("dim"), self.index.get("shards")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise DataError(f"{index_file}: dim {json.dumps(dim)} is not a feature dimension (a whole number >= 1)")
        if not isinstance(names, list):
            raise DataError(f"{index_file}: shards {json.dumps(names)[:80]} is not a list of files")
        for n, name in enumerate(names):
            why = outside_folder(self.split_dir, name)
            if why:
                raise DataError(f"{index_file}: shards[{n}]: {why}")
        self.dim = dim
        parts, labels = [], []
        for name in names:
            z = read_feature_file(self.split_dir / name)
            check_feature_file(self.split_dir / name, z, dim, self.index.get("num_classes"))
            parts.append(torch.from_numpy(z["features"].astype(np.float32)))
            bounds = np.concatenate([[0], np.cumsum(z["label_counts"])])
            labels += [tuple(int(y) for y in z["labels"][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        self.features = torch.cat(parts) if parts else torch.zeros(0, self.dim)
        self.labels = labels
        self.unreadable = [tuple(u) for u in self.index.get("unreadable", [])]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        return {"frames": self.features[index], "label": self.labels[index][0] if self.labels[index] else -1,
                "labels": self.labels[index]}


def collate_features(items: list[dict]) -> dict:
    """Batch :class:`FeatureDataset` items as :func:`~tsmtrain.data.loader.collate_clips` batches
    clips: ``frames`` float32 ``(N, D)``, ``label`` int64 ``(N,)``, ``labels`` (a tuple per
    video), ``failed`` (empty: unreadable videos have no features and are listed in the index)."""
    return {"frames": torch.stack([it["frames"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "labels": [it["labels"] for it in items], "failed": [], "opened": [], "worker": -1}
