"""Read only the sampled frames of a video file, at the size the network's input needs.

Three backends are supported:

* ``"torchcodec"`` (the default; ``pip install torchcodec``): ``torchcodec.decoders.VideoDecoder``
  with one FFmpeg thread, on the CPU or, with ``device="cuda"``, with NVDEC straight into GPU
  memory. It uses the system FFmpeg, so it reads what ffmpeg reads (AV1, 10-bit H.264, WebM
  without a duration, ...). Seek modes, chosen per file (:func:`choose_seek_mode`):

  - ``"exact"`` scans the file once when it is opened, so that a frame index means the same
    frame as in decord even for files with variable frame rate or wrong header metadata;
  - ``"approximate"`` trusts the header and skips that scan: exact for the constant-frame-rate
    files ``tsmtrain prepare`` writes (it checks this), and faster to open;
  - ``frame_mappings``, a JSON file of every frame's pts, duration and key-frame flag (what
    ``tsmtrain prepare`` stores beside a video), gives exact seeking without the scan
    (torchcodec's ``custom_frame_mappings``).

* ``"decord"`` (``pip install decord``; its last release is from 2022): ``decord.VideoReader``
  with one decoding thread, frames read with ``get_batch``; always exact. Rotation metadata in
  the container is not applied by decord.

* ``"pynvvideocodec"`` (``pip install pynvvideocodec``, or ``tsmtrain[gpu]``; NVIDIA's Python API
  for NVDEC, on PyPI, needing only the NVIDIA driver): ``PyNvVideoCodec.SimpleDecoder`` decodes the
  sampled frames on the GPU, converted to interleaved RGB in GPU memory
  (``OutputColorType.RGB``), returned through DLPack without a copy to the host; GPU only. It has
  no decoder transform: frames are resized on the GPU afterwards (:func:`resize_frames`, the same
  bilinear with antialiasing), so prepared videos stored at the training size are not resized at
  all. Seeking is its own (exact for the constant-frame-rate files ``tsmtrain prepare`` writes).

``size=(H, W)`` asks the decoder itself for frames of that size (torchcodec's decoder transform
``Resize``, bilinear with antialiasing as ``torchvision.transforms.v2.Resize``; decord's
``width``/``height``, FFmpeg's scaler), so full-size frames are never converted to RGB and
resized afterwards on the CPU.

Backends are imported lazily, inside the functions, so ``import tsmtrain.data.decoding`` works
when any of them is missing (PyNvVideoCodec fails to import without an NVIDIA driver: that is an
ImportError here too). :func:`gpu_decoders` says which backends decode on a GPU here. Frames are always uint8 RGB of shape (T, H, W, 3), in the order of
the requested indices (indices may be unsorted and repeat).

Errors:

* :class:`VideoDecodeError` (a ``RuntimeError``) for anything that goes wrong with a
  particular file: missing, unreadable, corrupt, unsupported codec, index out of range.
  The message always holds the path and the reason.
* ``ImportError`` when the chosen backend package is not installed (a set-up problem, not
  a problem of the file, so it is not a VideoDecodeError).
* ``ValueError`` for an unknown backend, seek mode or size, an empty list of indices, or a
  CPU-only backend asked for a GPU (or the reverse).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["BACKENDS", "GPU_BACKENDS", "GPU_ONLY", "SEEK_MODES", "VideoDecodeError", "Video",
           "open_video", "num_frames", "probe_size", "decode_frames", "resize_frames", "choose_seek_mode",
           "gpu_decoders", "describe_decoders"]

BACKENDS = ("torchcodec", "decord", "pynvvideocodec")
GPU_BACKENDS = ("pynvvideocodec", "torchcodec")  # backends that decode with NVDEC, in order of preference
GPU_ONLY = ("pynvvideocodec",)
SEEK_MODES = ("exact", "approximate")
_PIP_PACKAGES = {"decord": ("decord", "decord"), "torchcodec": ("torchcodec", "torchcodec"),
                 "pynvvideocodec": ("pynvvideocodec", "gpu")}
PROBE_CLIP = Path(__file__).with_name("assets") / "probe-h264-64x64.mp4"
"""A 2-frame 64x64 H.264 (yuv420p) MP4 that :func:`gpu_decoders` decodes: ``ffmpeg -f lavfi -i
testsrc=size=64x64:rate=25 -frames:v 2 -c:v libx264 -pix_fmt yuv420p -bitexact``."""


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
        if backend == "pynvvideocodec":
            # its __init__ loads the driver's libraries and raises RuntimeError without them
            import PyNvVideoCodec

            return PyNvVideoCodec
        import torchcodec.decoders

        return torchcodec.decoders
    except Exception as e:  # ImportError, or PyNvVideoCodec's RuntimeError without a driver
        pkg, extra = _PIP_PACKAGES[backend]
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ImportError(
            f"video backend {backend!r} needs the {pkg!r} package, which could not be imported "
            f"({type(e).__name__}: {why}); install it with `pip install {pkg}` (or `pip install "
            f"tsmtrain[{extra}]`), or choose another backend from {BACKENDS}"
        ) from e



def _check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    size = tuple(int(x) for x in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) in pixels, both >= 1; got {size}")
    return size


class Video:
    """An open video file: open once, then read any frames by index.

    Use :func:`open_video` to create one.

    Args:
        path: the video file.
        backend: ``"torchcodec"``, ``"decord"`` or ``"pynvvideocodec"``.
        size: ``(H, W)`` in pixels that the decoder resizes every frame to; None: the stored size.
            (pynvvideocodec: resized on the GPU after decoding, :func:`resize_frames`.)
        seek_mode: torchcodec only: ``"exact"`` (scan at open) or ``"approximate"`` (trust the
            header); decord is always exact.
        frame_mappings: torchcodec only: a JSON file of every frame's ``pts``, ``duration`` and
            ``key_frame`` (``{"frames": [...]}``, as ``tsmtrain prepare`` stores it): exact seeking
            without the scan. Overrides ``seek_mode``.
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``): torchcodec decodes with
            NVDEC into that GPU's memory. decord: CPU only; pynvvideocodec: a CUDA device only (its
            decoder is created on the current CUDA stream of that device, so frames are ready in
            stream order).
        data: the encoded video itself (e.g. a sample read from a tar shard,
            :mod:`tsmtrain.prep.tar_writer`), decoded from memory; ``path`` then only names it in
            messages. ``frame_mappings`` may then be the frame table's bytes too.

    Attributes:
        path: the file, as a string.
        backend: the backend's name.
        num_frames: number of frames in the video (int).
        size: the requested ``(H, W)`` or None.
        device: the device frames are returned on (``torch.device``).
        seek_mode: how frames are found: ``"exact"``, ``"approximate"`` or ``"frame_mappings"``
            (torchcodec), ``"exact"`` (decord).
    """

    def __init__(self, path: str | Path, backend: str = "torchcodec", *, size: Sequence[int] | None = None,
                 seek_mode: str = "exact", frame_mappings: str | Path | bytes | None = None, device: str = "cpu",
                 data: bytes | None = None):
        _check_backend(backend)
        if seek_mode not in SEEK_MODES:
            raise ValueError(f"unknown seek mode {seek_mode!r}; valid modes are {', '.join(map(repr, SEEK_MODES))}")
        self.size = _check_size(size)
        self.device = torch.device(device)
        if backend == "decord" and self.device.type != "cpu":
            raise ValueError(f"the decord backend decodes on the CPU only, not on {device}")
        if backend in GPU_ONLY and self.device.type != "cuda":
            raise ValueError(f"the {backend} backend decodes on an NVIDIA GPU (NVDEC) only, not on {device}")
        module = _import_backend(backend)
        self.path = str(path)
        self.backend = backend
        self.seek_mode = ("exact" if backend != "torchcodec" else
                          "frame_mappings" if frame_mappings else seek_mode)
        if data is None and not Path(path).is_file():
            raise VideoDecodeError(path, "file not found")
        try:
            if backend == "decord":
                h, w = self.size or (-1, -1)
                source = self.path if data is None else io.BytesIO(data)
                self._reader = module.VideoReader(source, ctx=module.cpu(0), num_threads=1, width=w, height=h)
                self.num_frames = len(self._reader)
            elif backend == "pynvvideocodec":
                self._reader = _open_nvdec(module, self.path if data is None else data, self.device)
                self.num_frames = len(self._reader)
            else:
                kwargs = {}
                if self.size is not None:
                    from torchcodec.transforms import Resize

                    kwargs["transforms"] = [Resize(self.size)]
                if isinstance(frame_mappings, bytes):
                    kwargs["custom_frame_mappings"] = frame_mappings
                elif frame_mappings is not None:
                    with open(frame_mappings, "rb") as f:
                        kwargs["custom_frame_mappings"] = f.read()
                else:
                    kwargs["seek_mode"] = seek_mode
                self._reader = module.VideoDecoder(self.path if data is None else data, dimension_order="NHWC",
                                                   device=str(self.device),
                                                   num_ffmpeg_threads=1, **kwargs)
                n = self._reader.metadata.num_frames
                self.num_frames = int(n) if n is not None else self._count_frames()
        except Exception as e:  # backends raise many different types
            raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
        if self.num_frames <= 0:
            raise VideoDecodeError(path, "the video has no frames")

    def _count_frames(self) -> int:
        """Decode the whole file once to count its frames (torchcodec without metadata)."""
        return sum(1 for _ in self._reader)

    def frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the frames at ``indices`` into a tensor on :attr:`device`.

        Args:
            indices: frame indices in ``[0, num_frames)``; may be unsorted and may repeat.
                A list, tuple, numpy array or 1-D tensor of integers.

        Returns:
            uint8 tensor ``(T, H, W, 3)``, RGB, T = len(indices), frame t being frame
            ``indices[t]`` of the video; ``(H, W)`` is :attr:`size` when one was asked for.

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
                frames = torch.from_numpy(batch.asnumpy()) if hasattr(batch, "asnumpy") else torch.as_tensor(batch)
            elif self.backend == "pynvvideocodec":
                frames = _nvdec_frames(self._reader, idx)
                if self.size is not None:
                    frames = resize_frames(frames, self.size)
            else:
                frames = self._reader.get_frames_at(indices=idx).data
        except Exception as e:
            raise VideoDecodeError(self.path, f"{type(e).__name__}: {e}") from e
        if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise VideoDecodeError(
                self.path, f"backend returned frames of shape {tuple(frames.shape)} ({frames.dtype}), "
                           f"expected ({len(idx)}, H, W, 3) uint8"
            )
        if self.size is not None and tuple(frames.shape[1:3]) != self.size:
            raise VideoDecodeError(self.path, f"the decoder returned {tuple(frames.shape[1:3])} frames, not {self.size}")
        return frames.contiguous()

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """:meth:`frames` as a numpy array ``(T, H, W, 3)`` uint8 (copied to the CPU first if needed).

        Raises:
            VideoDecodeError, ValueError: as :meth:`frames`.
        """
        return np.ascontiguousarray(self.frames(indices).cpu().numpy())

    def __repr__(self) -> str:
        return (f"Video({self.path!r}, backend={self.backend!r}, num_frames={self.num_frames}"
                + (f", size={self.size}" if self.size else "") + ")")


def _open_nvdec(module, source, device: torch.device):
    """A PyNvVideoCodec ``SimpleDecoder`` of ``source`` (a path or the encoded bytes) on ``device``,
    returning interleaved RGB frames in GPU memory, its work queued on the device's current
    CUDA stream."""
    cuda = device.type == "cuda"
    gpu = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    stream = torch.cuda.current_stream(device).cuda_stream if cuda else 0
    return module.SimpleDecoder(source, gpu_id=gpu, cuda_stream=stream, use_device_memory=True,
                                output_color_type=module.OutputColorType.RGB)


def _nvdec_frames(decoder, idx: list[int]) -> torch.Tensor:
    """Frames ``idx`` (unsorted, repeating) of a ``SimpleDecoder`` as ``(T, H, W, 3)`` uint8 on its
    GPU. Each distinct frame is decoded once, in increasing order (``get_batch_frames_by_index``
    drops repeats and would decode unsorted indices with extra seeks); ``torch.from_dlpack`` wraps
    the decoder's buffer and ``torch.stack`` copies it out before the decoder reuses it."""
    distinct = sorted(set(idx))
    decoded = decoder.get_batch_frames_by_index(distinct)
    if len(decoded) != len(distinct):
        raise RuntimeError(f"the decoder returned {len(decoded)} frames for {len(distinct)} indices")
    stacked = torch.stack([torch.from_dlpack(frame) for frame in decoded])
    if stacked.ndim == 3:  # one plane per frame: (U, H, W) would be a colour format we did not ask for
        raise RuntimeError(f"the decoder returned frames of shape {tuple(stacked.shape[1:])}, not RGB (H, W, 3)")
    position = {frame: i for i, frame in enumerate(distinct)}
    return stacked[torch.tensor([position[i] for i in idx], device=stacked.device)]


def resize_frames(frames: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize uint8 frames ``(T, H, W, 3)`` to ``size = (h, w)`` pixels on their own device:
    ``torchvision.transforms.v2.functional.resize``, bilinear with antialiasing (what torchcodec's
    decoder transform ``Resize`` matches). Returns ``(T, h, w, 3)`` uint8; the input itself when it
    has that size already.

    Raises:
        ValueError: a bad ``size``.
    """
    size = _check_size(size)
    if tuple(frames.shape[1:3]) == size:
        return frames
    from torchvision.transforms.v2 import functional as F

    chw = frames.permute(0, 3, 1, 2)
    return F.resize(chw, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True).permute(0, 2, 3, 1)


def open_video(path: str | Path, backend: str = "torchcodec", **options) -> Video:
    """Open a video file (or, with ``data``, a video in memory) for reading frames by index;
    ``options`` as :class:`Video` (``size``, ``seek_mode``, ``frame_mappings``, ``device``, ``data``).

    Raises:
        VideoDecodeError: the file is missing, unreadable or not a decodable video.
        ImportError: the backend package is not installed.
        ValueError: unknown backend or seek mode, a bad size, decord on a GPU.
    """
    return Video(path, backend, **options)


def num_frames(path: str | Path, backend: str = "torchcodec") -> int:
    """Number of frames of the video at ``path``.

    decord: ``len(VideoReader)``; torchcodec: ``metadata.num_frames`` (from the exact scan),
    counting the decoded frames if that is missing.

    Raises:
        VideoDecodeError, ImportError, ValueError: as :func:`open_video`.
    """
    return open_video(path, backend).num_frames


def probe_size(path: str | Path, backend: str = "torchcodec", device: str = "cuda") -> tuple[int, int]:
    """``(H, W)`` in pixels of the frames ``backend`` decodes from ``path`` at its stored size.

    torchcodec reads it from the stream's header (an approximate-mode open: no scan, no frame
    decoded); decord and pynvvideocodec (on ``device``, its only use) decode the first frame.

    Raises:
        VideoDecodeError, ImportError, ValueError: as :func:`open_video`.
    """
    if backend == "decord":
        return tuple(Video(path, backend).frames([0]).shape[1:3])
    if backend == "pynvvideocodec":
        return tuple(Video(path, backend, device=device if device != "cpu" else "cuda").frames([0]).shape[1:3])
    _check_backend(backend)
    if not Path(path).is_file():
        raise VideoDecodeError(path, "file not found")
    module = _import_backend(backend)
    try:
        meta = module.VideoDecoder(str(path), seek_mode="approximate", num_ffmpeg_threads=1).metadata
        size = (int(meta.height), int(meta.width))
    except Exception as e:  # backends raise many different types
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if min(size) < 1:
        raise VideoDecodeError(path, f"the header gives no frame size ({size[1]}x{size[0]})")
    return size


def decode_frames(path: str | Path, indices: Sequence[int], backend: str = "torchcodec", **options) -> np.ndarray:
    """Decode only the frames at ``indices`` of the video at ``path``.

    Args:
        path: video file.
        indices: frame indices in ``[0, num_frames)``; may be unsorted and may repeat.
            Nothing is clamped: an index out of range raises VideoDecodeError.
        backend: ``"torchcodec"`` or ``"decord"``.
        options: as :class:`Video` (``size``, ``seek_mode``, ``frame_mappings``).

    Returns:
        uint8 numpy array of shape (T, H, W, 3), RGB, T = len(indices).

    Raises:
        VideoDecodeError: missing/corrupt file, unsupported codec, index out of range.
        ImportError: the backend package is not installed.
        ValueError: unknown backend, or empty ``indices``.
    """
    return open_video(path, backend, **options).get(indices)


def choose_seek_mode(setting: str, prepared: bool) -> str:
    """The torchcodec seek mode for one file.

    Args:
        setting: the recipe's ``data.seek_mode``: ``"auto"``, ``"exact"`` or ``"approximate"``.
        prepared: the file is listed as done in a ``tsmtrain prepare`` manifest (constant frame
            rate, first frame at pts 0, frame count checked), where approximate seeking lands
            on the same frames as exact seeking without scanning the file at open.

    Returns:
        ``"approximate"`` for ``auto`` and a prepared file, else ``setting`` (``"exact"`` for
        ``auto`` and any other file: a variable-frame-rate or mislabelled file must not have its
        frame indices silently shifted).

    Raises:
        ValueError: an unknown setting.
    """
    if setting not in ("auto", *SEEK_MODES):
        raise ValueError(f"unknown seek mode setting {setting!r}; valid: 'auto', 'exact', 'approximate'")
    if setting == "auto":
        return "approximate" if prepared else "exact"
    return setting


@functools.lru_cache(maxsize=None)
def probe_gpu_decoding(backend: str, device: str) -> str | None:
    """None when ``backend`` decodes on ``device`` (``"cuda"``, ``"cuda:1"``), else why not, in
    one line. The probe decodes both frames of :data:`PROBE_CLIP` there; the answer is cached per
    process.

    Raises:
        ValueError: ``backend`` is not one of :data:`GPU_BACKENDS`.
    """
    if backend not in GPU_BACKENDS:
        raise ValueError(f"{backend!r} does not decode on a GPU; GPU backends: {', '.join(GPU_BACKENDS)}")
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        frames = open_video(PROBE_CLIP, backend, device=device).frames([0, 1])
    except ImportError as e:
        return str(e).split("; install it")[0]
    except Exception as e:  # VideoDecodeError, or a CUDA/NVDEC error from the backend
        return f"{backend} cannot decode on {device} ({str(e).strip().splitlines()[-1][:200]})"
    if frames.device.type != "cuda":
        return f"{backend} returned frames on {frames.device}, not on {device} (a CPU-only build)"
    return None


def gpu_decoders(device: str = "cuda") -> dict[str, str | None]:
    """Which GPU decoders work on ``device``: ``{backend: None (it decodes there) or the reason
    it does not}``, for each of :data:`GPU_BACKENDS` (``"no CUDA device"`` on a machine without
    one; torchcodec from PyPI is a CPU-only build, see docs/installing.md)."""
    return {backend: probe_gpu_decoding(backend, device) for backend in GPU_BACKENDS}


def describe_decoders(device: str = "cuda") -> list[str]:
    """One line per video backend for ``tsmtrain env``: its installed version (or how to install
    it), and whether it decodes on the CPU and on ``device`` with NVDEC (:func:`gpu_decoders`),
    or why not."""
    from importlib.metadata import PackageNotFoundError, version

    gpu = gpu_decoders(device)
    lines = []
    for backend in BACKENDS:
        pkg, extra = _PIP_PACKAGES[backend]
        try:
            name = f"{backend} {version(pkg)}"
        except PackageNotFoundError:
            lines.append(f"video decoder {backend}: not installed (pip install tsmtrain[{extra}]"
                         + ("; make setup installs it where an NVIDIA driver is present)" if backend in GPU_ONLY
                            else ")"))
            continue
        cpu = "no (GPU only)" if backend in GPU_ONLY else "yes"
        on_gpu = ("no (CPU only)" if backend not in GPU_BACKENDS
                  else "yes" if gpu[backend] is None else f"no: {gpu[backend]}")
        lines.append(f"video decoder {name}: CPU {cpu}; GPU (NVDEC) {on_gpu}")
    return lines
