"""Reading indexed tar shards (written by ``tsmtrain prepare --shards``,
:mod:`tsmtrain.prep.tar_writer`, which describes the layout): :class:`ShardIndex` loads and
checks ``DIR/index.json`` (every entry inside the index's folder, every byte range inside its
shard), :class:`TarShardReader` reads one whole sample by ``os.pread`` from shards each worker
opens once, and checks its CRC-32.

Errors: :class:`ShardError` (a :class:`~tsmtrain.data.manifest.ManifestError`: a missing or
malformed index, an entry outside the folder or its shard, a missing or truncated shard, named
with the videos it holds) and :class:`SampleError` (one sample cannot be read: the loader skips
it and counts it, as an unreadable video file).
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..manifest import ManifestError

__all__ = ["INDEX", "INDEX_KIND", "SHARDS_FOLDER", "MAX_OPEN_SHARDS", "ShardError", "SampleError", "shard_index_file",
           "is_shard_index", "outside_folder", "Sample", "ShardIndex", "TarShardReader"]

_BLOCK = tarfile.BLOCKSIZE  # 512


INDEX = "index.json"
"""The shard index in the output folder; ``data.root`` points at it."""


INDEX_KIND = "tsmtrain-shard-index"
"""The index's ``kind``; :meth:`ShardIndex.load` refuses a JSON file without it."""


SHARDS_FOLDER = "shards"
"""Folder of the tar files in the output folder."""


MAX_OPEN_SHARDS = 1024
"""Shards a :class:`TarShardReader` keeps open at once (per process); the least recently read is
closed beyond it (1 TiB of 1 GiB shards fits)."""


class ShardError(ManifestError):
    """The shard index is missing or malformed, or a shard is missing, truncated or changed; the
    message names the file (and the videos a bad shard holds). ``problems`` holds one line each."""



class SampleError(ValueError):
    """One sample cannot be read from its shard (short read, CRC mismatch, a header that is not
    the index's); the loader skips the video and counts it."""


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
        """Read an index written by :func:`merge_tar_shards` and check every entry before any shard is
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
        """``{full video path: record}`` in the form of :func:`tsmtrain.data.readers.files.prepared_videos`
        (``frames``, ``width``, ``height``, ``fps``), so that the loader treats shard samples as
        the prepared videos they are (approximate seeking, frame count check, no size probe)."""
        return {str(self.folder / rel): {"frames": s.frames, "width": s.width, "height": s.height, "fps": s.fps,
                                         "frame_mappings": s.frame_mappings is not None, "shard": s.shard}
                for rel, s in self.samples.items()}


class TarShardReader:
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
