"""Indexed tar shards: prepared videos packed into a few large files for parallel file systems.

Parallel file systems (Lustre, GPFS) serve file metadata (opens, stats) from a few servers
shared by every job. A run that opens one file per clip, 246,245 Kinetics-400 videos x 50 epochs
in 853 s on 1,536 GPUs ("Training Kinetics in 15 Minutes", Lin, Gan, Han 2019), asks them for
about 14,400 opens per second. ``tsmtrain prepare --shards`` therefore writes the prepared videos
into tar files of about ``--shard-size`` bytes (1 GiB by default) and an index of where each
video lies; the loader then opens each shard once per worker and reads whole samples from it by
byte offset (:class:`TarShardReader`), decoding them from memory.

**The files** in the output folder ``DIR``:

* ``DIR/shards/shard-IIIII-of-NNNNN-KKKKKK.tar``: plain POSIX (ustar) tar files in the
  WebDataset layout (a sample is the members sharing a key: ``KEY.mp4`` the video exactly as
  :mod:`tsmtrain.prep.encode` encodes it, ``KEY.frames.json`` its frame table, ``KEY.json`` its
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
videos' order and sizes. :func:`merge_tar_shards` (``--merge``, or the end of a one-machine run)
checks every task's shards and writes the list files, the manifest and, last and atomically,
the index.

Errors: :class:`ShardError` (a :class:`~tsmtrain.data.manifest.ManifestError`: a missing or
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
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.manifest import FRAMES_SUFFIX, JOURNALS_DIR, MANIFEST, read_journal
from ..data.readers.tar import INDEX, INDEX_KIND, SHARDS_FOLDER
from ..io import FileWriteError, write_atomic, write_text
from .encode import (MergeResult, Worklist, PrepareError, Settings, TaskSummary, SourceVideo, already_prepared,
                     run_task, task_videos)
from .journal import Journal, journal_files, latest_records

__all__ = ["INDEX", "WIDS_INDEX", "SHARDS_FOLDER", "STAGING", "DEFAULT_SHARD_SIZE", "INDEX_KIND", "parse_size",
           "write_tar", "PackSummary", "pack_task", "pack_lines", "merge_tar_shards"]


WIDS_INDEX = "wids-index.json"
"""The shard list in wids' format (``wids-shard-index-v1``), for WebDataset users."""


STAGING = ".staging"
"""Folder in the output folder where videos wait, encoded, to be packed into a shard."""

DEFAULT_SHARD_SIZE = 1 << 30
"""Bytes per shard by default (1 GiB; WebDataset advises 256 MB to 1 GB, the size at which
a parallel file system reads at full bandwidth)."""


_BLOCK = tarfile.BLOCKSIZE  # 512
_TAR_JOURNAL = re.compile(r"^tars-(\d+)-of-(\d+)\.jsonl$")
_TAR_KEYS = ("tar", "bytes", "number", "settings", "shard_size", "samples")


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


# --------------------------------------------------------------------------- writing a shard


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that is the same on every run (no time, owner or mode of this machine)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def write_tar(path: Path, samples: Sequence[tuple[str, Sequence[tuple[str, bytes]]]]) -> list[dict]:
    """Write ``samples`` (``(key, [(extension, data), ...])``) as one ustar tar file at ``path``.

    The file is written beside ``path`` (:func:`tsmtrain.io.write_atomic`), flushed, read back
    (every header where the returned offsets say, by :mod:`tarfile`), then put in place.

    Returns:
        Per sample: ``key``, ``offset`` (bytes from the start of the file to the sample's first
        header), ``size`` (bytes from there to the end of its last member, padding included),
        ``crc32`` of those bytes, and per member extension ``[data offset, data size]``
        (``members``).

    Raises:
        FileWriteError: the file cannot be written (names it and why; no part of it is left).
        RuntimeError: the written file does not read back as written (a bug or a bad disk).
    """
    entries = []
    with write_atomic(path) as part:
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
        _check_tar(part, entries)
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


# --------------------------------------------------------------------------- preparing into shards


def _tar_journal_path(out_dir: Path, task: tuple[int, int]) -> Path:
    return out_dir / JOURNALS_DIR / f"tars-{task[0]}-of-{task[1]}.jsonl"


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


def _labels(plan: Worklist) -> dict[int, int]:
    """Video index -> the label of the first list line naming it."""
    labels: dict[int, int] = {}
    for _, lines in plan.lists:
        for index, label in lines:
            labels.setdefault(index, label)
    return labels


def _key(video: SourceVideo) -> str:
    """A sample key without dots (WebDataset splits a member name at its first dot)."""
    return f"{video.index:09d}"


@dataclass
class PackSummary:
    """What :func:`pack_task` did: the encoding (``encoding``, a
    :class:`~tsmtrain.prep.encode.TaskSummary` of the staged videos) and the packing.

    Attributes:
        videos: the task's videos; ``in_shards_before``: already in a complete shard.
        shards_written, shards_before: shards written now, and complete before.
        bytes_written: bytes of the shards written now.
    """

    encoding: TaskSummary
    videos: int
    in_shards_before: int = 0
    shards_before: int = 0
    shards_written: int = 0
    bytes_written: int = 0


class _Packer:
    """Packs a task's videos, in plan order, into shards as their encodings finish."""

    def __init__(self, out_dir: Path, staging: Path, task: tuple[int, int], order: list[SourceVideo],
                 settings: Settings, shard_size: int, labels: dict[int, int], journal: Journal, number: int):
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
            entries = write_tar(target, samples)
        except FileWriteError as err:  # "PATH: cannot write: no space left on the device"
            raise PrepareError(str(err)) from None
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


def pack_task(plan: Worklist, settings: Settings, task: tuple[int, int] = (0, 1), shard_size: int = DEFAULT_SHARD_SIZE,
             jobs: int | None = None, decoder: str = "torchcodec", retry_failed: bool = False,
             progress: bool = True) -> PackSummary:
    """Prepare array task ``task`` = ``(I, N)`` of ``plan`` into shards: encode its videos not yet in
    a complete shard into ``DIR/.staging`` (:func:`~tsmtrain.prep.encode.run_task`, ``jobs`` at
    a time) and pack them, in plan order, into shards of at most ``shard_size`` bytes as they
    finish (see the module's docstring for why a kill loses nothing).

    Raises:
        PrepareError: a shard or the staging folder cannot be written (the run stops; complete
            shards stay complete).
        ManifestError: a journal has a malformed line.
    """
    out_dir = plan.out_dir
    staging = out_dir / STAGING
    mine = task_videos(plan.videos, task)
    valid = _valid_tars(out_dir, task, settings, shard_size)
    packed = {s["source"] for r in valid for s in r["samples"]}
    order = [v for v in mine if v.source not in packed]
    for stale in (out_dir / SHARDS_FOLDER).glob(f".shard-{task[0]:05d}-of-{task[1]:05d}-*.part-*"):
        stale.unlink(missing_ok=True)  # left by a killed run: never listed
    if valid:  # a run killed after journaling its last shard leaves that shard's staged videos
        for sample in max(valid, key=lambda r: r["number"])["samples"]:
            for name in (sample["output"], sample["output"] + FRAMES_SUFFIX):
                (staging / name).unlink(missing_ok=True)
    staged = Worklist(staging, order, plan.lists, plan.warnings)
    summary = PackSummary(TaskSummary(task, len(order)), len(mine), in_shards_before=len(mine) - len(order),
                          shards_before=len(valid))
    try:
        journal = Journal(_tar_journal_path(out_dir, task))
    except OSError as err:
        raise PrepareError(f"--out {out_dir}: cannot write the shard journal: {err.strerror or err}") from None
    number = max((r["number"] for r in valid), default=-1) + 1
    packer = _Packer(out_dir, staging, task, order, settings, shard_size, _labels(plan), journal, number)
    by_source = {v.source: v for v in order}
    try:
        latest = latest_records(staging)
        for video in order:  # encoded by an earlier run, not yet packed
            record = latest.get(video.source)
            if already_prepared(record, video, staging, settings, retry_failed, frame_mappings=True):
                packer.feed(video.index, record)
        summary.encoding = run_task(staged, settings, task, jobs, decoder, True, retry_failed, progress,
                                     on_record=lambda r: packer.feed(by_source[r["source"]].index, r))
        packer.flush()
    finally:
        journal.close()
    summary.shards_written, summary.bytes_written = packer.written, packer.written_bytes
    return summary


def pack_lines(summary: PackSummary) -> list[str]:
    """What ``tsmtrain prepare --shards`` prints (on stderr) after :func:`pack_task`, below the
    encoding's lines: the shards written now and before, and the videos already packed."""
    s = summary
    return [f"shards: {s.shards_written} written now ({s.bytes_written / 1e9:.2f} GB), {s.shards_before} complete "
            f"before holding {s.in_shards_before} of the task's {s.videos} videos"]


def merge_tar_shards(plan: Worklist, settings: Settings, shard_size: int = DEFAULT_SHARD_SIZE,
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
    found = journal_files(out_dir, _TAR_JOURNAL)
    if tasks is None:
        counts = sorted({n for _, n in found})
        if len(counts) != 1:
            raise PrepareError(f"{out_dir / JOURNALS_DIR}: " + ("no shard journals (tars-I-of-N.jsonl): run the tasks "
                                                             "(--shards --shard I/N) first" if not counts else
                                                             f"shard journals of {', '.join(map(str, counts))} tasks: "
                                                             "say which with --tasks N"))
        tasks = counts[0]
    missing = [i for i in range(tasks) if (i, tasks) not in found]
    if missing:
        raise PrepareError(f"{len(missing)} of {tasks} tasks have no shard journal in {out_dir / JOURNALS_DIR}: "
                           + ", ".join(f"{i}/{tasks}" for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
                           + f"; run them (--shards --shard I/{tasks}) before --merge")
    tars = sorted((r for i in range(tasks) for r in _valid_tars(out_dir, (i, tasks), settings, shard_size)),
                  key=lambda r: r["tar"])
    where = {s["source"]: (n, s) for n, r in enumerate(tars) for s in r["samples"]}
    latest = latest_records(out_dir / STAGING)
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
        write_text(out_dir / name, "".join(kept))
        lists.append((out_dir / name, len(kept), len(lines) - len(kept)))
    write_text(out_dir / MANIFEST, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    shards = [{"path": r["tar"], "bytes": r["bytes"], "samples": len(r["samples"])} for r in tars]
    write_text(out_dir / WIDS_INDEX, json.dumps(
        {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out_dir.name,
         "shardlist": [{"url": s["path"], "nsamples": s["samples"], "filesize": s["bytes"]} for s in shards]},
        indent=1) + "\n")
    index = {"kind": INDEX_KIND, "version": 1, "settings": settings.key(), "shard_size": shard_size, "tasks": tasks,
             "shards": shards, "videos": videos}
    write_text(out_dir / INDEX, json.dumps(index, separators=(",", ":")) + "\n")
    ok = len(videos)
    return MergeResult(out_dir / INDEX, lists, ok, len(records) - ok, tasks)

