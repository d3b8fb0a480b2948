"""Writing the feature files of ``tsmtrain extract`` (read back by
:mod:`tsmtrain.data.readers.features`): one ``.npz`` per array task and split, the source
record and, last, the index; every file through :mod:`tsmtrain.io`'s atomic writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from collections import Counter

from ..data.loader import DataError
from ..io import write_atomic, write_json, write_text
from ..data.readers.features import INDEX, SOURCE, feature_file_path, read_feature_file

__all__ = ["write_source", "write_feature_file", "feature_file_is_complete", "write_index"]


def write_source(split_dir: Path, source: dict[str, Any]) -> Path:
    """Write ``split_dir/source.json`` atomically (:func:`check_source` reads it).

    Raises:
        FileWriteError: it cannot be written (names the file and why).
    """
    final = Path(split_dir) / SOURCE
    write_text(final, json.dumps(source, indent=1, sort_keys=True) + "\n")
    return final


def write_feature_file(path: Path, features: np.ndarray, index: list[int], labels: list[tuple[int, ...]],
                failed: list[tuple[int, str]], source: str = "") -> None:
    """Write one shard atomically (:func:`tsmtrain.io.write_atomic`).

    Args:
        features: ``(n, D)`` in the dtype to store.
        index: the videos' lines in the list (0-based), ``n`` of them.
        labels: each video's labels.
        failed: ``(line, error)`` of the shard's unreadable videos.
        source: :func:`source_digest` of the settings that made it.

    Raises:
        FileWriteError: it cannot be written (names the file and why); no part of it is left.
    """
    with write_atomic(path) as part:
        with open(part, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, features=features, index=np.asarray(index, dtype=np.int64),
                     labels=np.asarray([y for ys in labels for y in ys], dtype=np.int32),
                     label_counts=np.asarray([len(ys) for ys in labels], dtype=np.int32),
                     failed_index=np.asarray([i for i, _ in failed], dtype=np.int64),
                     failed_error=np.asarray([e for _, e in failed], dtype=str), source=np.asarray(source))


def feature_file_is_complete(path: Path, lines: list[int], dim: int | None = None, source: str | None = None) -> bool:
    """Whether ``path`` is an intact shard of exactly the list's ``lines`` (read or failed, each
    once), of ``dim`` features, made with the settings of digest ``source``: what a resumed
    extraction keeps."""
    if not path.is_file():
        return False
    try:
        z = read_feature_file(path)
    except DataError:
        return False
    held = sorted(z["index"].tolist() + z["failed_index"].tolist())
    return (held == sorted(lines) and len(z["features"]) == len(z["index"])
            and (dim is None or z["features"].shape[1] == dim)
            and (source is None or str(z.get("source", "")) == source))


def write_index(split_dir: Path, doc: dict[str, Any], shards: int | None = None) -> Path:
    """Write ``split_dir/index.json`` atomically, adding the shards' files and the unreadable
    videos gathered from them.

    Args:
        doc: what the index says besides the shards; with ``videos`` (the list's length), every
            line ``0..videos-1`` must be in exactly one shard (read or unreadable).
        shards: the shards ``0..shards-1`` of the index; None: every ``features-*.npz`` there.

    Raises:
        DataError: a shard is missing or damaged, or a line is in no shard or in two (names them).
    """
    shards = (sorted(Path(split_dir).glob("features-*.npz")) if shards is None
              else [feature_file_path(split_dir, s) for s in range(shards)])
    unreadable, lines = [], []
    for p in shards:
        z = read_feature_file(p)
        unreadable += [[int(i), str(e)] for i, e in zip(z["failed_index"], z["failed_error"])]
        lines += z["index"].tolist() + z["failed_index"].tolist()
    if "videos" in doc and sorted(lines) != list(range(doc["videos"])):
        counts = Counter(lines)
        twice = sorted(i for i, c in counts.items() if c > 1)[:5]
        missing = [i for i in range(doc["videos"]) if i not in counts][:5]
        raise DataError(f"{split_dir}: the shards hold {len(lines)} lines for {doc['videos']} videos (lines in two "
                        f"shards: {twice}, in none: {missing}); delete {split_dir} and extract again")
    doc = {**doc, "shards": [p.name for p in shards], "unreadable": unreadable}
    final = Path(split_dir) / INDEX
    write_json(final, doc)
    return final
