"""The journals of ``tsmtrain prepare``: one append-only file of JSON records per array task
(``OUT/.shards/manifest-I-of-N.jsonl``), each record ``fsync``-ed as it is written, so a task
killed at any moment resumes where it stopped; :func:`tsmtrain.data.manifest.read_journal`
reads them back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..data.manifest import JOURNALS_DIR, read_journal

__all__ = ["journal_path", "journal_files", "latest_records", "Journal"]


_JOURNAL = re.compile(r"^manifest-(\d+)-of-(\d+)\.jsonl$")


def journal_path(out_dir: Path, task: tuple[int, int]) -> Path:
    return out_dir / JOURNALS_DIR / f"manifest-{task[0]}-of-{task[1]}.jsonl"


def journal_files(out_dir: Path, pattern: re.Pattern = _JOURNAL) -> dict[tuple[int, int], Path]:
    """``{(I, N): path}`` of the journals in ``out_dir/.shards`` whose names match ``pattern``
    (groups I and N; the video journals by default)."""
    found = {}
    folder = out_dir / JOURNALS_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match:
                found[(int(match[1]), int(match[2]))] = path
    return found


def latest_records(out_dir: Path) -> dict[str, dict]:
    """The newest record per source over every journal in ``out_dir``."""
    latest: dict[str, dict] = {}
    for path in journal_files(out_dir).values():
        for record in read_journal(path):
            old = latest.get(record["source"])
            if old is None or record.get("time", 0) >= old.get("time", 0):
                latest[record["source"]] = record
    return latest


class Journal:
    """Append-only record file of one task; a line cut short by a kill is cut off on open. The
    one kind of durable file not written through :mod:`tsmtrain.io` (by design: a record is
    appended and ``fsync``-ed, never the whole file rewritten)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab+")
        self._file.seek(0, os.SEEK_END)
        end = self._file.tell()
        if end:
            self._file.seek(0)
            data = self._file.read()
            if not data.endswith(b"\n"):
                self._file.truncate(data.rfind(b"\n") + 1)
        self._file.seek(0, os.SEEK_END)

    def append(self, record: dict) -> None:
        self._file.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
