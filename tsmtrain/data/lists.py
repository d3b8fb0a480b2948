"""Dataset list files in the format mmaction2 users already have.

One video per line, ``relative/path.ext label``, paths relative to the recipe's ``data.root``;
blank lines and lines starting with ``#`` are ignored. A malformed line is reported with file
and line number, all of them at once.

Multi-label lists (``read_list(..., multi_label=True)``) take mmaction2's multi-label form,
``relative/path.ext label label ...``: every integer at the end of the line is a label of the
video, so a path may hold spaces but must not end in a word that is an integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from ..errors import UserError

__all__ = ["ListFileError", "VideoRecord", "read_list"]


class ListFileError(UserError):
    """A dataset list file is missing or has malformed lines; ``problems`` holds one line each."""



@dataclass(frozen=True)
class VideoRecord:
    """One line of a list file: the video's full path and its integer label.

    Attributes:
        path: the video file.
        label: its label (the first one for a multi-label line).
        labels: every label of the line, in order (``(label,)`` for one).
    """

    path: str
    label: int
    labels: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.labels:
            object.__setattr__(self, "labels", (self.label,))


def _quoted(text: str, limit: int = 100) -> str:
    """``repr(text)`` cut to ``limit`` characters, so that a message about a huge line is not huge."""
    shown = repr(text[:limit])
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def read_list(list_file: str | Path, root: str | Path, num_classes: int | None = None,
              multi_label: bool = False) -> list[VideoRecord]:
    """Parse a list file.

    Args:
        list_file: the list file.
        root: the folder its paths are relative to; a shard index file
            (:mod:`tsmtrain.prep.tar_writer`) stands for its own folder, where the per-file
            preparation would have put the videos.
        num_classes: labels must be below it (None: any non-negative label).
        multi_label: lines may give several labels, ``path label label ...`` (each once).

    Returns:
        One :class:`VideoRecord` per video line, paths joined onto ``root``.

    Raises:
        ListFileError: the file cannot be read or is not UTF-8 text (one line naming the byte,
            its offset and line), a line is not ``path label``, a label is not a
            non-negative integer (or is >= ``num_classes``), a multi-label line repeats a label,
            or the file lists no video. Every bad line is reported as ``FILE:LINE: reason: 'text'``.
    """
    list_file = Path(list_file)
    if Path(root).suffix == ".json" and Path(root).is_file():  # a shard index: paths are under its folder
        root = Path(root).parent
    try:
        data = list_file.read_bytes()
    except OSError as exc:
        raise ListFileError([f"{list_file}: cannot read list file: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ListFileError([f"{list_file}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                             f"(line {line})"]) from None
    records, problems = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path, labels = _split(line, multi_label)
        where = f"{list_file}:{number}"
        if not path:
            problems.append(f"{where}: expected 'relative/path.ext label': {_quoted(raw)}")
            continue
        try:
            values = [int(label) for label in labels]
        except ValueError:
            problems.append(f"{where}: label {_quoted(labels[-1])} is not an integer: {_quoted(raw)}")
            continue
        bad = [v for v in values if v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            problems.append(f"{where}: label {bad[0]} outside 0..{(num_classes or 1) - 1}: {_quoted(raw)}")
            continue
        if len(set(values)) < len(values):
            twice = next(v for v in values if values.count(v) > 1)
            problems.append(f"{where}: label {twice} given twice: {_quoted(raw)}")
            continue
        records.append(VideoRecord(str(Path(root) / path), values[0], tuple(values)))
    if not records and not problems:
        problems.append(f"{list_file}: lists no video")
    if problems:
        raise ListFileError(problems)
    return records


def _split(line: str, multi_label: bool) -> tuple[str, list[str]]:
    """``(path, label words)`` of a stripped line: the last word (one label), or every integer
    word at the end of the line (``multi_label``, at least one word kept as the label to report)."""
    words = line.split(" ")
    if not multi_label:
        path, _, label = line.rpartition(" ")
        return path.strip(), [label]
    end = len(words)
    while end > 1 and words[end - 1].lstrip("-").isdigit():
        end -= 1
    end = min(end, len(words) - 1)  # no integer at the end: the last word is reported as the label
    return " ".join(words[:end]).strip(), [w for w in words[end:] if w]
