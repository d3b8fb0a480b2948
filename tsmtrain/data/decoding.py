"""Read only the sampled frames of a video file.

Two backends are supported:

* ``"decord"`` (``pip install decord``): ``decord.VideoReader`` with one decoding thread,
  frames read with ``get_batch``.
* ``"torchcodec"`` (``pip install torchcodec``): ``torchcodec.decoders.VideoDecoder`` on the
  CPU with ``seek_mode="exact"``. Exact mode scans the file once when it is opened so that a
  frame index means the same frame as in decord even for files with variable frame rate or
  wrong header metadata; ``"approximate"`` trusts the header and can return a neighbouring
  frame, which would silently change what a given index means.

Backends are imported lazily, inside the functions, so ``import tsmtrain.data.decoding`` works
when either one is missing. Frames are always returned as uint8 RGB arrays of shape
(T, H, W, 3), in the order of the requested indices (indices may be unsorted and repeat).
Rotation metadata in the container is not applied by decord.

Errors:

* :class:`VideoDecodeError` (a ``RuntimeError``) for anything that goes wrong with a
  particular file: missing, unreadable, corrupt, unsupported codec, index out of range.
  The message always holds the path and the reason.
* ``ImportError`` when the chosen backend package is not installed (a set-up problem, not
  a problem of the file, so it is not a VideoDecodeError).
* ``ValueError`` for an unknown backend name or an empty list of indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

BACKENDS = ("decord", "torchcodec")
_PIP_PACKAGES = {"decord": "decord", "torchcodec": "torchcodec"}


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded.

    Attributes:
        path: the file, as a string.
        reason: what went wrong (usually the backend's own error message).
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot decode video {self.path}: {self.reason}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid backends are {', '.join(map(repr, BACKENDS))}")


def _import_backend(backend: str):
    """Import and return the backend's module; ImportError with a pip hint if missing."""
    try:
        if backend == "decord":
            import decord

            return decord
        import torchcodec.decoders

        return torchcodec.decoders
    except ImportError as e:
        pkg = _PIP_PACKAGES[backend]
        raise ImportError(
            f"video backend {backend!r} needs the {pkg!r} package, which could not be imported "
            f"({e}); install it with `pip install {pkg}` (or `pip install tsmtrain[{pkg}]`), "
            f"or choose another backend from {BACKENDS}"
        ) from e


class Video:
    """An open video file: open once, then read any frames by index.

    Use :func:`open_video` to create one.

    Attributes:
        path: the file, as a string.
        backend: ``"decord"`` or ``"torchcodec"``.
        num_frames: number of frames in the video (int).
    """

    def __init__(self, path: str | Path, backend: str = "decord"):
        _check_backend(backend)
        module = _import_backend(backend)
        self.path = str(path)
        self.backend = backend
        if not Path(path).is_file():
            raise VideoDecodeError(path, "file not found")
        try:
            if backend == "decord":
                self._reader = module.VideoReader(self.path, ctx=module.cpu(0), num_threads=1)
                self.num_frames = len(self._reader)
            else:
                self._reader = module.VideoDecoder(
                    self.path, dimension_order="NHWC", device="cpu", seek_mode="exact"
                )
                n = self._reader.metadata.num_frames
                self.num_frames = int(n) if n is not None else self._count_frames()
        except Exception as e:  # backends raise many different types
            raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
        if self.num_frames <= 0:
            raise VideoDecodeError(path, "the video has no frames")

    def _count_frames(self) -> int:
        """Decode the whole file once to count its frames (torchcodec without metadata)."""
        return sum(1 for _ in self._reader)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """Decode the frames at ``indices``.

        Args:
            indices: frame indices in ``[0, num_frames)``; may be unsorted and may repeat.
                A list, tuple, numpy array or 1-D tensor of integers.

        Returns:
            uint8 array of shape (T, H, W, 3), RGB, with T = len(indices), frame t being
            frame ``indices[t]`` of the video.

        Raises:
            VideoDecodeError: an index is out of range, or the backend fails to decode.
            ValueError: ``indices`` is empty.
        """
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("indices must not be empty")
        bad = [i for i in idx if not 0 <= i < self.num_frames]
        if bad:
            raise VideoDecodeError(
                self.path, f"frame indices {bad[:5]} out of range for a video of {self.num_frames} frames"
            )
        try:
            if self.backend == "decord":
                batch = self._reader.get_batch(idx)
                # decord returns its own NDArray, or a torch tensor if a bridge was set.
                frames = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
            else:
                frames = self._reader.get_frames_at(indices=idx).data.numpy()
        except Exception as e:
            raise VideoDecodeError(self.path, f"{type(e).__name__}: {e}") from e
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
            raise VideoDecodeError(
                self.path, f"backend returned frames of shape {frames.shape}, expected ({len(idx)}, H, W, 3)"
            )
        return frames

    def __repr__(self) -> str:
        return f"Video({self.path!r}, backend={self.backend!r}, num_frames={self.num_frames})"


def open_video(path: str | Path, backend: str = "decord") -> Video:
    """Open a video file for reading frames by index.

    Raises:
        VideoDecodeError: the file is missing, unreadable or not a decodable video.
        ImportError: the backend package is not installed.
        ValueError: unknown backend.
    """
    return Video(path, backend)


def num_frames(path: str | Path, backend: str = "decord") -> int:
    """Number of frames of the video at ``path``.

    decord: ``len(VideoReader)``; torchcodec: ``metadata.num_frames`` (from the exact scan),
    counting the decoded frames if that is missing.

    Raises:
        VideoDecodeError, ImportError, ValueError: as :func:`open_video`.
    """
    return open_video(path, backend).num_frames


def decode_frames(path: str | Path, indices: Sequence[int], backend: str = "decord") -> np.ndarray:
    """Decode only the frames at ``indices`` of the video at ``path``.

    Args:
        path: video file.
        indices: frame indices in ``[0, num_frames)``; may be unsorted and may repeat.
            Nothing is clamped: an index out of range raises VideoDecodeError.
        backend: ``"decord"`` or ``"torchcodec"``.

    Returns:
        uint8 numpy array of shape (T, H, W, 3), RGB, T = len(indices).

    Raises:
        VideoDecodeError: missing/corrupt file, unsupported codec, index out of range.
        ImportError: the backend package is not installed.
        ValueError: unknown backend, or empty ``indices``.
    """
    return open_video(path, backend).get(indices)
