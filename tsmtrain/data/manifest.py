"""What ``tsmtrain prepare`` leaves for the loader to read: the manifest (one JSON record per
prepared video) and the journals it is merged from, and the names of its files. Read online, by
the loader and the pre-flight check; written offline by :mod:`tsmtrain.prep.encode`. Imports
nothing of :mod:`tsmtrain.prep`, so a loader worker never loads the preparation machinery."""

from __future__ import annotations

import json
from pathlib import Path
from ..errors import UserError

__all__ = ["MANIFEST", "JOURNALS_DIR", "FRAMES_SUFFIX", "ManifestError", "read_journal", "read_manifest"]


MANIFEST = "manifest.jsonl"
"""The merged manifest in the output folder: one JSON record per video."""


JOURNALS_DIR = ".shards"
"""Folder in the output folder holding the journals ``manifest-I-of-N.jsonl``."""


FRAMES_SUFFIX = ".frames.json"
"""Appended to an output's name for its frame table (torchcodec ``custom_frame_mappings``)."""


class ManifestError(UserError):
    """A manifest or journal file is missing or has a malformed line (named as ``FILE:LINE``)."""


def _parse_lines(path: Path, text: str, tolerate_partial_tail: bool,
                 required: tuple[str, ...] = ("source", "status")) -> list[dict]:
    records = []
    lines = text.split("\n")
    last = len(lines) - 1  # text after the last newline: empty, or a line cut by a kill
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(key not in record for key in required):
                raise ValueError(f"not a record with {' and '.join(required)}")
        except ValueError as err:
            if tolerate_partial_tail and number - 1 == last:
                break  # written up to a kill; the video is simply not done
            raise ManifestError(f"{path}:{number}: malformed record ({err}): {line[:120]!r}") from None
        records.append(record)
    return records


def read_journal(path: str | Path, required: tuple[str, ...] = ("source", "status")) -> list[dict]:
    """The records of a journal, in the order written: JSON objects with the ``required`` keys
    (a video's ``source`` and ``status`` by default). A last line cut short by a kill (no
    newline at its end) is ignored.

    Raises:
        ManifestError: the file cannot be read, or a complete line is not a record.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read: {err.strerror or err}") from None
    return _parse_lines(path, text, tolerate_partial_tail=True, required=required)


def read_manifest(out_dir: str | Path) -> dict[str, dict]:
    """The ``ok`` records of ``out_dir/manifest.jsonl``, keyed by ``output`` (relative to ``out_dir``).

    Each record has at least ``source``, ``output``, ``status``, ``reason``, ``frames``, ``fps``
    (frames/s), ``width``, ``height`` (pixels), ``seconds``, ``bytes_in``, ``bytes_out``, ``gop``
    (frames), ``frame_mappings`` (sidecar path relative to ``out_dir`` or None) and ``list``
    (see :func:`prepare_video`).

    Raises:
        ManifestError: the manifest is missing or a line is not a JSON record (``FILE:LINE``).
    """
    path = Path(out_dir) / MANIFEST
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read the manifest: {err.strerror or err}") from None
    return {r["output"]: r for r in _parse_lines(path, text, tolerate_partial_tail=False) if r["status"] == "ok"}
