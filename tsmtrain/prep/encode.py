"""Re-encode a dataset's videos once, so that training decodes them fast and frame indices are exact.

``tsmtrain prepare`` reads list files (``relative/path.ext label``, :mod:`.lists`) and writes every
video again into an output folder ``DIR``, at the same relative path with the extension ``.mp4``:

* H.264 (libx264), 8-bit yuv420p, square pixels; the short side scaled to ``short_side`` pixels
  (default 256, as in the TSN/TSM data preparation of mmaction2, which resizes the short side of
  Kinetics to 256), the long side to the nearest even size that keeps the displayed aspect ratio
  (sample aspect ratio and container rotation applied: a phone video shot upright comes out
  upright, and decord, which ignores rotation, then sees what torchcodec sees);
* a keyframe every ``gop`` frames exactly (default 4, :data:`DEFAULT_GOP`: seeking to any frame
  decodes at most 3 others; ``-g 4 -keyint_min 4 -sc_threshold 0``);
* x264 ``-tune fastdecode`` and no B-frames (``Settings.fastdecode``, on by default): about 2x
  faster to decode for about 12% larger files;
* constant frame rate starting at timestamp 0 (the source's average rate, or ``fps``), so that
  frame ``i`` is at time ``i / fps``: torchcodec's ``seek_mode="approximate"`` is then exact;
* no audio, subtitle or data streams, no metadata, ``+faststart`` (the index first);
* beside it, ``<output>.frames.json``: the frame table (pts, duration, key_frame per frame) that
  torchcodec's ``VideoDecoder(custom_frame_mappings=...)`` reads instead of scanning the file.

Any input ffmpeg can read works: 10-bit, HEVC, AV1, VP9, MPEG-4, variable frame rate, rotated,
odd sizes. Every output is verified before it counts: ffprobe reads its packets (codec, size,
timestamps ``i * duration``, keyframe gaps) and the decoder (:func:`.decoding.open_video`) opens
it and must count the same frames and decode the first and the last. A source that cannot be
read, has no video stream or no frames is left out of the new list files and recorded with its
reason; nothing else is lost.

What ``DIR`` holds afterwards:

* the videos, ``DIR/<relative path>.mp4``, and their ``.frames.json`` tables;
* the new list files, same base names as the source lists (``DIR/train.txt``, ``DIR/val.txt``),
  paths relative to ``DIR``, same labels and order, bad videos left out; a recipe then uses
  ``data.root: DIR`` and ``data.train_list: DIR/train.txt``;
* ``DIR/manifest.jsonl`` (:data:`MANIFEST`): one JSON record per video (see :func:`read_manifest`);
* ``DIR/.shards/manifest-I-of-N.jsonl``: the journals the manifest is merged from.

**Resuming.** Each video is encoded into a hidden temporary file beside its output
(``.NAME.mp4.part-PID``), verified, flushed to disk and renamed; only then is its record appended
to the task's journal. A video counts as done when the journal has an ``ok`` record for it, made
with the same settings, from a source of the same size, and its output exists with the recorded
size. So a run stopped at any moment (``kill -9``, a node lost, a time limit) and started again
redoes only the videos in flight, and a second run of a finished preparation encodes nothing.
Failed videos are not tried again unless ``retry_failed``. On Linux the ffmpeg and ffprobe a run
started die with it, even when it is killed with ``kill -9`` (:mod:`tsmtrain.child`): none is left
encoding for nobody.

**On a cluster.** ``task=(I, N)`` takes every N-th video (videos ``I, I+N, I+2N, ...`` of the
de-duplicated list, 0-based) and writes only its journal; :func:`merge` then writes the list files
and the manifest from all N journals. With Slurm, one array task per ``I``
(``slurm/prepare.sbatch`` in the repository; its first argument is N)::

    JOB=$(sbatch --parsable --array=0-99 --cpus-per-task=16 slurm/prepare.sbatch 100 \\
          --list k400/train.txt --list k400/val.txt --root k400 --out k400-256)
    sbatch --dependency=afterok:$JOB --wrap "tsmtrain prepare --list k400/train.txt \\
          --list k400/val.txt --root k400 --out k400-256 --merge"

where each task runs ``tsmtrain prepare ARGS --shard $SLURM_ARRAY_TASK_ID/100 --jobs
$SLURM_CPUS_PER_TASK``. A task stopped by its time limit continues where it stopped when the same
index is submitted again (``--array=17``). A merge with a task missing names it and writes nothing.

Errors: :class:`PrepareError` (a problem the user can fix: a missing list file, a bad task,
ffmpeg missing, a task journal missing at merge time; ``problems`` holds one line each) and
:class:`ManifestError` (a malformed manifest or journal line, named by file and line).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..child import ChildError, ChildTimeout, run
from ..data.lists import ListFileError, read_list
from ..data.manifest import FRAMES_SUFFIX, JOURNALS_DIR, MANIFEST
from ..io import FileWriteError, commit, write_text
from .journal import Journal, journal_files, journal_path, latest_records
from ..errors import UserError

__all__ = ["PrepareError", "Settings", "SourceVideo",
           "Worklist", "make_worklist", "parse_task", "task_videos", "default_jobs", "check_tools", "probe_source",
           "choose_fps", "output_size", "encode_command", "prepare_video", "run_task", "merge", "prepare",
           "TaskSummary", "MergeResult", "check_options", "summary_lines",
           "merge_lines"]


FPS_RANGE = (1.0, 240.0)
"""Frame rates (frames/s) accepted from a source's header; outside it the header is not trusted."""

FALLBACK_FPS = Fraction(25)
"""Frame rate (frames/s) used when the source's cannot be trusted and no ``fps`` was given."""

PROBE_TIMEOUT_S = 300
"""Seconds after which an ffprobe of one file is given up (the video is recorded as failed)."""

ENCODE_TIMEOUT_S = 3600
"""Seconds after which the ffmpeg of one video is killed (the video is recorded as failed)."""


class PrepareError(UserError):
    """A preparation cannot start or finish for a reason the user can fix; ``problems`` holds one
    line per problem, each naming the culprit (file, option, task)."""



class _SourceError(Exception):
    """This video cannot be prepared; the message is the manifest's ``reason``."""


DEFAULT_GOP = 4
"""``prepare``'s keyframe interval in frames. ``prepare --plan`` measured GOP 4 at 1.5-2x the clips/s
per core of GOP 16 for 1.6-1.9x the bytes (docs/data.md, "The default GOP"); data loading is the
first bottleneck of training on many GPUs, so the faster encoding is the default."""

OLD_DEFAULT_GOP = 16
"""The default before GOP 4 (until December 2026): datasets prepared without ``--gop`` then have it."""


def recorded_gop(out_dir: str | Path) -> int | None:
    """The GOP every prepared video of ``out_dir`` was encoded with (its journals' ``ok``
    records), or None when the folder holds none, or videos of several GOPs."""
    from .journal import latest_records

    gops = {r.get("gop") for r in latest_records(Path(out_dir)).values() if r.get("status") == "ok"}
    return gops.pop() if len(gops) == 1 and None not in gops else None


def choose_gop(given: int | None, out_dir: str | Path) -> tuple[int, str | None]:
    """``prepare``'s GOP: ``--gop`` when given; else the GOP ``out_dir``'s videos were prepared with,
    so that a dataset prepared with the old default (GOP 16) stays done when ``prepare`` runs on it
    again (to add videos, or after an interruption) instead of being re-encoded; else
    :data:`DEFAULT_GOP`.

    Returns:
        ``(gop, note)``: the note (one line, for stderr) says when the folder's GOP was kept.
    """
    if given is not None:
        return given, None
    kept = recorded_gop(out_dir)
    if kept is None or kept == DEFAULT_GOP:
        return DEFAULT_GOP, None
    return kept, (f"{out_dir} holds videos prepared with GOP {kept}"
                  f"{' (the default before GOP 4)' if kept == OLD_DEFAULT_GOP else ''}: continuing with GOP {kept} "
                  f"so that they stay done; give --gop {DEFAULT_GOP} to re-encode them at today's default")


@dataclass(frozen=True)
class Settings:
    """How videos are encoded. Records made with other settings do not count as done.

    Attributes:
        short_side: pixels of the shorter displayed side of every output (even).
        gop: frames between keyframes (the GOP length / keyframe interval).
        fps: output frame rate in frames/s as text (``"25"``, ``"30000/1001"``); ``None``: the
            source's average frame rate (:func:`choose_fps`).
        crf: x264 constant rate factor (quality; lower is better and larger; 23 is x264's default).
        preset: x264 preset (speed against size; ``veryfast`` ... ``slow``).
        fastdecode: encode for fast decoding: x264's ``-tune fastdecode`` (CAVLC instead of
            CABAC, no deblocking filter, no weighted prediction) and no B-frames (``-bf 0``: a
            frame needs no later frame, so a seek decodes fewer frames). Measured on this
            project's 2-core machine with torchcodec, 8 frames of a 640x360 clip prepared at
            456x256, GOP 16: 84 ms per clip without, 40 ms with, for 12% larger files.
        flow: ``None`` (no optical flow), or ``"tvl1"``, ``"dis"`` or ``"farneback"``: also store
            each video's optical flow beside it, ``NAME.flow.mkv`` (:mod:`.flow`).
        flow_preset: DIS preset (``ultrafast``, ``fast``, ``medium``); recorded for the others too.
        flow_bound: pixels: flow is clipped to +-this and quantized to 0..255.

    Without ``flow`` the flow fields are left out of :meth:`key`, so records made before flow
    existed still count as done.
    """

    short_side: int = 256
    gop: int = 4  # DEFAULT_GOP
    fps: str | None = None
    crf: int = 23
    preset: str = "fast"
    fastdecode: bool = True
    flow: str | None = None
    flow_preset: str = "medium"
    flow_bound: float = 20.0

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty when they are usable)."""
        out = []
        if self.short_side < 2 or self.short_side % 2:
            out.append(f"--short-side {self.short_side}: must be an even number of pixels >= 2 (yuv420p halves it)")
        if self.gop < 1:
            out.append(f"--gop {self.gop}: must be at least 1 frame")
        if not 0 <= self.crf <= 51:
            out.append(f"--crf {self.crf}: x264's constant rate factor is 0..51")
        if self.preset not in ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                               "veryslow", "placebo"):
            out.append(f"--preset {self.preset!r}: not an x264 preset (ultrafast ... veryslow)")
        if self.fps is not None:
            try:
                rate = Fraction(self.fps)
                if not FPS_RANGE[0] <= rate <= FPS_RANGE[1]:
                    out.append(f"--fps {self.fps}: outside {FPS_RANGE[0]:g}..{FPS_RANGE[1]:g} frames/s")
            except (ValueError, ZeroDivisionError):
                out.append(f"--fps {self.fps!r}: not a frame rate (e.g. 25, 29.97 or 30000/1001)")
        from ..data.flow import check_flow_settings

        return out + check_flow_settings(self.flow, self.flow_preset, self.flow_bound)

    def key(self) -> dict[str, Any]:
        key = asdict(self)
        if self.flow is None:
            for name in ("flow", "flow_preset", "flow_bound"):
                del key[name]
        return key


@dataclass(frozen=True)
class SourceVideo:
    """One video to prepare.

    Attributes:
        index: position in the de-duplicated plan (0-based; tasks take ``index % N == I``).
        source: absolute path of the source file.
        output: output path relative to the output folder (POSIX, ends in ``.mp4``).
        list: base name of the first list file that names it.
    """

    index: int
    source: str
    output: str
    list: str


@dataclass
class Worklist:
    """Every video of some list files, once each, in list order.

    Attributes:
        out_dir: the output folder (absolute).
        videos: the videos, de-duplicated by source.
        lists: per list file: its base name and its lines as ``(video index, label)``.
        warnings: things the user should know (a video in two lists).
    """

    out_dir: Path
    videos: list[SourceVideo]
    lists: list[tuple[str, list[tuple[int, int]]]]
    warnings: list[str] = field(default_factory=list)


def make_worklist(list_files: Sequence[str | Path], root: str | Path, out_dir: str | Path) -> Worklist:
    """Read the list files and decide every output path.

    Each source ``ROOT/rel/name.ext`` becomes ``out_dir/rel/name.mp4``. A source named by several
    lines (or lists) is prepared once.

    Raises:
        PrepareError: a list file is missing or malformed (every bad line named), the root is
            not a folder, a path leaves the root (absolute or ``..``), two list files share a
            base name, two sources would give the same output (``a.avi`` and ``a.mp4``), or the
            output folder is the root itself (outputs would replace sources).
    """
    root = Path(root).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    problems: list[str] = []
    if not root.is_dir():
        raise PrepareError(f"--root {root}: not a folder")
    root = root.resolve()
    if out_dir.resolve() == root:
        raise PrepareError(f"--out {out_dir}: is the root of the source videos; outputs would replace them")
    names = [Path(f).name for f in list_files]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two list files are named {name}: their new lists in {out_dir} would collide")
    if not list_files:
        problems.append("no list file given")
    videos: list[SourceVideo] = []
    by_source: dict[str, int] = {}
    by_output: dict[str, str] = {}
    lists = []
    in_lists: dict[int, set[str]] = {}
    for list_file, name in zip(list_files, names):
        try:
            records = read_list(list_file, root)
        except ListFileError as err:
            problems.extend(err.problems)
            continue
        lines = []
        for record in records:
            source = Path(record.path)
            rel = source.relative_to(root) if source.is_relative_to(root) else None
            if rel is None or ".." in rel.parts or not rel.parts:
                problems.append(f"{list_file}: {record.path}: not inside the root {root}")
                continue
            key = str(source)
            if key not in by_source:
                output = rel.with_suffix(".mp4").as_posix()
                if output in by_output:
                    problems.append(f"{list_file}: {rel} and {by_output[output]} would both become {output}")
                    continue
                by_output[output] = str(rel)
                by_source[key] = len(videos)
                videos.append(SourceVideo(len(videos), key, output, name))
            index = by_source[key]
            in_lists.setdefault(index, set()).add(name)
            lines.append((index, record.label))
        lists.append((name, lines))
    if problems:
        raise PrepareError(problems)
    shared = sum(1 for v in in_lists.values() if len(v) > 1)
    warnings = [f"{shared} video(s) are in more than one list file"] if shared else []
    return Worklist(out_dir, videos, lists, warnings)


def parse_task(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``.

    Raises:
        PrepareError: not two integers, or I outside 0..N-1.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise PrepareError(f"--shard {text!r}: expected I/N, e.g. 0/8 (task I of N, I counted from 0)")
    i, n = int(match[1]), int(match[2])
    if n < 1 or not 0 <= i < n:
        raise PrepareError(f"--shard {text}: I must be in 0..N-1 (tasks are counted from 0)")
    return i, n


def check_options(recipe: str | None, lists: Sequence[str], root: str | None, task: str | None, merge: bool,
                  tasks: int | None, settings: Settings, tar_shards: bool = False) -> None:
    """Check the options of ``tsmtrain prepare`` together, before anything is read: a recipe or
    list files (with their ``root``), ``task`` (``--shard I/N``) or ``merge`` (with ``tasks``,
    ``--tasks N``), the encoding ``settings`` and ``tar_shards`` (``--shards``: not with flow yet).

    Raises:
        PrepareError: one line per problem, each naming the option.
    """
    problems = []
    if (recipe is None) == (not lists):
        problems.append("give a recipe or --list files (with --root), not both" if recipe else
                        "give a recipe, or --list FILE --root ROOT")
    if lists and root is None:
        problems.append("--list: give --root, the folder its paths are relative to")
    if recipe is not None and root is not None:
        problems.append("--root: the recipe's data.root is used; give --root only with --list")
    if task is not None and merge:
        problems.append("--shard and --merge: run the tasks first, then one --merge")
    if tasks is not None and not merge:
        problems.append("--tasks goes with --merge (a task is chosen with --shard I/N)")
    problems += settings.problems()
    if tar_shards and settings.flow is not None:
        problems.append("--flow with --shards is not supported yet: prepare files (no --shards) for flow")
    if problems:
        raise PrepareError(problems)


def task_videos(videos: Sequence[SourceVideo], task: tuple[int, int]) -> list[SourceVideo]:
    """The videos of task ``(I, N)``: every N-th, starting at the I-th (``index % N == I``)."""
    i, n = task
    return [v for v in videos if v.index % n == i]


def default_jobs() -> int:
    """Cores this process may use (respects Slurm's and taskset's CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_tools(decoder: str) -> None:
    """Check that ffmpeg (with libx264), ffprobe and the decoder package are installed.

    Raises:
        PrepareError: naming what is missing and how to get it.
    """
    problems = [f"{tool} not found on PATH: install ffmpeg (apt-get install ffmpeg, or module load ffmpeg)"
                for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if not problems:
        try:
            encoders = run(["ffmpeg", "-hide_banner", "-encoders"], timeout=PROBE_TIMEOUT_S, check=False).stdout
        except ChildError as err:  # it hangs, or cannot be started
            problems.append(str(err))
            encoders = "libx264"  # (not the problem then)
        if "libx264" not in encoders:
            problems.append(f"{shutil.which('ffmpeg')} has no libx264 encoder: use an ffmpeg built with --enable-libx264")
    modules = {"torchcodec": "torchcodec.decoders", "decord": "decord"}
    if decoder not in modules:
        problems.append(f"--decoder {decoder!r}: choose one of {', '.join(modules)}")
    else:
        try:
            importlib.import_module(modules[decoder])
        except ImportError as err:
            problems.append(f"--decoder {decoder}: cannot import {modules[decoder]} ({err}); "
                            f"pip install {decoder}, or choose the other decoder")
    if problems:
        raise PrepareError(problems)


# --------------------------------------------------------------------------- one video


def _last_line(text: str, path: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "no message"
    return line.replace(f"{path}: ", "").replace(path, "<file>")[:300]


def _ffprobe_json(args: list[str], path: str) -> dict:
    try:
        done = run(["ffprobe", "-v", "error", *args, "-of", "json", path], timeout=PROBE_TIMEOUT_S, check=False)
    except ChildTimeout:
        raise _SourceError(f"ffprobe took more than {PROBE_TIMEOUT_S} s") from None
    except ChildError as err:  # not started: no video can be read
        raise _Abort(str(err)) from None
    if done.returncode != 0:
        raise _SourceError(f"cannot read: {_last_line(done.stderr, path)}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise _SourceError("cannot read: ffprobe wrote no readable description") from None


def _rate(text: Any) -> Fraction | None:
    try:
        rate = Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        return None
    return rate if rate > 0 else None


def probe_source(path: str | Path) -> dict:
    """Describe the source's first video stream (cover pictures skipped) with ffprobe.

    Returns:
        ``index`` (ffmpeg stream index), ``codec``, ``width``, ``height`` (stored pixels),
        ``sar`` (Fraction, 1 when unknown), ``rotation`` (degrees from the display matrix, 0 if
        none), ``pix_fmt``, ``avg_frame_rate`` and ``r_frame_rate`` (text as ffprobe gives them),
        ``nb_frames`` (int or None), ``seconds`` (float or None: stream or container duration).

    Raises:
        _SourceError: missing, empty or unreadable file, or no video stream (the message is the
            manifest's reason). _Abort: ffprobe cannot be started.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise _SourceError("file not found")
    if os.path.getsize(path) == 0:
        raise _SourceError("empty file (0 bytes)")
    doc = _ffprobe_json(["-show_entries", "format=duration:stream=index,codec_type,codec_name,width,height,"
                         "sample_aspect_ratio,pix_fmt,avg_frame_rate,r_frame_rate,nb_frames,duration:"
                         "stream_disposition=attached_pic:stream_side_data=rotation:stream_tags=rotate"], path)
    streams = [s for s in doc.get("streams", []) if s.get("codec_type") == "video"
               and not (s.get("disposition") or {}).get("attached_pic")]
    if not streams:
        raise _SourceError("no video stream")
    s = streams[0]
    if not s.get("width") or not s.get("height"):
        raise _SourceError(f"video stream {s.get('index')} ({s.get('codec_name')}) has no frame size")
    rotation = 0
    for side in s.get("side_data_list") or []:
        if "rotation" in side:
            rotation = int(round(float(side["rotation"])))
    if not rotation and (s.get("tags") or {}).get("rotate"):
        rotation = int(float(s["tags"]["rotate"]))
    sar = _rate(str(s.get("sample_aspect_ratio", "1:1")).replace(":", "/")) or Fraction(1)

    def number(value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError):
            return None

    seconds = number(s.get("duration"), float) or number((doc.get("format") or {}).get("duration"), float)
    return dict(index=int(s["index"]), codec=s.get("codec_name"), width=int(s["width"]), height=int(s["height"]),
                sar=sar, rotation=rotation, pix_fmt=s.get("pix_fmt"), avg_frame_rate=s.get("avg_frame_rate"),
                r_frame_rate=s.get("r_frame_rate"), nb_frames=number(s.get("nb_frames"), int), seconds=seconds)


def choose_fps(info: dict, fps: str | None = None) -> tuple[Fraction, list[str]]:
    """The output frame rate (frames/s) for a source described by :func:`probe_source`.

    ``fps`` (text) wins when given. Otherwise the source's ``avg_frame_rate`` (frames / duration:
    right for constant and variable frame rates alike), then ``r_frame_rate``, then frames /
    seconds, the first inside :data:`FPS_RANGE`; failing all, :data:`FALLBACK_FPS`. A rate with a
    large denominator (a variable-rate average) is reduced to the nearest one with a denominator of
    at most 1001, which keeps 30000/1001 as it is.

    Returns:
        The rate and notes for the manifest (why a fallback was used, that the source has a
        variable frame rate).
    """
    if fps is not None:
        return Fraction(fps).limit_denominator(1001), []
    avg, real = _rate(info.get("avg_frame_rate")), _rate(info.get("r_frame_rate"))
    counted = (Fraction(info["nb_frames"]) / Fraction(info["seconds"])
               if info.get("nb_frames") and info.get("seconds") else None)
    notes = []
    if avg and real and avg != real:
        notes.append(f"variable frame rate source (avg_frame_rate {info['avg_frame_rate']}, "
                     f"r_frame_rate {info['r_frame_rate']}): resampled to a constant rate")
    for name, rate in (("avg_frame_rate", avg), ("r_frame_rate", real), ("frames/duration", counted)):
        if rate is not None and FPS_RANGE[0] <= rate <= FPS_RANGE[1]:
            if name != "avg_frame_rate":
                notes.append(f"avg_frame_rate {info.get('avg_frame_rate')!r} unusable: used {name}")
            return rate.limit_denominator(1001), notes
    notes.append(f"no usable frame rate in the source (avg_frame_rate {info.get('avg_frame_rate')!r}, "
                 f"r_frame_rate {info.get('r_frame_rate')!r}): used {FALLBACK_FPS} frames/s")
    return FALLBACK_FPS, notes


def _even(x: float) -> int:
    return max(2, 2 * int(round(x / 2)))


def output_size(width: int, height: int, sar: Fraction = Fraction(1), rotation: int = 0,
                short_side: int = 256) -> tuple[int, int]:
    """``(width, height)`` in pixels of the output: the displayed frame (stored size times the
    sample aspect ratio, turned by a rotation of +-90 or 270 degrees) scaled so that its shorter
    side is ``short_side``, the other side rounded to the nearest even number."""
    w, h = float(width * sar), float(height)
    if rotation % 180 == 90:
        w, h = h, w
    if w <= h:
        return short_side, _even(h * short_side / w)
    return _even(w * short_side / h), short_side


def encode_command(source: str, stream: int, target: str, size: tuple[int, int], fps: Fraction,
                   settings: Settings) -> list[str]:
    """The ffmpeg command that writes ``target`` (an mp4, whatever its name) from ``source``.

    One thread everywhere (``--jobs`` runs one ffmpeg per core; one x264 thread also makes the
    output the same bytes on every run). ffmpeg turns rotated sources upright itself (autorotate);
    the timestamps are moved to start at 0 before the ``fps`` filter makes the rate constant.
    """
    w, h = size
    chain = f"setpts=PTS-STARTPTS,fps={fps.numerator}/{fps.denominator},scale={w}:{h}:flags=bicubic,setsar=1," \
            "format=yuv420p"
    g = str(settings.gop)
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-threads", "1", "-i", source,
            "-map", f"0:{stream}", "-an", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
            "-filter_threads", "1", "-vf", chain, "-c:v", "libx264", "-preset", settings.preset,
            "-crf", str(settings.crf), *(["-tune", "fastdecode", "-bf", "0"] if settings.fastdecode else []),
            "-pix_fmt", "yuv420p", "-g", g, "-keyint_min", g, "-sc_threshold", "0",
            "-threads", "1", "-movflags", "+faststart", "-f", "mp4", target]


def _probe_output(path: str) -> tuple[dict, list[dict]]:
    doc = _ffprobe_json(["-select_streams", "v:0", "-show_entries",
                         "stream=codec_name,width,height,pix_fmt,time_base:stream_side_data:packet=pts,duration,flags"],
                        path)
    streams = doc.get("streams") or [{}]
    return streams[0], doc.get("packets") or []


def _frame_table(packets: list[dict]) -> list[dict]:
    """The frames in presentation order: ``{"pts", "duration", "key_frame"}`` (stream time base)."""
    frames = [{"pts": int(p["pts"]), "duration": int(p.get("duration", 0)),
               "key_frame": int("K" in p.get("flags", ""))} for p in packets if "pts" in p]
    return sorted(frames, key=lambda f: f["pts"])


def _verify(path: str, size: tuple[int, int], fps: Fraction, settings: Settings, decoder: str) -> list[dict]:
    """Check a freshly written output; returns its frame table. Raises _SourceError."""
    stream, packets = _probe_output(path)
    frames = _frame_table(packets)
    if not frames:
        raise _SourceError("no frames: the source's video stream decoded to nothing")
    problems = []
    got = (stream.get("codec_name"), stream.get("pix_fmt"), stream.get("width"), stream.get("height"))
    if got != ("h264", "yuv420p", *size):
        problems.append(f"stream is {got}, expected ('h264', 'yuv420p', {size[0]}, {size[1]})")
    if stream.get("side_data_list"):
        problems.append(f"stream side data {stream['side_data_list']} (e.g. a rotation) left in the output")
    if len(frames) != len(packets):
        problems.append(f"{len(packets) - len(frames)} packets without a timestamp")
    step = frames[0]["duration"]
    if step <= 0 or any(f["pts"] != i * step or f["duration"] != step for i, f in enumerate(frames)):
        problems.append("timestamps are not i * duration from 0 (frame rate not constant)")
    else:
        tb = _rate(stream.get("time_base"))
        if tb is None or 1 / (step * tb) != fps:
            problems.append(f"frame duration {step} x time base {stream.get('time_base')} is not 1/{fps} s")
    keys = [i for i, f in enumerate(frames) if f["key_frame"]] + [len(frames)]
    if keys[0] != 0 or max(b - a for a, b in zip(keys, keys[1:])) > settings.gop:
        problems.append(f"keyframes at {keys[:-1][:8]}...: more than {settings.gop} frames apart")
    if problems:
        raise _SourceError("verification failed: " + "; ".join(problems))
    from ..data.decoding import VideoDecodeError, open_video

    try:
        video = open_video(path, decoder)
        if video.num_frames != len(frames):
            raise _SourceError(f"verification failed: {decoder} counts {video.num_frames} frames, "
                               f"ffprobe {len(frames)} packets")
        shape = video.get([0, len(frames) - 1]).shape
    except VideoDecodeError as err:
        raise _SourceError(f"verification failed: {decoder}: {err.reason}") from None
    if shape != (2, size[1], size[0], 3):
        raise _SourceError(f"verification failed: {decoder} decodes frames of shape {shape[1:]}")
    return frames


class _Abort(Exception):
    """Stop the whole run (the machine, not the video, is the problem: disk full, no permission)."""


def prepare_video(video: SourceVideo, out_dir: str | Path, settings: Settings, decoder: str = "torchcodec",
                  frame_mappings: bool = True) -> dict:
    """Encode, verify and publish one video; never raises for a problem of the video itself.

    Returns:
        Its manifest record: ``source``, ``output`` (relative to ``out_dir``, or None), ``status``
        (``"ok"`` | ``"failed"``), ``reason`` (None or text), ``frames`` (int, 0 when failed),
        ``fps`` (frames/s, float), ``frame_rate`` (exact, ``"30000/1001"``), ``width``, ``height``
        (pixels), ``seconds`` (output duration = frames / fps), ``bytes_in``, ``bytes_out``,
        ``gop`` (frames), ``output_crc32`` (CRC-32 of the output's bytes; absent when failed),
        ``frame_mappings`` (sidecar path relative to ``out_dir`` or None),
        ``list``, ``notes`` (list of text), ``source_info`` (codec, stored size, sar, rotation,
        pix_fmt, frame rates, frames, seconds as ffprobe reported them), ``settings``,
        ``encode_seconds`` (wall time), ``host``, ``time`` (seconds since the epoch). With
        ``settings.flow`` also ``flow`` (the flow video, relative to ``out_dir``; None when failed),
        ``flow_method``, ``flow_preset``, ``flow_bound`` (px), ``flow_frames`` (``frames - 1``),
        ``flow_bytes``, ``flow_crc32`` (CRC-32 of the flow file's bytes, checked each time the
        loader reads it), ``flow_seconds`` (wall time of decoding, flow and writing) and
        ``flow_max_error``, ``flow_mean_error`` (px: quantization and storage, within the bound),
        ``flow_clipped`` (fraction of values beyond the bound), ``flow_mean_clip_error`` (px:
        mean error with the clipping) (:func:`.flow.flow_of_video`).

    Raises:
        _Abort: the output folder cannot be written (disk full, permission): a problem of the
            machine that would fail every video alike.
    """
    out_dir = Path(out_dir)
    started = time.time()
    bytes_in = os.path.getsize(video.source) if os.path.isfile(video.source) else 0
    record: dict[str, Any] = dict(
        source=video.source, output=None, status="failed", reason=None, frames=0, fps=None, frame_rate=None,
        width=None, height=None, seconds=None, bytes_in=bytes_in, bytes_out=0, gop=settings.gop,
        frame_mappings=None, list=video.list, notes=[], source_info=None, settings=settings.key())
    if settings.flow is not None:
        record.update(flow=None, flow_method=settings.flow, flow_preset=settings.flow_preset,
                      flow_bound=settings.flow_bound, flow_frames=0, flow_bytes=0, flow_seconds=None)
    target = out_dir / video.output
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _Abort(f"cannot create {target.parent}: {err.strerror or err}") from None
    from ..data.flow import file_crc32, flow_path

    flow_target = out_dir / flow_path(video.output)
    for pattern in (f".{target.name}.part-", f".{target.name}{FRAMES_SUFFIX}.part-",
                    f".{flow_target.name}.part-"):  # left by a killed run
        for stale in target.parent.glob(glob.escape(pattern) + "*"):
            stale.unlink(missing_ok=True)
    part = target.with_name(f".{target.name}.part-{os.getpid()}")
    flow_part = flow_target.with_name(f".{flow_target.name}.part-{os.getpid()}")
    try:
        info = probe_source(video.source)
        record["source_info"] = {k: (str(v) if isinstance(v, Fraction) else v) for k, v in info.items()}
        fps, notes = choose_fps(info, settings.fps)
        size = output_size(info["width"], info["height"], info["sar"], info["rotation"], settings.short_side)
        record["notes"] = notes
        cmd = encode_command(video.source, info["index"], str(part), size, fps, settings)
        try:
            done = run(cmd, timeout=ENCODE_TIMEOUT_S, check=False)
        except ChildTimeout:
            raise _SourceError(f"ffmpeg took more than {ENCODE_TIMEOUT_S} s") from None
        except ChildError as err:  # not started: no video can be encoded
            raise _Abort(str(err)) from None
        if "No space left on device" in done.stderr or "Permission denied" in done.stderr:
            raise _Abort(f"ffmpeg cannot write {part}: {_last_line(done.stderr, str(part))}")
        if done.returncode != 0:
            raise _SourceError(f"ffmpeg failed (exit {done.returncode}): {_last_line(done.stderr, video.source)}")
        frames = _verify(str(part), size, fps, settings, decoder)
        if info.get("seconds") and len(frames) / fps < 0.5 * info["seconds"]:
            record["notes"].append(f"only {float(len(frames) / fps):.2f} s of the source's {info['seconds']:.2f} s "
                                   "could be decoded (truncated or damaged source?)")
        if settings.flow is not None:
            record.update(_flow(part, flow_part, fps, settings, decoder))
        try:
            if frame_mappings:
                sidecar = target.with_name(target.name + FRAMES_SUFFIX)
                write_text(sidecar, json.dumps({"frames": frames}, separators=(",", ":")))
                record["frame_mappings"] = sidecar.relative_to(out_dir).as_posix()
            if settings.flow is not None:
                crc = file_crc32(flow_part)  # verified on every read (tsmtrain.data.loader.FlowFrames)
                commit(flow_part, flow_target)  # ffmpeg wrote it: fsync, rename, fsync of the folder
                record.update(flow=flow_target.relative_to(out_dir).as_posix(),
                              flow_bytes=flow_target.stat().st_size, flow_crc32=crc)
            record["output_crc32"] = file_crc32(part)  # checked where the loader reads the whole file
            commit(part, target)
        except OSError as err:
            raise _Abort(f"cannot write {target}: {err.strerror or err}") from None
        except FileWriteError as err:  # names the file and why
            raise _Abort(str(err)) from None
        record.update(output=video.output, status="ok", frames=len(frames), fps=float(fps),
                      frame_rate=f"{fps.numerator}/{fps.denominator}", width=size[0], height=size[1],
                      seconds=round(float(len(frames) / fps), 6), bytes_out=target.stat().st_size)
    except _SourceError as err:
        record["reason"] = str(err)
    finally:
        part.unlink(missing_ok=True)
        flow_part.unlink(missing_ok=True)
    record.update(encode_seconds=round(time.time() - started, 3), host=socket.gethostname(), time=time.time())
    return record


def _flow(part: Path, flow_part: Path, fps: Fraction, settings: Settings, decoder: str) -> dict:
    """Compute, write and verify the flow of the verified output ``part`` into ``flow_part``;
    returns the record's flow fields. Raises _SourceError (the video's problem) or _Abort."""
    from ..data.flow import FlowError
    from .flow_files import flow_of_video

    try:
        done = flow_of_video(part, flow_part, f"{fps.numerator}/{fps.denominator}", settings.flow,
                             settings.flow_preset, settings.flow_bound, decoder)
    except FlowError as err:
        if "No space left on device" in str(err) or "Permission denied" in str(err):
            raise _Abort(str(err)) from None
        raise _SourceError(f"optical flow: {err}") from None
    except Exception as err:  # OpenCV raises cv2.error for what it cannot compute
        raise _SourceError(f"optical flow: {type(err).__name__}: {str(err).strip()[:300]}") from None
    return dict(flow_frames=done["frames"], flow_seconds=done["seconds"], flow_max_error=done["max_error"],
                flow_mean_error=done["mean_error"], flow_clipped=done["clipped"],
                flow_mean_clip_error=done["mean_clip_error"])


# --------------------------------------------------------------------------- journals and manifest


def already_prepared(record: dict | None, video: SourceVideo, out_dir: Path, settings: Settings, retry_failed: bool,
             frame_mappings: bool = False) -> bool:
    if record is None or record.get("settings") != settings.key():
        return False
    size = os.path.getsize(video.source) if os.path.isfile(video.source) else 0
    if record.get("bytes_in") != size:
        return False  # the source changed (or appeared) since
    if record["status"] != "ok":
        return not retry_failed
    target = out_dir / video.output
    sidecar = record.get("frame_mappings")
    if frame_mappings and sidecar is None:
        return False
    flow = record.get("flow")
    if settings.flow is not None and (flow is None or not (out_dir / flow).is_file()
                                      or (out_dir / flow).stat().st_size != record.get("flow_bytes")):
        return False
    return (record.get("output") == video.output and target.is_file() and target.stat().st_size == record.get("bytes_out")
            and (sidecar is None or (out_dir / sidecar).is_file()))


# --------------------------------------------------------------------------- a task


@dataclass
class TaskSummary:
    """What :func:`run_task` did.

    Attributes:
        task: ``(I, N)``.
        videos: videos in the task.
        done_before: videos already done (skipped).
        ok, failed: videos prepared now, and those that failed now.
        seconds: wall time of the run (s).
        source_seconds: duration of the sources prepared now (s of video).
        failures: ``(source, reason)`` of the failures now.
        notes: ``(source, note)`` of the videos prepared now with a note (fallback frame rate...).
        flow_seconds: with flow: wall time (s) of the flow of the videos prepared now, summed.
    """

    task: tuple[int, int]
    videos: int
    done_before: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    source_seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    flow_seconds: float = 0.0

    @property
    def videos_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0


class _Progress:
    """A rich progress bar (videos/s, ETA) on a terminal, else a log line every ``every`` seconds."""

    def __init__(self, total: int, label: str, stream=None, every: float = 30.0):
        self.total, self.label, self.every = total, label, every
        self.stream = stream or sys.stderr
        self.count = self.failed = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if total and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task):
                    return Text(f"{task.speed or 0:.2f} videos/s")

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(file=self.stream), transient=False)
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def advance(self, failed: bool) -> None:
        self.count += 1
        self.failed += failed
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.label} ({self.failed} failed)")
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.count == self.total:
            self.last = now
            rate = self.count / max(now - self.started, 1e-9)
            eta = (self.total - self.count) / rate if rate else float("inf")
            print(f"{self.label}: {self.count}/{self.total} videos ({self.failed} failed), {rate:.2f} videos/s, "
                  f"ETA {eta / 60:.1f} min", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_task(plan: Worklist, settings: Settings, task: tuple[int, int] = (0, 1), jobs: int | None = None,
              decoder: str = "torchcodec", frame_mappings: bool = True, retry_failed: bool = False,
              progress: bool = True, on_record: Callable[[dict], None] | None = None) -> TaskSummary:
    """Prepare the videos of one task that are not done yet, ``jobs`` at a time.

    Records go to ``out_dir/.shards/manifest-I-of-N.jsonl`` as each video finishes. Records in
    any journal of the folder (another N, an earlier run) count (:func:`prepare` explains "done").

    Args:
        plan: from :func:`make_worklist`.
        settings: the encoding.
        task: ``(I, N)``: this run takes the videos with ``index % N == I``.
        jobs: ffmpeg processes at once (default :func:`default_jobs`).
        decoder: the decoder that verifies each output (``"torchcodec"`` or ``"decord"``).
        frame_mappings: write the ``.frames.json`` frame tables.
        retry_failed: try videos again whose latest record is ``failed``.
        progress: show a progress bar (terminal) or log lines (otherwise) on stderr.
        on_record: called with each new record (in the calling thread).

    Raises:
        PrepareError: the output folder cannot be written (disk full, permission: the run stops,
            the videos done so far stay done).
        ManifestError: a journal has a malformed line.
    """
    out_dir = plan.out_dir
    jobs = jobs or default_jobs()
    mine = task_videos(plan.videos, task)
    try:
        journal = Journal(journal_path(out_dir, task))
    except OSError as err:
        raise PrepareError(f"--out {out_dir}: cannot write the journal: {err.strerror or err}") from None
    latest = latest_records(out_dir)
    todo = [v for v in mine if not already_prepared(latest.get(v.source), v, out_dir, settings, retry_failed, frame_mappings)]
    summary = TaskSummary(task, len(mine), done_before=len(mine) - len(todo))
    started = time.monotonic()
    label = "prepare" if task == (0, 1) else f"prepare task {task[0]}/{task[1]}"
    bar = _Progress(len(todo), label) if progress else None
    pending: set[Future] = set()
    queue = iter(todo)
    try:
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="prepare") as pool:
            try:
                while True:
                    while len(pending) < 2 * jobs:
                        video = next(queue, None)
                        if video is None:
                            break
                        pending.add(pool.submit(prepare_video, video, out_dir, settings, decoder, frame_mappings))
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            record = future.result()
                        except _Abort as err:
                            raise PrepareError(str(err)) from None
                        summary.ok += record["status"] == "ok"
                        summary.failed += record["status"] != "ok"
                        if record["status"] != "ok":
                            summary.failures.append((record["source"], record["reason"]))
                        else:
                            summary.source_seconds += (record["source_info"] or {}).get("seconds") or record["seconds"]
                            summary.flow_seconds += record.get("flow_seconds") or 0.0
                        summary.notes.extend((record["source"], n) for n in record["notes"])
                        journal.append(record)
                        if on_record is not None:
                            on_record(record)
                        if bar is not None:
                            bar.advance(record["status"] != "ok")
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        journal.close()
        if bar is not None:
            bar.close()
    summary.seconds = time.monotonic() - started
    return summary


def summary_lines(summary: TaskSummary, one_of_several: bool, failures: int = 20) -> list[str]:
    """What ``tsmtrain prepare`` prints (on stderr) after :func:`run_task`: the counts, the rate
    when videos were prepared now, and the first ``failures`` failures with their reasons.

    Args:
        summary: from :func:`run_task`.
        one_of_several: the run was one task of several (``--shard I/N``): the line names the task.
        failures: failures listed by name; the others are counted (their reasons are in the journal).
    """
    s = summary
    label = f"task {s.task[0]}/{s.task[1]}: " if one_of_several else ""
    rate = (f" in {s.seconds:.1f} s: {s.videos_per_s:.2f} videos/s, "
            f"{s.source_seconds / s.seconds if s.seconds else 0:.1f} s of video per s") if s.ok + s.failed else ""
    lines = [f"{label}{s.videos} videos: {s.ok} prepared, {s.failed} failed, {s.done_before} already done{rate}"]
    if s.flow_seconds and s.ok:
        lines.append(f"optical flow: {s.flow_seconds / s.ok:.2f} s per video ({s.flow_seconds:.1f} s of work)")
    lines += [f"failed: {source}: {reason}" for source, reason in s.failures[:failures]]
    if len(s.failures) > failures:
        lines.append(f"failed: ... {len(s.failures) - failures} more (reasons in the manifest)")
    return lines


# --------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    """What :func:`merge` wrote.

    Attributes:
        manifest: the manifest file.
        lists: ``(path, videos listed, lines left out)`` per new list file.
        ok, failed: videos in the manifest by status.
        tasks: N, the task count merged.
    """

    manifest: Path
    lists: list[tuple[Path, int, int]]
    ok: int
    failed: int
    tasks: int


def merge(plan: Worklist, settings: Settings, tasks: int | None = None) -> MergeResult:
    """Write the manifest and the new list files from the task journals.

    Args:
        plan: the same list files as the tasks were given.
        settings: the same settings as the tasks were given.
        tasks: N; ``None``: the N of the journals in the folder (there must be one N).

    Raises:
        PrepareError: no journals; journals of several N and no ``tasks``; a task's journal
            missing (all named); videos without a record made with these settings (how many, the
            first few, and their tasks).
        ManifestError: a journal has a malformed line.
    """
    out_dir = plan.out_dir
    found = journal_files(out_dir)
    if tasks is None:
        counts = sorted({n for _, n in found})
        if not counts:
            raise PrepareError(f"{out_dir / JOURNALS_DIR}: no task journals (manifest-I-of-N.jsonl): "
                               "run the tasks (--shard I/N) first")
        if len(counts) > 1:
            raise PrepareError(f"{out_dir / JOURNALS_DIR}: journals of {', '.join(map(str, counts))} tasks: "
                               "say which with --tasks N")
        tasks = counts[0]
    missing = [i for i in range(tasks) if (i, tasks) not in found]
    if missing:
        names = ", ".join(f"{i}/{tasks}" for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise PrepareError(f"{len(missing)} of {tasks} tasks have no journal in {out_dir / JOURNALS_DIR}: "
                           f"{names}; run them (--shard I/{tasks}) before --merge")
    latest = latest_records(out_dir)
    undone = [v for v in plan.videos if not already_prepared(latest.get(v.source), v, out_dir, settings, False)]
    if undone:
        shown = "; ".join(f"{v.source} (task {v.index % tasks}/{tasks})" for v in undone[:5])
        by_task = sorted({v.index % tasks for v in undone})
        raise PrepareError([f"{len(undone)} of {len(plan.videos)} videos are not prepared with these settings "
                            f"({', '.join(f'{k}={v}' for k, v in settings.key().items())}): {shown}"
                            + (" ..." if len(undone) > 5 else ""),
                            f"run task(s) {', '.join(map(str, by_task[:20]))} of {tasks} again (same options) "
                            "before --merge"])
    records = []
    for video in plan.videos:
        record = dict(latest[video.source])
        record["list"] = video.list
        records.append(record)
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    lists = []
    for name, lines in plan.lists:
        kept = [f"{plan.videos[i].output} {label}\n" for i, label in lines if records[i]["status"] == "ok"]
        path = out_dir / name
        write_text(path, "".join(kept))
        lists.append((path, len(kept), len(lines) - len(kept)))
    write_text(out_dir / MANIFEST, text)
    ok = sum(r["status"] == "ok" for r in records)
    return MergeResult(out_dir / MANIFEST, lists, ok, len(records) - ok, tasks)


def merge_lines(result: MergeResult) -> list[str]:
    """What ``tsmtrain prepare`` prints after :func:`merge`: each list file written with its
    videos (and those left out because they failed), then the manifest's counts."""
    lines = [f"wrote {path}: {kept} videos" + (f" ({left} left out: failed)" if left else "")
             for path, kept, left in result.lists]
    return lines + [f"wrote {result.manifest}: {result.ok} ok, {result.failed} failed"]


def prepare(plan: Worklist, settings: Settings, jobs: int | None = None, decoder: str = "torchcodec",
            frame_mappings: bool = True, retry_failed: bool = False,
            progress: bool = True) -> tuple[TaskSummary, MergeResult]:
    """Prepare every video of ``plan`` on this machine and write the list files and manifest
    (:func:`run_task` with task 0/1, then :func:`merge`).

    A video counts as done, and is skipped, when the newest record for its source in any journal
    of the output folder is ``ok``, was made with the same ``settings`` from a source of the same
    size in bytes, and its output (and frame table) exists with the recorded size; a ``failed``
    record counts as done unless ``retry_failed``.

    Raises:
        PrepareError, ManifestError: as :func:`run_task` and :func:`merge`.
    """
    summary = run_task(plan, settings, (0, 1), jobs, decoder, frame_mappings, retry_failed, progress)
    return summary, merge(plan, settings, 1)


