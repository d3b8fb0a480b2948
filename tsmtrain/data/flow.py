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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ..errors import UserError

__all__ = ["METHODS", "DIS_PRESETS", "DEFAULT_BOUND", "FLOW_SUFFIX", "compute_flow", "quantize_flow",
           "dequantize_flow", "quantization_error", "read_flow", "flow_frames", "read_flow_marker", "FLOW_MARKER",
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


class FlowError(UserError):
    """The flow of a video cannot be computed, written or read back (the message says why)."""


def opencv():
    try:
        import cv2
    except ImportError as err:
        raise FlowError(f"optical flow needs OpenCV: pip install opencv-contrib-python-headless ({err})") from None
    return cv2


def flow_engine(method: str, preset: str):
    """A function ``(gray0, gray1) -> flow (H, W, 2) float32`` for ``method``."""
    cv2 = opencv()
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


def gray_frames(frames: np.ndarray) -> list[np.ndarray]:
    cv2 = opencv()
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
    calc = flow_engine(method, preset)
    gray = gray_frames(frames)
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


def stack_planes(q: np.ndarray) -> np.ndarray:
    """``(T, H, W, 2)`` -> ``(T, 2H, W)``: x on top of y."""
    return np.concatenate([q[..., 0], q[..., 1]], axis=1)


def open_for_flow(path: str | Path, decoder: str):
    from .decoding import VideoDecodeError, open_video

    try:
        return open_video(path, decoder)
    except VideoDecodeError as err:
        raise FlowError(f"cannot read flow {path}: {err.reason}") from None


def flow_frames(path: str | Path, decoder: str = "torchcodec") -> int:
    """Number of flow frames stored in ``path`` (the video's frames - 1)."""
    return open_for_flow(path, decoder).num_frames


def read_flow(path: str | Path, indices: Sequence[int], decoder: str = "torchcodec") -> np.ndarray:
    """Flow frames ``indices`` (``i``: from video frame ``i`` to ``i + 1``) of a file written by
    :func:`write_flow`, as uint8 ``(len(indices), H, W, 2)`` (:func:`dequantize_flow` for pixels).

    Raises:
        FlowError: the file cannot be decoded, an index is out of range, or it is not flow.
    """
    from .decoding import VideoDecodeError

    video = open_for_flow(path, decoder)
    try:
        planes = video.get(indices)[..., 0]
    except VideoDecodeError as err:
        raise FlowError(f"cannot read flow {path}: {err.reason}") from None
    if planes.shape[1] % 2:
        raise FlowError(f"{path}: frames of odd height {planes.shape[1]}: not x over y flow")
    h = planes.shape[1] // 2
    return np.stack([planes[:, :h], planes[:, h:]], axis=-1)


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
    not a folder).

    Raises:
        JsonFileError: the marker is unreadable or not a JSON object (names it and the line).
    """
    from ..io import read_json

    marker = Path(root) / FLOW_MARKER
    return read_json(marker, "flow marker") if marker.is_file() else None


