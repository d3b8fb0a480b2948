"""Indexed tar shards: prepared videos packed into a few large files for parallel file systems.

Parallel file systems (Lustre, GPFS) serve file metadata (opens, stats) from a few servers
shared by every job. A run that opens one file per clip, 246,245 Kinetics-400 videos x 50 epochs
in 853 s on 1,536 GPUs ("Training Kinetics in 15 Minutes", Lin, Gan, Han 2019), asks them for
about 14,400 opens per second. ``tsmtrain prepare --shards`` therefore writes the prepared videos
into tar files of about ``--shard-size`` bytes (1 GiB by default) and an index of where each
video lies; the loader then opens each shard once per worker and reads whole samples from it by
byte offset (:class:`ShardReader`), decoding them from memory.

**The files** in the output folder ``DIR``:

* ``DIR/shards/shard-IIIII-of-NNNNN-KKKKKK.tar``: plain POSIX (ustar) tar files in the
  WebDataset layout (a sample is the members sharing a key: ``KEY.mp4`` the video exactly as
  :mod:`tsmtrain.data.prepare` encodes it, ``KEY.frames.json`` its frame table, ``KEY.json`` its
  path, label, frames, fps and size, ``KEY.cls`` the label as text), written by array task I of
  N (``--shard I/N``; 0 of 1 on one machine), K counting that task's shards. Any tar reader,
  ``webdataset`` and ``wids`` read them;
* ``DIR/index.json`` (:data:`INDEX`): for every video, by its path relative to ``DIR`` (the
  path the per-file preparation would have given it), the shard, the byte offset and size of the
  whole sample, of the video and of its frame table, a CRC-32 of the sample, its label, frames,
  fps, width and height; and every shard with its size in bytes and sample count;
* ``DIR/wids-index.json``: the shard list in the format of WebDataset's ``wids``
  (``wids-shard-index-v1``);
* the list files and ``manifest.jsonl`` as the per-file preparation writes them (each ok record
  with its ``shard``, ``offset`` and ``size``); ``DIR/.staging/`` holds the videos encoded but
  not yet packed, and the journals.

A recipe reads the shards with ``data.root: DIR/index.json`` (or ``data.root: DIR``) and the same list files.

**Why tarfile and pread, not wids.** The tars are written with the standard library's
:mod:`tarfile` (deterministic headers: the same videos give the same bytes on every run). They
are read with ``os.pread`` at the offsets of our own index: ``wids`` indexes each tar by walking
its headers when it first opens it (one read per member: the metadata and small-read load this
layout exists to avoid) and yields samples by position in its shard list, while the loader needs
the bytes of one video by path, which the index gives in one read. The ``wids-index.json`` lets
WebDataset users read the same shards with their own tools.

**Resuming and job arrays.** A task encodes its videos into ``DIR/.staging`` exactly as the
per-file preparation does (journaled, resumable), and packs them, in list order, into shards of
at most ``shard_size`` bytes (a shard holds at least one video). A shard is written to a
temporary file, flushed, its headers and offsets read back and checked, renamed, and only then
recorded in the task's journal ``DIR/.shards/tars-I-of-N.jsonl``; its staged videos are deleted
after that. So a task killed at any moment (``kill -9``) never leaves a shard counted as
complete, and run again it writes the same shards: the split into shards depends only on the
videos' order and sizes. :func:`merge_shards` (``--merge``, or the end of a one-machine run)
checks every task's shards and writes the list files, the manifest and, last and atomically,
the index.

Errors: :class:`ShardError` (a :class:`~tsmtrain.data.prepare.ManifestError`: a missing or
malformed index, an index entry naming a file outside the index's folder or bytes outside its
shard (refused when the index is loaded), a missing or truncated shard, named with the videos it
holds) and
:class:`SampleError` (one sample cannot be read: the loader skips it and counts it, as an
unreadable video file).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .prepare import (FRAMES_SUFFIX, MANIFEST, SHARDS_DIR, ManifestError, MergeResult, Plan, PrepareError, Settings,
                      ShardSummary, Video, _is_done, _Journal, _journals, _latest_records, _write_atomic, read_journal,
                      run_shard, shard_videos)

__all__ = ["INDEX", "WIDS_INDEX", "SHARDS_FOLDER", "STAGING", "DEFAULT_SHARD_SIZE", "INDEX_KIND", "ShardError",
           "SampleError", "Sample", "ShardIndex", "ShardReader", "is_shard_index", "outside_folder", "parse_size",
           "write_tar", "TaskSummary", "run_task", "task_lines", "merge_shards"]

INDEX = "index.json"
"""The shard index in the output folder; ``data.root`` points at it."""

WIDS_INDEX = "wids-index.json"
"""The shard list in wids' format (``wids-shard-index-v1``), for WebDataset users."""

INDEX_KIND = "tsmtrain-shard-index"
"""The index's ``kind``; :meth:`ShardIndex.load` refuses a JSON file without it."""

SHARDS_FOLDER = "shards"
"""Folder of the tar files in the output folder."""

STAGING = ".staging"
"""Folder in the output folder where videos wait, encoded, to be packed into a shard."""

DEFAULT_SHARD_SIZE = 1 << 30
"""Bytes per shard by default (1 GiB; WebDataset advises 256 MB to 1 GB, the size at which
a parallel file system reads at full bandwidth)."""

MAX_OPEN_SHARDS = 1024
"""Shards a :class:`ShardReader` keeps open at once (per process); the least recently read is
closed beyond it (1 TiB of 1 GiB shards fits)."""

_BLOCK = tarfile.BLOCKSIZE  # 512
_TAR_JOURNAL = re.compile(r"^tars-(\d+)-of-(\d+)\.jsonl$")
_TAR_KEYS = ("tar", "bytes", "number", "settings", "shard_size", "samples")


class ShardError(ManifestError):
    """The shard index is missing or malformed, or a shard is missing, truncated or changed; the
    message names the file (and the videos a bad shard holds). ``problems`` holds one line each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class SampleError(ValueError):
    """One sample cannot be read from its shard (short read, CRC mismatch, a header that is not
    the index's); the loader skips the video and counts it."""


def parse_size(text: str | int) -> int:
    """``"1GiB"``, ``"256MB"``, ``"512M"``, ``"1e9"`` or an int -> bytes (KiB/MiB/GiB/TiB and
    K/M/G/T are powers of 1024, kB/MB/GB/TB of 1000).

    Raises:
        PrepareError: not a size, or not positive (a size below a video's gives one video per shard).
    """
    units = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4, "kib": 1024, "mib": 1024 ** 2,
             "gib": 1024 ** 3, "tib": 1024 ** 4, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
             "b": 1}
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    try:
        size = int(float(match[1]) * units[match[2]]) if match else None
    except (KeyError, ValueError):
        size = None
    if size is None or size < 1:
        raise PrepareError(f"--shard-size {text!r}: not a positive size (e.g. 1GiB, 512MiB, 2GB)")
    return size


def shard_index_file(root: str | Path) -> Path | None:
    """The shard index that ``data.root`` names: the ``.json`` file itself, or ``DIR/index.json``
    when ``root`` is a folder that ``tsmtrain prepare --shards`` wrote (it holds :data:`INDEX` and
    :data:`SHARDS_FOLDER`); None for a folder of video files."""
    path = Path(root)
    if path.suffix == ".json" and path.is_file():
        return path
    if (path / INDEX).is_file() and (path / SHARDS_FOLDER).is_dir():
        return path / INDEX
    return None


def is_shard_index(root: str | Path) -> bool:
    """Whether ``data.root`` names a shard index (:func:`shard_index_file`) rather than a folder of files."""
    return shard_index_file(root) is not None


def outside_folder(folder: Path, name: object, resolve: bool = True) -> str | None:
    """Why the file ``name`` that an index in ``folder`` names is not inside ``folder``, or None
    when it is: not a non-empty relative path, a ``..`` in it, or (``resolve``: symbolic links
    resolved, one ``lstat`` per path component) a file outside ``folder``."""
    if not isinstance(name, str) or not name:
        return f"{_shown(name)} is not a file name"
    rel = Path(name)
    if rel.is_absolute():
        return f"{name!r} is an absolute path (an index names files inside its folder {folder})"
    if ".." in rel.parts:
        return f"{name!r} leaves the index's folder {folder} (..)"
    if not resolve:
        return None
    try:
        inside = (folder / rel).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop
        return f"{name!r} cannot be resolved ({err})"
    if not inside:
        return (f"{name!r} resolves to {(folder / rel).resolve()}, outside the index's folder {folder} "
                "(a symbolic link)")
    return None


def _shown(value: object) -> str:
    """A JSON value as a message names it: ``1e+15`` rather than ``1000000000000000.0``."""
    if isinstance(value, float) and len(repr(value)) > 12:
        return f"{value:.6g}"
    return json.dumps(value)[:80]


def _whole(value: object) -> bool:
    """A JSON whole number >= 0 (not a float such as ``1e15``, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_problems(folder: Path, shards: list, videos: dict) -> list[str]:
    """Every refused entry of a shard index's ``shards`` and ``videos`` (one line each, naming the
    entry and its value): a shard file outside ``folder`` (:func:`outside_folder`), a size or
    count that is not a whole number >= 0; a video path outside ``folder``, a shard number not
    listed, an offset or size that is not a whole number >= 0, a sample that ends past its
    shard's recorded size, a member (``video``, ``frame_mappings``) outside its sample, a CRC-32
    out of range.

    Raises:
        KeyError, TypeError, AttributeError: a record lacks a field or is not an object
            (:meth:`ShardIndex.load` reports it as malformed).
    """
    problems: list[str] = []
    ends = []
    for n, s in enumerate(shards):
        where = f"shards[{n}]"
        why = outside_folder(folder, s["path"])
        if why:
            problems.append(f"{where}: path {why}")
        for key in ("bytes", "samples"):
            if not _whole(s[key]):
                problems.append(f"{where}: {key} {_shown(s[key])} is not a whole number >= 0")
        ends.append(s["bytes"] if _whole(s["bytes"]) else -1)
    for n, (rel, r) in enumerate(videos.items()):
        where = f"videos[{n}] ({rel!r})"
        if not rel or rel.startswith("/") or ".." in rel.split("/"):  # a key, never opened: the bytes are in a shard
            problems.append(f"{where}: {outside_folder(folder, rel, resolve=False)}")
        shard, offset, size = r["shard"], r["offset"], r["size"]
        bad = [f"{key} {_shown(r[key])}" for key in ("shard", "offset", "size") if not _whole(r[key])]
        if bad:
            problems.append(f"{where}: {', '.join(bad)}: not a whole number >= 0")
            continue
        if shard >= len(shards):
            problems.append(f"{where}: shard {shard}: the index lists {len(shards)} shards")
            continue
        if ends[shard] >= 0 and offset + size > ends[shard]:
            problems.append(f"{where}: offset {offset} + size {size} ends past the end of shard "
                            f"{shards[shard]['path']} ({ends[shard]} bytes)")
            continue
        for key in ("video", "frame_mappings"):
            span = r["video"] if key == "video" else r.get(key)
            if key != "video" and not span:
                continue
            if (not isinstance(span, list) or len(span) != 2 or not all(map(_whole, span))
                    or span[0] < offset or span[0] + span[1] > offset + size):
                problems.append(f"{where}: {key} {_shown(span)} is not [offset, size] inside the sample "
                                f"(bytes {offset} to {offset + size})")
        if not _whole(r["crc32"]) or r["crc32"] >= 1 << 32:
            problems.append(f"{where}: crc32 {_shown(r['crc32'])} is not a CRC-32")
    return problems


# --------------------------------------------------------------------------- writing a shard


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that is the same on every run (no time, owner or mode of this machine)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def write_tar(path: Path, samples: Sequence[tuple[str, Sequence[tuple[str, bytes]]]]) -> list[dict]:
    """Write ``samples`` (``(key, [(extension, data), ...])``) as one ustar tar file at ``path``.

    The file is written beside ``path`` as ``.NAME.part-PID``, flushed, read back (every header
    where the returned offsets say, by :mod:`tarfile`), then renamed to ``path``.

    Returns:
        Per sample: ``key``, ``offset`` (bytes from the start of the file to the sample's first
        header), ``size`` (bytes from there to the end of its last member, padding included),
        ``crc32`` of those bytes, and per member extension ``[data offset, data size]``
        (``members``).

    Raises:
        OSError: the file cannot be written.
        RuntimeError: the written file does not read back as written (a bug or a bad disk).
    """
    part = path.with_name(f".{path.name}.part-{os.getpid()}")
    entries = []
    try:
        with open(part, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    entry = {"key": key, "offset": tar.offset, "members": {}}
                    crc = 0
                    for ext, data in members:
                        start = tar.offset
                        info = _member(key + ext, len(data))
                        crc = zlib.crc32(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"), crc)
                        tar.addfile(info, io.BytesIO(data))
                        crc = zlib.crc32(data, crc)
                        crc = zlib.crc32(bytes(-len(data) % _BLOCK), crc)
                        entry["members"][ext] = [start + _BLOCK, len(data)]
                        if tar.offset != start + _BLOCK + len(data) + (-len(data) % _BLOCK):
                            raise RuntimeError(f"{part}: member {key + ext} did not take one ustar header")
                    entry["size"], entry["crc32"] = tar.offset - entry["offset"], crc
                    entries.append(entry)
            raw.flush()
            os.fsync(raw.fileno())
        _check_tar(part, entries)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return entries


def _check_tar(path: Path, entries: list[dict]) -> None:
    """Read ``path``'s headers with :mod:`tarfile` and its samples' bytes: they must be where
    ``entries`` says, with the same CRC-32."""
    expected = {e["key"] + ext: tuple(where) for e in entries for ext, where in e["members"].items()}
    with tarfile.open(path, mode="r:") as tar:
        found = {m.name: (m.offset_data, m.size) for m in tar}
    if found != expected:
        raise RuntimeError(f"{path}: the tar headers read back do not match what was written")
    with open(path, "rb") as f:
        for e in entries:
            if zlib.crc32(os.pread(f.fileno(), e["size"], e["offset"])) != e["crc32"]:
                raise RuntimeError(f"{path}: sample {e['key']} does not read back as written")


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class Sample:
    """Where one video lies in the shards (all offsets and sizes in bytes).

    Attributes:
        key: the sample's key in its tar (members ``KEY.mp4``, ``KEY.frames.json``, ...).
        shard: position of its shard in :attr:`ShardIndex.shards`.
        offset, size: the whole sample (first header to the end of the last member).
        video: ``(offset, size)`` of the mp4 data; ``frame_mappings``: of the frame table, or None.
        crc32: CRC-32 of the whole sample.
        label, frames, fps, width, height: the label (of the first list naming it), frames,
            frames/s and pixel size of the prepared video.
    """

    key: str
    shard: int
    offset: int
    size: int
    video: tuple[int, int]
    frame_mappings: tuple[int, int] | None
    crc32: int
    label: int
    frames: int
    fps: float
    width: int
    height: int


@dataclass
class ShardIndex:
    """A shard index (:data:`INDEX`) as read by :meth:`load`.

    Attributes:
        path: the index file; ``folder`` is its folder (list paths are relative to it).
        shards: per shard: ``path`` (relative to ``folder``), ``bytes``, ``samples``.
        samples: ``{video path relative to folder: Sample}``.
    """

    path: Path
    folder: Path
    shards: list[dict]
    samples: dict[str, Sample]

    @classmethod
    def load(cls, path: str | Path) -> "ShardIndex":
        """Read an index written by :func:`merge_shards` and check every entry before any shard is
        opened (:func:`_index_problems`): files inside the index's folder, whole non-negative
        offsets and sizes, each sample inside its shard's recorded size (which :meth:`check`
        compares with the file, one ``stat`` per shard, before the first read).

        Raises:
            ShardError: the file cannot be read, is not JSON, is not a tsmtrain shard index, a
                record lacks a field (named by key), or entries are refused (one line each,
                naming the index file, the entry and the value; the first 5 and a count).
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_bytes())
        except OSError as err:
            raise ShardError(f"{path}: cannot read the shard index: {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardError(f"{path}: not a shard index (not JSON: {err})") from None
        if not isinstance(doc, dict) or doc.get("kind") != INDEX_KIND:
            raise ShardError(f"{path}: not a shard index (no \"kind\": \"{INDEX_KIND}\"); write one with "
                             "tsmtrain prepare --shards")
        try:
            problems = _index_problems(path.parent, doc["shards"], doc["videos"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ShardError(f"{path}: malformed shard index ({type(err).__name__}: {err})") from None
        if problems:
            lines = [f"{path}: {line}" for line in problems[:5]]
            if len(problems) > 5:
                lines[-1] += f" (and {len(problems) - 5} more entries refused)"
            raise ShardError(lines)
        try:
            shards = [dict(path=s["path"], bytes=int(s["bytes"]), samples=int(s["samples"])) for s in doc["shards"]]
            samples = {rel: Sample(key=r["key"], shard=int(r["shard"]), offset=int(r["offset"]), size=int(r["size"]),
                                   video=tuple(r["video"]),
                                   frame_mappings=tuple(r["frame_mappings"]) if r.get("frame_mappings") else None,
                                   crc32=int(r["crc32"]), label=int(r["label"]), frames=int(r["frames"]),
                                   fps=float(r["fps"]), width=int(r["width"]), height=int(r["height"]))
                       for rel, r in doc["videos"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"{path}: malformed shard index ({type(err).__name__}: {err})") from None
        return cls(path, path.parent, shards, samples)

    def shard_path(self, shard: int) -> Path:
        """The file of shard number ``shard``."""
        return self.folder / self.shards[shard]["path"]

    def sample(self, path: str | Path) -> Sample | None:
        """The sample of a video path (``folder / relative path``, as list files give them), or None."""
        rel = self.relative(path)
        return None if rel is None else self.samples.get(rel)

    def relative(self, path: str | Path) -> str | None:
        """``path`` relative to :attr:`folder` (POSIX), or None when it is not under it."""
        for p, folder in ((Path(path), self.folder), (Path(os.path.abspath(path)), Path(os.path.abspath(self.folder)))):
            if p.is_relative_to(folder):
                return p.relative_to(folder).as_posix()
        return None

    def check(self, paths: Iterable[str] | None = None) -> None:
        """Check, before training, that every shard holding one of ``paths`` (all shards when None)
        exists with the size the index records (one ``stat`` per shard).

        Raises:
            ShardError: every missing or truncated shard, one line each, naming it and the videos
                it holds (how many and the first few); videos of ``paths`` not in the index.
        """
        needed: dict[int, list[str]] = {}
        absent = []
        if paths is None:
            for rel, s in self.samples.items():
                needed.setdefault(s.shard, []).append(rel)
        else:
            for p in paths:
                s = self.sample(p)
                if s is None:
                    absent.append(str(p))
                else:
                    needed.setdefault(s.shard, []).append(self.relative(p))
        problems = []
        if absent:
            problems.append(f"{self.path}: {len(absent)} listed videos are in no shard, e.g. {absent[0]} "
                            "(was the list prepared into this index?)")
        for shard in sorted(needed):
            what = self.size_problem(shard)
            if what is None:
                continue
            videos = needed[shard]
            shown = ", ".join(videos[:3]) + (", ..." if len(videos) > 3 else "")
            problems.append(f"shard {self.shard_path(shard)}: {what}; it holds {len(videos)} of the listed videos "
                            f"({shown}); restore it or prepare it again")
        if problems:
            raise ShardError(problems)

    def size_problem(self, shard: int) -> str | None:
        """Why tar shard ``shard`` is not there at the size the index records (one ``stat``):
        ``missing (No such file or directory)``, ``N bytes, the index records M (truncated)``;
        ``None`` when it is."""
        expected = self.shards[shard]["bytes"]
        try:
            size = self.shard_path(shard).stat().st_size
        except OSError as err:
            return f"missing ({err.strerror})"
        if size == expected:
            return None
        return f"{size} bytes, the index records {expected}" + (" (truncated)" if size < expected else "")

    def prepared(self) -> dict[str, dict]:
        """``{full video path: record}`` in the form of :func:`tsmtrain.data.loader.prepared_videos`
        (``frames``, ``width``, ``height``, ``fps``), so that the loader treats shard samples as
        the prepared videos they are (approximate seeking, frame count check, no size probe)."""
        return {str(self.folder / rel): {"frames": s.frames, "width": s.width, "height": s.height, "fps": s.fps,
                                         "frame_mappings": s.frame_mappings is not None, "shard": s.shard}
                for rel, s in self.samples.items()}


class ShardReader:
    """Reads samples from the shards of an index: each shard opened once per process (the file
    handles of a forked loader worker are its own) and kept open, each sample read whole with one
    ``os.pread`` and checked (CRC-32 and its first tar header) before use.

    Attributes:
        opened: names of the shard files this process opened, in order (each at most once unless
            more than :data:`MAX_OPEN_SHARDS` were open).
    """

    def __init__(self, index: ShardIndex, max_open: int = MAX_OPEN_SHARDS):
        self.index, self.max_open = index, max_open
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.opened: list[str] = []
        self._taken = 0

    def take_opened(self) -> list[str]:
        """The shard files this process opened since the last call."""
        if os.getpid() != self._pid:
            return []
        new, self._taken = self.opened[self._taken:], len(self.opened)
        return new

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a forked worker: the parent's handles and counts are not its own
            self._files, self._pid, self.opened, self._taken = OrderedDict(), os.getpid(), [], 0
        fd = self._files.get(shard)
        if fd is None:
            path = self.index.shard_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise SampleError(f"cannot open shard {path}: {err.strerror or err}") from None
            self.opened.append(str(path))
            self._files[shard] = fd
            while len(self._files) > self.max_open:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def read(self, path: str | Path) -> tuple[bytes, bytes | None]:
        """The video bytes and frame table bytes (None if not stored) of the video at ``path``.

        Raises:
            SampleError: not in the index, the shard cannot be opened, a short read (truncated
                shard), a CRC mismatch or a header that is not the index's (a damaged sample).
        """
        sample = self.index.sample(path)
        if sample is None:
            raise SampleError(f"not in the shard index {self.index.path}")
        with self._lock:
            fd = self._fd(sample.shard)
        where = f"shard {self.index.shard_path(sample.shard)} at byte {sample.offset}"
        try:
            data = os.pread(fd, sample.size, sample.offset)
        except OSError as err:
            raise SampleError(f"{where}: {err.strerror or err}") from None
        if len(data) != sample.size:
            raise SampleError(f"{where}: read {len(data)} of {sample.size} bytes (shard truncated?)")
        if zlib.crc32(data) != sample.crc32:
            raise SampleError(f"{where}: CRC-32 mismatch (damaged sample)")
        try:
            header = tarfile.TarInfo.frombuf(data[:_BLOCK], tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError as err:
            raise SampleError(f"{where}: not a tar header ({err})") from None
        if header.name != sample.key + ".mp4" or header.size != sample.video[1]:
            raise SampleError(f"{where}: the tar header names {header.name!r}, the index {sample.key}.mp4")

        def member(span: tuple[int, int]) -> bytes:
            start = span[0] - sample.offset
            return data[start:start + span[1]]

        return member(sample.video), member(sample.frame_mappings) if sample.frame_mappings else None

    def close(self) -> None:
        """Close every open shard."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:  # to a spawned worker: no handles
        state = dict(self.__dict__)
        state.update(_files=OrderedDict(), _lock=None, opened=[], _taken=0)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()


# --------------------------------------------------------------------------- preparing into shards


def _tar_journal_path(out_dir: Path, task: tuple[int, int]) -> Path:
    return out_dir / SHARDS_DIR / f"tars-{task[0]}-of-{task[1]}.jsonl"


def _tar_name(task: tuple[int, int], number: int) -> str:
    return f"{SHARDS_FOLDER}/shard-{task[0]:05d}-of-{task[1]:05d}-{number:06d}.tar"


def _valid_tars(out_dir: Path, task: tuple[int, int], settings: Settings, shard_size: int) -> list[dict]:
    """The task's journaled shards made with these settings and shard size whose file exists
    with the recorded size (a shard deleted or cut since no longer counts)."""
    path = _tar_journal_path(out_dir, task)
    records = read_journal(path, required=_TAR_KEYS) if path.is_file() else []
    latest = {}
    for r in records:
        latest[r["tar"]] = r
    return [r for r in latest.values()
            if r.get("settings") == settings.key() and r.get("shard_size") == shard_size
            and (out_dir / r["tar"]).is_file() and (out_dir / r["tar"]).stat().st_size == r["bytes"]]


def _labels(plan: Plan) -> dict[int, int]:
    """Video index -> the label of the first list line naming it."""
    labels: dict[int, int] = {}
    for _, lines in plan.lists:
        for index, label in lines:
            labels.setdefault(index, label)
    return labels


def _key(video: Video) -> str:
    """A sample key without dots (WebDataset splits a member name at its first dot)."""
    return f"{video.index:09d}"


@dataclass
class TaskSummary:
    """What :func:`run_task` did: the encoding (``encoding``, a
    :class:`~tsmtrain.data.prepare.ShardSummary` of the staged videos) and the packing.

    Attributes:
        videos: the task's videos; ``in_shards_before``: already in a complete shard.
        shards_written, shards_before: shards written now, and complete before.
        bytes_written: bytes of the shards written now.
    """

    encoding: ShardSummary
    videos: int
    in_shards_before: int = 0
    shards_before: int = 0
    shards_written: int = 0
    bytes_written: int = 0


class _Packer:
    """Packs a task's videos, in plan order, into shards as their encodings finish."""

    def __init__(self, out_dir: Path, staging: Path, task: tuple[int, int], order: list[Video],
                 settings: Settings, shard_size: int, labels: dict[int, int], journal: _Journal, number: int):
        self.out_dir, self.staging, self.task, self.order = out_dir, staging, task, order
        self.settings, self.shard_size, self.labels, self.journal = settings, shard_size, labels, journal
        self.number, self.pos, self.batch, self.bytes = number, 0, [], 0
        self.done: dict[int, dict] = {}
        self.written = self.written_bytes = 0

    def feed(self, video_index: int, record: dict) -> None:
        """Note a finished video (its manifest record) and write every shard that is now complete."""
        self.done[video_index] = record
        while self.pos < len(self.order) and self.order[self.pos].index in self.done:
            video = self.order[self.pos]
            record = self.done[video.index]
            self.pos += 1
            if record["status"] != "ok":
                continue
            size = record["bytes_out"] + 4 * _BLOCK  # the mp4, its header and the small members' headers
            if record.get("frame_mappings"):
                size += (self.staging / record["frame_mappings"]).stat().st_size
            if self.batch and self.bytes + size > self.shard_size:
                self.flush()
            self.batch.append((video, record))
            self.bytes += size

    def flush(self) -> None:
        """Write the videos gathered so far as the next shard, journal it, drop their staged files."""
        if not self.batch:
            return
        name = _tar_name(self.task, self.number)
        samples, staged = [], []
        for video, record in self.batch:
            files = [(".mp4", self.staging / video.output)]
            if record.get("frame_mappings"):
                files.append((FRAMES_SUFFIX, self.staging / record["frame_mappings"]))
            members = [(ext, path.read_bytes()) for ext, path in files]
            meta = {"path": video.output, "label": self.labels.get(video.index), "frames": record["frames"],
                    "fps": record["fps"], "width": record["width"], "height": record["height"]}
            members += [(".json", json.dumps(meta, sort_keys=True).encode()),
                        (".cls", str(self.labels.get(video.index, "")).encode())]
            samples.append((_key(video), members))
            staged.extend(path for _, path in files)
        target = self.out_dir / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            entries = write_tar(target, samples)
        except OSError as err:
            raise PrepareError(f"cannot write shard {target}: {err.strerror or err}") from None
        for entry, (video, _) in zip(entries, self.batch):
            entry.update(source=video.source, output=video.output)
        self.journal.append({"tar": name, "bytes": target.stat().st_size, "number": self.number,
                             "task": list(self.task), "settings": self.settings.key(),
                             "shard_size": self.shard_size, "samples": entries, "time": time.time()})
        for path in staged:
            path.unlink(missing_ok=True)
        self.written += 1
        self.written_bytes += target.stat().st_size
        self.number += 1
        self.batch, self.bytes = [], 0


def run_task(plan: Plan, settings: Settings, task: tuple[int, int] = (0, 1), shard_size: int = DEFAULT_SHARD_SIZE,
             jobs: int | None = None, decoder: str = "torchcodec", retry_failed: bool = False,
             progress: bool = True) -> TaskSummary:
    """Prepare array task ``task`` = ``(I, N)`` of ``plan`` into shards: encode its videos not yet in
    a complete shard into ``DIR/.staging`` (:func:`~tsmtrain.data.prepare.run_shard`, ``jobs`` at
    a time) and pack them, in plan order, into shards of at most ``shard_size`` bytes as they
    finish (see the module's docstring for why a kill loses nothing).

    Raises:
        PrepareError: a shard or the staging folder cannot be written (the run stops; complete
            shards stay complete).
        ManifestError: a journal has a malformed line.
    """
    out_dir = plan.out_dir
    staging = out_dir / STAGING
    mine = shard_videos(plan.videos, task)
    valid = _valid_tars(out_dir, task, settings, shard_size)
    packed = {s["source"] for r in valid for s in r["samples"]}
    order = [v for v in mine if v.source not in packed]
    for stale in (out_dir / SHARDS_FOLDER).glob(f".shard-{task[0]:05d}-of-{task[1]:05d}-*.part-*"):
        stale.unlink(missing_ok=True)  # left by a killed run: never listed
    if valid:  # a run killed after journaling its last shard leaves that shard's staged videos
        for sample in max(valid, key=lambda r: r["number"])["samples"]:
            for name in (sample["output"], sample["output"] + FRAMES_SUFFIX):
                (staging / name).unlink(missing_ok=True)
    staged = Plan(staging, order, plan.lists, plan.warnings)
    summary = TaskSummary(ShardSummary(task, len(order)), len(mine), in_shards_before=len(mine) - len(order),
                          shards_before=len(valid))
    try:
        journal = _Journal(_tar_journal_path(out_dir, task))
    except OSError as err:
        raise PrepareError(f"--out {out_dir}: cannot write the shard journal: {err.strerror or err}") from None
    number = max((r["number"] for r in valid), default=-1) + 1
    packer = _Packer(out_dir, staging, task, order, settings, shard_size, _labels(plan), journal, number)
    by_source = {v.source: v for v in order}
    try:
        latest = _latest_records(staging)
        for video in order:  # encoded by an earlier run, not yet packed
            record = latest.get(video.source)
            if _is_done(record, video, staging, settings, retry_failed, frame_mappings=True):
                packer.feed(video.index, record)
        summary.encoding = run_shard(staged, settings, task, jobs, decoder, True, retry_failed, progress,
                                     on_record=lambda r: packer.feed(by_source[r["source"]].index, r))
        packer.flush()
    finally:
        journal.close()
    summary.shards_written, summary.bytes_written = packer.written, packer.written_bytes
    return summary


def task_lines(summary: TaskSummary) -> list[str]:
    """What ``tsmtrain prepare --shards`` prints (on stderr) after :func:`run_task`, below the
    encoding's lines: the shards written now and before, and the videos already packed."""
    s = summary
    return [f"shards: {s.shards_written} written now ({s.bytes_written / 1e9:.2f} GB), {s.shards_before} complete "
            f"before holding {s.in_shards_before} of the task's {s.videos} videos"]


def merge_shards(plan: Plan, settings: Settings, shard_size: int = DEFAULT_SHARD_SIZE,
                 tasks: int | None = None) -> MergeResult:
    """Write the list files, the manifest, the wids shard list and, last and atomically, the index
    (:data:`INDEX`) from the shards of all ``tasks`` array tasks.

    Args:
        plan, settings, shard_size: as the tasks were given.
        tasks: N; None: the N of the shard journals in the folder (there must be one).

    Raises:
        PrepareError: no shard journals; journals of several N and no ``tasks``; a task's journal
            missing; videos neither in a complete shard nor failed (how many, the first few and
            their tasks). Nothing is written then.
        ManifestError: a journal has a malformed line.
    """
    out_dir = plan.out_dir
    found = _journals(out_dir, _TAR_JOURNAL)
    if tasks is None:
        counts = sorted({n for _, n in found})
        if len(counts) != 1:
            raise PrepareError(f"{out_dir / SHARDS_DIR}: " + ("no shard journals (tars-I-of-N.jsonl): run the tasks "
                                                             "(--shards --shard I/N) first" if not counts else
                                                             f"shard journals of {', '.join(map(str, counts))} tasks: "
                                                             "say which with --tasks N"))
        tasks = counts[0]
    missing = [i for i in range(tasks) if (i, tasks) not in found]
    if missing:
        raise PrepareError(f"{len(missing)} of {tasks} tasks have no shard journal in {out_dir / SHARDS_DIR}: "
                           + ", ".join(f"{i}/{tasks}" for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
                           + f"; run them (--shards --shard I/{tasks}) before --merge")
    tars = sorted((r for i in range(tasks) for r in _valid_tars(out_dir, (i, tasks), settings, shard_size)),
                  key=lambda r: r["tar"])
    where = {s["source"]: (n, s) for n, r in enumerate(tars) for s in r["samples"]}
    latest = _latest_records(out_dir / STAGING)
    undone = [v for v in plan.videos if v.source not in where
              and (latest.get(v.source) or {}).get("status") != "failed"]
    if undone:
        shown = "; ".join(f"{v.source} (task {v.index % tasks}/{tasks})" for v in undone[:5])
        raise PrepareError([f"{len(undone)} of {len(plan.videos)} videos are in no complete shard made with these "
                            f"settings and --shard-size {shard_size}: {shown}" + (" ..." if len(undone) > 5 else ""),
                            f"run task(s) {', '.join(map(str, sorted({v.index % tasks for v in undone})[:20]))} of "
                            f"{tasks} again (same options) before --merge"])
    labels = _labels(plan)
    records, videos = [], {}
    for video in plan.videos:
        record = dict(latest[video.source])
        record["list"] = video.list
        if video.source in where:
            n, s = where[video.source]
            mappings = s["members"].get(FRAMES_SUFFIX)
            record.update(status="ok", output=video.output, shard=tars[n]["tar"], offset=s["offset"], size=s["size"],
                          frame_mappings=None)
            videos[video.output] = {"key": s["key"], "shard": n, "offset": s["offset"], "size": s["size"],
                                    "video": s["members"][".mp4"], "frame_mappings": mappings, "crc32": s["crc32"],
                                    "label": labels.get(video.index), "frames": record["frames"], "fps": record["fps"],
                                    "width": record["width"], "height": record["height"]}
        else:
            record.update(status="failed", output=None)
        records.append(record)
    lists = []
    for name, lines in plan.lists:
        kept = [f"{plan.videos[i].output} {label}\n" for i, label in lines if plan.videos[i].output in videos]
        _write_atomic(out_dir / name, "".join(kept))
        lists.append((out_dir / name, len(kept), len(lines) - len(kept)))
    _write_atomic(out_dir / MANIFEST, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    shards = [{"path": r["tar"], "bytes": r["bytes"], "samples": len(r["samples"])} for r in tars]
    _write_atomic(out_dir / WIDS_INDEX, json.dumps(
        {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out_dir.name,
         "shardlist": [{"url": s["path"], "nsamples": s["samples"], "filesize": s["bytes"]} for s in shards]},
        indent=1) + "\n")
    index = {"kind": INDEX_KIND, "version": 1, "settings": settings.key(), "shard_size": shard_size, "tasks": tasks,
             "shards": shards, "videos": videos}
    _write_atomic(out_dir / INDEX, json.dumps(index, separators=(",", ":")) + "\n")
    ok = len(videos)
    return MergeResult(out_dir / INDEX, lists, ok, len(records) - ok, tasks)

