"""Optical flow between consecutive frames, quantized and stored as a lossless video beside each
prepared video (``tsmtrain prepare --flow dis``), read back by frame index like RGB.

**Computing** (:func:`compute_flow`): OpenCV (``pip install opencv-contrib-python-headless``, the
``flow`` extra; imported only when flow is computed) on grayscale frames (BT.601 luma, as
OpenCV's methods take them): ``tvl1`` (``cv2.optflow.DualTVL1OpticalFlow``, the two-stream
literature's default, about 600 ms per 256x456 pair on one core), ``dis`` (Dense Inverse Search,
presets ``ultrafast``/``fast``/``medium``: 2.4 to 11 ms) and ``farneback`` (about 25 ms).

**Quantizing** (:func:`quantize_flow`), as TSN, mmaction2 and denseflow do: x and y (pixels) are
clipped to ``[-bound, bound]`` (default 20 px) and mapped linearly to 0..255,
``q = round((f + bound) * 255 / (2 * bound))``; :func:`dequantize_flow` maps back. The error of a
value inside the bound is at most half a step, ``bound / 255`` px (0.078 px for 20 px,
:func:`quantization_error`); values beyond the bound are clipped to it.

**Storing** (:func:`write_flow`, :func:`read_flow`): one grayscale video per source video,
``NAME.flow.mkv``: frame ``i`` is the flow from frame ``i`` to ``i + 1`` (so ``frames - 1`` of
them), the x plane on top of the y plane (``2H x W``, 8-bit gray), FFV1 (lossless) in Matroska,
every frame a keyframe (``-g 1``: reading frame ``i`` decodes frame ``i`` only), written
``+bitexact`` (the same flow gives the same bytes on every run). torchcodec
decodes a gray video into RGB with ``R = G = B`` exactly (full range), so :func:`read_flow` takes
one channel and splits it into x and y: no colour conversion can mix x and y. Stored this way the
only error is the quantization's.

Measured (this module's choice against the others, on 59 DIS-medium flow frames of
``mmaction2_demo.mp4`` at 340x256, decoded with torchcodec; error in quantization steps,
1 step = 0.157 px at bound 20):

=====================================  ==============  =========================  ================
storage (x over y, one gray plane)     bytes/frame     max / mean error (steps)   decode ms/frame
=====================================  ==============  =========================  ================
FFV1 ``-g 1``, .mkv (chosen)           11,432          0 / 0 (lossless)           8.9
libx264 ``-qp 0`` (yuvj420p), .mkv     12,856          0 / 0 (lossless)           10.6
libx264 ``-crf 8``                     7,341           6 / 0.077                  8.4
libx264 ``-crf 15``                    3,665           12 / 0.147                 8.5
=====================================  ==============  =========================  ================

(this libx264 has no gray: ffmpeg gives it yuvj420p with flat chroma.) FFV1 is the smallest
lossless form and every frame stands alone; near-lossless x264 saves a third at up to 6 steps
(0.9 px) of error where the flow has edges.

On the 15 shared real clips prepared at short side 256 (``tsmtrain prepare --flow dis``, 3,692
flow frames): **14,240 bytes per flow frame** against 2,564 per RGB frame (x264 CRF 23), i.e.
5.6x the RGB; error read back against the float flow **at most 0.078 px, mean 0.050 px** inside
the bound; 1.2% of the values were beyond 20 px and clipped (mean error 0.25 px with them). Table
per clip: docs/data.md, "Optical flow".
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METHODS", "DIS_PRESETS", "DEFAULT_BOUND", "FLOW_SUFFIX", "compute_flow", "quantize_flow",
           "dequantize_flow", "quantization_error", "write_flow", "read_flow", "flow_frames", "flow_of_video",
           "flow_of_dataset", "read_flow_marker", "FLOW_MARKER",
           "flow_path", "check_flow_settings", "file_crc32", "FlowError"]

METHODS = ("tvl1", "dis", "farneback")
"""The optical flow methods :func:`compute_flow` knows."""

DIS_PRESETS = ("ultrafast", "fast", "medium")
"""The presets of DIS (``cv2.DISOPTICAL_FLOW_PRESET_*``)."""

DEFAULT_BOUND = 20.0
"""Pixels: flow is clipped to +-this before quantization (TSN, mmaction2, denseflow)."""

FLOW_SUFFIX = ".flow.mkv"
"""Replaces a prepared video's ``.mp4`` in the name of its flow video."""

CHUNK = 32
"""Frames decoded at a time by :func:`flow_of_video` (memory stays bounded on long videos)."""


class FlowError(Exception):
    """The flow of a video cannot be computed, written or read back (the message says why)."""


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise FlowError(f"optical flow needs OpenCV: pip install opencv-contrib-python-headless ({err})") from None
    return cv2


def _engine(method: str, preset: str):
    """A function ``(gray0, gray1) -> flow (H, W, 2) float32`` for ``method``."""
    cv2 = _cv2()
    if method == "dis":
        if preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset {preset!r}: choose one of {', '.join(DIS_PRESETS)}")
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}"))
        return lambda a, b: dis.calc(a, b, None)
    if method == "farneback":
        # OpenCV's documented example parameters (pyramid 0.5, 3 levels, window 15, 3 iterations)
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise FlowError("tvl1 needs OpenCV's contrib modules: pip install opencv-contrib-python-headless")
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda a, b: tvl1.calc(a, b, None)
    raise ValueError(f"flow method {method!r}: choose one of {', '.join(METHODS)}")


def _gray(frames: np.ndarray) -> list[np.ndarray]:
    cv2 = _cv2()
    return [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]


def compute_flow(frames: np.ndarray, method: str = "dis", preset: str = "medium") -> np.ndarray:
    """Optical flow between consecutive frames.

    Args:
        frames: uint8 ``(T, H, W, 3)`` RGB, T >= 1.
        method: ``"tvl1"``, ``"dis"`` or ``"farneback"``.
        preset: DIS only: ``"ultrafast"``, ``"fast"`` or ``"medium"``.

    Returns:
        float32 ``(T - 1, H, W, 2)``: ``[..., 0]`` x (right positive), ``[..., 1]`` y (down
        positive), pixels, from frame ``t`` to ``t + 1``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), not {frames.dtype} {frames.shape}")
    calc = _engine(method, preset)
    gray = _gray(frames)
    out = np.empty((max(len(gray) - 1, 0), *frames.shape[1:3], 2), np.float32)
    for t in range(len(out)):
        out[t] = calc(gray[t], gray[t + 1])
    return out


def quantization_error(bound: float = DEFAULT_BOUND) -> float:
    """Largest error (pixels) of :func:`quantize_flow` then :func:`dequantize_flow` for a value
    inside ``[-bound, bound]``: half a step of ``2 * bound / 255``."""
    return bound / 255.0


def quantize_flow(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Flow (pixels) -> uint8: clipped to ``[-bound, bound]``, ``-bound`` -> 0, ``+bound`` -> 255."""
    if bound <= 0:
        raise ValueError(f"bound {bound}: must be > 0 pixels")
    f = np.clip(np.asarray(flow, np.float32), -bound, bound)
    return np.rint((f + bound) * (255.0 / (2 * bound))).astype(np.uint8)


def dequantize_flow(q_flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """uint8 from :func:`quantize_flow` -> float32 pixels (within :func:`quantization_error`)."""
    return np.asarray(q_flow, np.float32) * np.float32(2 * bound / 255.0) - np.float32(bound)


def _planes(q: np.ndarray) -> np.ndarray:
    """``(T, H, W, 2)`` -> ``(T, 2H, W)``: x on top of y."""
    return np.concatenate([q[..., 0], q[..., 1]], axis=1)


class _Writer:
    """An ffmpeg that encodes gray ``2H x W`` frames from its stdin into FFV1 in Matroska.

    Started and waited for by the same thread (see :func:`tsmtrain.data.prepare._die_with_parent`:
    it dies with this process, even by SIGKILL)."""

    def __init__(self, path: str | Path, height: int, width: int, fps: Any):
        from .prepare import _die_with_parent

        self.path = str(path)
        rate = str(fps)
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
               "-pix_fmt", "gray", "-s", f"{width}x{2 * height}", "-r", rate, "-i", "-", "-map_metadata", "-1",
               "-fflags", "+bitexact", "-flags:v", "+bitexact", "-c:v", "ffv1", "-level", "3", "-g", "1",
               "-slicecrc", "1", "-threads", "1", "-pix_fmt", "gray", "-color_range", "pc", "-f", "matroska", self.path]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent())
        self.shape = (height, width)
        self.frames = 0

    def write(self, q_flow: np.ndarray) -> None:
        if q_flow.shape[1:] != (*self.shape, 2) or q_flow.dtype != np.uint8:
            raise ValueError(f"flow must be uint8 (T, {self.shape[0]}, {self.shape[1]}, 2), "
                             f"not {q_flow.dtype} {q_flow.shape}")
        try:
            self.proc.stdin.write(np.ascontiguousarray(_planes(q_flow)).tobytes())
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


def _open(path: str | Path, decoder: str):
    from .decoding import VideoDecodeError, open_video

    try:
        return open_video(path, decoder)
    except VideoDecodeError as err:
        raise FlowError(f"cannot read flow {path}: {err.reason}") from None


def flow_frames(path: str | Path, decoder: str = "torchcodec") -> int:
    """Number of flow frames stored in ``path`` (the video's frames - 1)."""
    return _open(path, decoder).num_frames


def read_flow(path: str | Path, indices: Sequence[int], decoder: str = "torchcodec") -> np.ndarray:
    """Flow frames ``indices`` (``i``: from video frame ``i`` to ``i + 1``) of a file written by
    :func:`write_flow`, as uint8 ``(len(indices), H, W, 2)`` (:func:`dequantize_flow` for pixels).

    Raises:
        FlowError: the file cannot be decoded, an index is out of range, or it is not flow.
    """
    from .decoding import VideoDecodeError

    video = _open(path, decoder)
    try:
        planes = video.get(indices)[..., 0]
    except VideoDecodeError as err:
        raise FlowError(f"cannot read flow {path}: {err.reason}") from None
    if planes.shape[1] % 2:
        raise FlowError(f"{path}: frames of odd height {planes.shape[1]}: not x over y flow")
    h = planes.shape[1] // 2
    return np.stack([planes[:, :h], planes[:, h:]], axis=-1)


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
    video = _open(video_path, decoder)
    n = video.num_frames
    if n < 2:
        raise FlowError(f"needs at least 2 frames; the video has {n}")
    _cv2().setNumThreads(1)  # prepare runs one video per core (--jobs)
    calc = _engine(method, preset)
    writer = None
    worst, total, clipped, total_clip = 0.0, 0.0, 0, 0.0
    try:
        previous = None
        for start in range(0, n, CHUNK):
            gray = _gray(video.get(range(start, min(start + CHUNK, n))))
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
    got = _open(flow_path, decoder)
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


def file_crc32(path: str | Path) -> int:
    """CRC-32 (``zlib.crc32``, as the tar shards' samples carry) of a file's bytes, read in 1 MiB
    blocks: what ``tsmtrain prepare --flow`` records as a flow file's ``flow_crc32``.

    Raises:
        OSError: the file cannot be read.
    """
    import zlib

    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def flow_path(output: str) -> str:
    """The flow file's path (relative, POSIX) for a prepared output ``x/name.mp4``: ``x/name.flow.mkv``."""
    return (output[:-4] if output.endswith(".mp4") else output) + FLOW_SUFFIX


def check_flow_settings(method: str | None, preset: str, bound: float) -> list[str]:
    """Problems with ``--flow``, ``--flow-preset``, ``--flow-bound``, one line each."""
    if method is None:
        return []
    out = []
    if method not in METHODS:
        out.append(f"--flow {method!r}: choose one of {', '.join(METHODS)}")
    if method == "dis" and preset not in DIS_PRESETS:
        out.append(f"--flow-preset {preset!r}: DIS presets are {', '.join(DIS_PRESETS)}")
    if not bound > 0:
        out.append(f"--flow-bound {bound}: must be > 0 pixels")
    if not out:
        try:
            import cv2  # noqa: F401
        except ImportError as err:
            out.append(f"--flow: cannot import cv2 ({err}): pip install opencv-contrib-python-headless "
                       "(or pip install 'tsmtrain[flow]')")
    return out



FLOW_MARKER = ".flow.json"
"""The file, in a rendered dataset's root, that says its videos' flow is complete and how it was
computed (:func:`flow_of_dataset`): ``{"method", "preset", "bound", "videos"}``."""


def read_flow_marker(root: str | Path) -> dict | None:
    """The settings in ``root``'s :data:`FLOW_MARKER`, or None when there is none (or ``root`` is
    not a folder)."""
    import json

    marker = Path(root) / FLOW_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


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
        part = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            flow_of_video(video, part, 25, method, preset, bound)
            os.replace(part, target)
        except FlowError as err:
            raise FlowError(f"{video}: {err}") from None
        finally:
            part.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(one, todo))
    marker.write_text(json.dumps(settings))
    return len(todo)
