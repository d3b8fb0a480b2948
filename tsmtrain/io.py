"""One way to write a durable file, and one way to read a JSON one.

**The guarantee** (the same for every file tsmtrain keeps: checkpoints, manifests, indexes,
records, reports, feature files): a reader sees the old file or the whole new one, never a part,
even when the process is killed or the machine loses power mid-write. The data go to a
temporary file in the same folder (so the rename never crosses file systems), are flushed and
``fsync``-ed, the temporary file is renamed over the target (POSIX ``rename`` is atomic), and
the folder is ``fsync``-ed so the rename itself survives a power loss. When a step fails
(disk full, no permission), the temporary file is removed and the old file is left as it was;
a kill (``SIGKILL``, a lost node) can leave only the hidden temporary file (``.NAME.part-...``),
which no reader takes for the file. A file another program writes (ffmpeg) is given such a
temporary name and put in place by :func:`commit`.

Append-only journals (``tsmtrain prepare``'s, the run's ``metrics.jsonl``) are the one exception
by design: each record is one line appended, and a last line cut short by a kill is cut off
when read. ``tests/test_io.py`` checks that no other module writes a file in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["write_atomic", "commit", "write_bytes", "write_text", "write_json", "read_json", "fsync_folder",
           "FileWriteError", "JsonFileError"]


class FileWriteError(UserError):
    """A durable file could not be written (disk full, no permission, a read-only folder);
    the message names the path and the reason, and the old file, if any, is unchanged."""


class JsonFileError(UserError):
    """A JSON file is missing, unreadable, not JSON, or not the kind of document expected
    (named with its path and, for a syntax error, line and column)."""


def fsync_folder(folder: str | os.PathLike) -> None:
    """``fsync`` a folder, so a rename or creation inside it survives a power loss. File systems
    that cannot (some network ones) are skipped silently: the rename is still atomic there."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _part_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def write_atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Give a temporary path beside ``path`` to write by any means (``torch.save``, ``np.savez``,
    ffmpeg, ``tarfile``); when the block ends without an exception the file is put in place by
    :func:`commit` (``fsync``, rename over ``path``, ``fsync`` of the folder). Creates the parent
    folder.

    Raises:
        FileWriteError: an ``OSError`` while writing, syncing or renaming (``ENOSPC``: "no space
            left on the device"), naming ``path``; the temporary file is removed and ``path``
            keeps its old content. Any other exception of the block propagates unchanged, after
            the same clean-up.
    """
    path = Path(path)
    part = _part_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield part
    except OSError as err:
        _remove(part)
        raise FileWriteError(f"{path}: cannot write: {_reason(err)}") from err
    except BaseException:
        _remove(part)
        raise
    commit(part, path)


def commit(part: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put ``part``, a whole file written beside ``path`` (in the same folder; by
    :func:`write_atomic`'s block, or by another program such as ffmpeg that was given the name),
    in place of ``path``: ``fsync`` it, rename it over ``path``, ``fsync`` the folder.

    Raises:
        FileWriteError: the sync or the rename failed (names ``path`` and why); ``part`` is
            removed and ``path`` keeps its old content.
    """
    path = Path(path)
    try:
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, path)
    except OSError as err:
        _remove(Path(part))
        raise FileWriteError(f"{path}: cannot write: {_reason(err)}") from err
    except BaseException:  # a KeyboardInterrupt between the sync and the rename
        _remove(Path(part))
        raise
    fsync_folder(path.parent)


def _remove(part: Path) -> None:
    with contextlib.suppress(OSError):
        part.unlink(missing_ok=True)


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (the module's guarantee).

    Raises:
        FileWriteError: the file cannot be written; ``path`` is unchanged.
    """
    with write_atomic(path) as part:
        with open(part, "wb") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (the module's guarantee).

    Raises:
        FileWriteError: the file cannot be written; ``path`` is unchanged.
    """
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, doc: Any, indent: int | None = 1) -> None:
    """Write ``doc`` as JSON (and a final newline) to ``path`` atomically and durably.

    Raises:
        FileWriteError: the file cannot be written; ``path`` is unchanged.
        TypeError: a value JSON cannot hold (nothing is written).
    """
    write_text(path, json.dumps(doc, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", kind: type = dict) -> Any:
    """The document in a JSON file.

    Args:
        path: the file.
        what: what the file is, for the message (``"shard index"``, ``"sweep record"``).
        kind: the type the top-level value must have (``dict`` by default; ``object`` for any).

    Raises:
        JsonFileError: the file is missing or unreadable, is not UTF-8 JSON (line and column
            named), or its top-level value is not a ``kind``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise JsonFileError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise JsonFileError(f"{path}: the {what} is not UTF-8 text (byte offset {err.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise JsonFileError(f"{path}:{err.lineno}: the {what} is not JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(doc, kind):
        raise JsonFileError(f"{path}: the {what} holds a {type(doc).__name__}, not a JSON "
                            f"{'object' if kind is dict else kind.__name__}")
    return doc
