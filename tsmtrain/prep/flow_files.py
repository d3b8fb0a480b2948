"""Storing optical flow for ``tsmtrain prepare --flow`` and the rendered datasets: each video's
flow, computed and quantized by :mod:`tsmtrain.data.flow`, written beside it as a lossless
FFV1 video (``NAME.flow.mkv``, two 8-bit planes), the folder's settings in a marker file."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..child import PIPE, start
from ..data.flow import (CHUNK, DEFAULT_BOUND, FLOW_MARKER, FlowError, dequantize_flow, flow_engine, flow_path,
                         gray_frames, open_for_flow, opencv, quantize_flow, read_flow, read_flow_marker, stack_planes)
from ..io import write_atomic, write_text

__all__ = ["write_flow", "flow_of_video", "flow_of_dataset"]


class _Writer:
    """An ffmpeg that encodes gray ``2H x W`` frames from its stdin into FFV1 in Matroska.

    Started, fed and waited for by the same thread (see :mod:`tsmtrain.child`: it dies with
    that thread, so with this process, even by SIGKILL)."""

    def __init__(self, path: str | Path, height: int, width: int, fps: Any):
        self.path = str(path)
        rate = str(fps)
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
               "-pix_fmt", "gray", "-s", f"{width}x{2 * height}", "-r", rate, "-i", "-", "-map_metadata", "-1",
               "-fflags", "+bitexact", "-flags:v", "+bitexact", "-c:v", "ffv1", "-level", "3", "-g", "1",
               "-slicecrc", "1", "-threads", "1", "-pix_fmt", "gray", "-color_range", "pc", "-f", "matroska", self.path]
        self.proc = start(cmd, stdin=PIPE, stderr=PIPE, what=f"writing {self.path}")  # ChildError: not started
        self.shape = (height, width)
        self.frames = 0

    def write(self, q_flow: np.ndarray) -> None:
        if q_flow.shape[1:] != (*self.shape, 2) or q_flow.dtype != np.uint8:
            raise ValueError(f"flow must be uint8 (T, {self.shape[0]}, {self.shape[1]}, 2), "
                             f"not {q_flow.dtype} {q_flow.shape}")
        try:
            self.proc.stdin.write(np.ascontiguousarray(stack_planes(q_flow)).tobytes())
        except BrokenPipeError:
            self.close()
        self.frames += len(q_flow)

    def close(self) -> None:
        """Finish the file; raises FlowError when ffmpeg failed."""
        try:
            if not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        err = self.proc.stderr.read().decode(errors="replace")
        if self.proc.wait() != 0:
            raise FlowError(f"ffmpeg could not write {self.path} (exit {self.proc.returncode}): "
                            f"{err.strip().splitlines()[-1] if err.strip() else 'no message'}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def write_flow(path: str | Path, q_flow: np.ndarray, fps: Any = 25) -> None:
    """Store quantized flow ``(T, H, W, 2)`` uint8 (T >= 1) as a lossless gray FFV1 video (x over y)
    at ``fps`` frames/s (number or text such as ``"30000/1001"``).

    Raises:
        FlowError: ffmpeg failed (disk full, ...). ValueError: not uint8 (T, H, W, 2), T >= 1.
        tsmtrain.child.ChildError: ffmpeg cannot be started (not installed).
    """
    q_flow = np.asarray(q_flow)
    if q_flow.ndim != 4 or q_flow.shape[-1] != 2 or not len(q_flow):
        raise ValueError(f"flow must be uint8 (T >= 1, H, W, 2), not {q_flow.dtype} {q_flow.shape}")
    writer = _Writer(path, q_flow.shape[1], q_flow.shape[2], fps)
    try:
        writer.write(q_flow)
        writer.close()
    finally:
        writer.kill()


def flow_of_video(video_path: str | Path, flow_path: str | Path, fps: Any, method: str = "dis",
                  preset: str = "medium", bound: float = DEFAULT_BOUND, decoder: str = "torchcodec") -> dict:
    """Compute the flow of every pair of consecutive frames of ``video_path`` (decoded with
    ``decoder``, :data:`CHUNK` frames at a time), quantize it and write it to ``flow_path``, then
    read it back: it must hold ``frames - 1`` frames of the video's size, the first and the last
    decodable.

    Returns:
        ``frames`` (flow frames), ``seconds`` (wall time), ``max_error``, ``mean_error`` (pixels:
        what is read back against the float flow clipped to the bound: quantization and storage;
        the max is at most :func:`quantization_error`), ``clipped`` (fraction of the x and y
        values beyond the bound) and ``mean_clip_error`` (pixels: mean error against the float
        flow itself, clipping included).

    Raises:
        FlowError: fewer than 2 frames, the flow cannot be written or does not read back.
    """
    started = time.time()
    video = open_for_flow(video_path, decoder)
    n = video.num_frames
    if n < 2:
        raise FlowError(f"needs at least 2 frames; the video has {n}")
    opencv().setNumThreads(1)  # prepare runs one video per core (--jobs)
    calc = flow_engine(method, preset)
    writer = None
    worst, total, clipped, total_clip = 0.0, 0.0, 0, 0.0
    try:
        previous = None
        for start in range(0, n, CHUNK):
            gray = gray_frames(video.get(range(start, min(start + CHUNK, n))))
            if previous is not None:
                gray.insert(0, previous)
            flow = np.stack([calc(a, b) for a, b in zip(gray, gray[1:])])
            previous = gray[-1]
            q = quantize_flow(flow, bound)
            back = dequantize_flow(q, bound)
            err = np.abs(back - np.clip(flow, -bound, bound))
            worst, total = max(worst, float(err.max())), total + float(err.sum())
            clipped += int(np.count_nonzero(np.abs(flow) > bound))
            total_clip += float(np.abs(back - flow).sum())
            if writer is None:
                writer = _Writer(flow_path, flow.shape[1], flow.shape[2], fps)
            writer.write(q)
        writer.close()
    finally:
        if writer is not None:
            writer.kill()
    got = open_for_flow(flow_path, decoder)
    if got.num_frames != n - 1:
        raise FlowError(f"flow verification failed: {got.num_frames} frames read back, expected {n - 1}")
    back = read_flow(flow_path, [0, n - 2], decoder)
    if back.shape[1:3] != q.shape[1:3]:
        raise FlowError(f"flow verification failed: frames of {back.shape[1:3]} read back, expected {q.shape[1:3]}")
    if not np.array_equal(back[1], q[-1]):
        raise FlowError("flow verification failed: the last frame read back differs from what was written")
    values = (n - 1) * q.shape[1] * q.shape[2] * 2
    return dict(frames=n - 1, seconds=round(time.time() - started, 3), max_error=round(worst, 4),
                mean_error=round(total / values, 4), clipped=round(clipped / values, 6),
                mean_clip_error=round(total_clip / values, 4))


def flow_of_dataset(root: str | Path, videos: Sequence[str], method: str = "dis", preset: str = "medium",
                    bound: float = DEFAULT_BOUND, jobs: int | None = None) -> int:
    """The flow of every video of a dataset that tsmtrain rendered itself (``data.generate``, for
    ``data.modality: flow``), each stored beside its video (:func:`flow_path`), then
    :data:`FLOW_MARKER` written last with the settings. Nothing is done when the marker already
    holds these settings and as many videos; otherwise all is computed again (a flow file is
    written under a temporary name and renamed, so none is ever half written).

    Args:
        root: the dataset's folder.
        videos: the video files (paths as the lists give them).
        method, preset, bound: as :func:`flow_of_video`.
        jobs: videos at a time (threads: OpenCV, the decoder and ffmpeg release the GIL); None:
            the CPU count.

    Returns:
        The number of videos whose flow was computed now (0 when it was all there).

    Raises:
        FlowError: a video's flow could not be computed (the message names it).
        FileWriteError: a flow file or the marker cannot be written (names it).
    """
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    settings = {"method": method, "preset": preset, "bound": float(bound), "videos": len(set(videos))}
    marker = Path(root) / FLOW_MARKER
    if read_flow_marker(root) == settings:
        return 0
    marker.unlink(missing_ok=True)
    todo = sorted(set(videos))

    def one(video: str) -> None:
        target = Path(flow_path(video))
        try:
            with write_atomic(target) as part:  # ffmpeg writes the temporary file; a failure removes it
                flow_of_video(video, part, 25, method, preset, bound)
        except FlowError as err:
            raise FlowError(f"{video}: {err}") from None

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(one, todo))
    write_text(marker, json.dumps(settings))
    return len(todo)
