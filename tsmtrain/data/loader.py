"""The clip dataset, the per-rank shard sampler and the loader.

Each item is a clip of T frames chosen by segment sampling (:mod:`tsmtrain.data.sampling`),
decoded from the video file (only those frames; :mod:`tsmtrain.data.decoding`) as uint8
``(T, H, W, 3)``; for a motion input (:mod:`tsmtrain.data.modality`) each segment gives F
consecutive frames, ``(T*F, H, W, 3)`` (RGB difference) or ``(T*F, H, W, 2)`` flow fields read
from the flow video ``tsmtrain prepare --flow`` stored beside the video (:func:`flow_files`). Augmentation happens later, batched on the training device
(:mod:`tsmtrain.data.transforms`). A video that cannot be opened or decoded is logged by path,
counted, and replaced by another video of the list in training, so one bad file never stops
training; in validation it is counted as wrong, never replaced (``replace``). What the readers
will open (shards, flow files, features) is checked before training (:mod:`tsmtrain.data.preflight`).

The videos are files, or samples of indexed tar shards when ``data.root`` names a shard index
(:mod:`tsmtrain.prep.tar_writer`: each worker opens a shard once and reads whole samples from it by
offset, decoded from memory). Both give the same clips, bit for bit: the sampler, the sampling
offsets and the decoder's input bytes are the same.

Videos of different sizes and aspect ratios batch together: without ``data.frame_size`` the
decoder resizes each video so that its short side is ``data.short_side`` (``input_size * 256 /
224`` by default, as TSM and mmaction2 do), and a square of that side is cropped from it (at a
random place along the long side in training, in the centre otherwise).

A loader never outlives its training process and never hangs it: its worker processes die with
the process (``PR_SET_PDEATHSIG``), are killed (not merely sent SIGTERM, which they ignore) when
the loader shuts them down, and every loader still running when the process exits, for example
after an exception, is shut down before :mod:`multiprocessing` joins its children. A data
mistake found in a worker (too many unreadable videos in a row, clips that cannot be batched)
reaches the training process as a :class:`DataError` with the worker's own message. A fork of
a worker that sticks in Python's after-fork set-up is killed and forked again
(:class:`_KillingPopen`), and a worker that is alive but delivers nothing for
:data:`WORKER_TIMEOUT_S` seconds (a read that never returns, a decoder that hangs) ends the wait
with :class:`LoaderStalled`, naming the worker.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import itertools
import logging
import math
import multiprocessing.context
import os
import select
import signal
import sys
import warnings
import weakref
import zlib
from multiprocessing.popen_fork import Popen as _ForkPopen
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from .decode_ahead import DecodeAhead
from .decoding import GPU_ONLY, Video, VideoDecodeError, choose_seek_mode, open_video, probe_gpu_decoding, probe_size
from .lists import VideoRecord
from .modality import RGB, Modality, modality_of
from .preflight import find_flows
from .readers import create_reader
from .readers.files import read_checked
from .sampling import multi_snippet_indices, snippet_indices
from .transforms import short_side_size
from .readers.tar import SampleError, TarShardReader
from ..errors import UserError

__all__ = ["DataError", "LoaderStalled", "WORKER_TIMEOUT_S", "shutdown_loaders", "VideoClipDataset", "RankSampler", "ShapeBatchSampler", "collate_clips", "build_loader", "clip_dataset",
           "MultiClipDataset", "multi_clip_dataset", "collate_views", "collate_encoded", "decode_batch",
           "decoding_target", "flow_files", "FlowFrames"]

log = logging.getLogger(__name__)


class DataError(UserError):
    """A mistake in the data or in how the recipe reads it, found while loading clips: too many
    unreadable videos in a row, or clips that cannot be batched. The message names the culprit
    (video path, recipe key); the CLI prints it as one line and exits with status 2.

    Raised in a loader worker, it reaches the training process through the DataLoader, which
    re-raises it as ``DataError("Caught DataError in DataLoader worker process 0. Original
    Traceback ...")``; the constructor keeps only the worker's own message.
    """

    def __init__(self, message: str):
        if message.startswith("Caught DataError"):  # re-raised by torch's DataLoader from a worker
            message = message.rsplit("DataError: ", 1)[-1].strip()
        super().__init__(message)


class LoaderStalled(DataError):
    """A loader worker is stuck, and this process ends instead of waiting for ever: it is alive
    but delivered no batch for ``timeout_s`` seconds (a read that never returns, a decoder that
    hangs; the message names the worker that owes the batch and its process id), or no fork of it
    got through Python's after-fork set-up (:class:`_KillingPopen`)."""


class VideoClipDataset(Dataset):
    """Clips of ``num_segments`` frames from the videos of a list file.

    Items are indexed by ``(index, epoch)`` pairs (as :class:`RankSampler` yields them),
    ``(index, epoch, segments)`` triples (:class:`ShapeBatchSampler`: multigrid training's clips of
    another T) or plain indices (epoch 0). Training offsets are drawn from a generator seeded by
    ``(seed, epoch, index)``, so a clip does not depend on which worker loads it, and a run
    resumed mid-epoch sees the same clips.

    Each item is a dict: ``frames`` uint8 ``(T, H, W, 3)`` on :attr:`device`, ``label`` int,
    ``index`` int (the video finally used), ``failed`` list of paths that could not be decoded
    on the way, ``opened`` the files this process opened to load it (the video and its frame
    table, or the shard on its first use; for ``tsmtrain bench data``'s file-open count).

    Args:
        records: the videos.
        num_segments: T.
        train: random (True) or central (False) frame in each segment.
        decoder: ``"torchcodec"`` or ``"decord"``.
        frame_size: ``(H, W)`` in pixels that the decoder resizes every frame to.
        short_side: S in pixels, used when ``frame_size`` is None: the decoder resizes each video
            to short side S and the ``(S, S)`` square is cropped from it, so videos of any size
            batch together. None (and no ``frame_size``): frames as stored.
        max_retries: unreadable videos replaced in a row before giving up.
        replace: replace an unreadable video by another (training); False (validation): its
            item has ``frames`` None, its own label and index, and the reason in ``failed``, so
            that it is counted, never evaluated as another video.
        seed: base seed for the sampling offsets.
        seek_mode: torchcodec's seek mode setting, ``"auto"`` (approximate for the videos in
            ``prepared``, exact for the others; :func:`~tsmtrain.data.decoding.choose_seek_mode`),
            ``"exact"`` or ``"approximate"``.
        prepared: ``{video path: manifest record}`` of the videos ``tsmtrain prepare`` wrote
            (:func:`prepared_videos`); their frame counts are checked against the record, and
            with exact seeking their stored frame mappings spare the scan at open.
        device: ``"cpu"``, or a CUDA device to decode on with NVDEC (in the training process:
            :func:`build_loader` then uses no worker processes).
        store: a :class:`~tsmtrain.data.readers.tar.TarShardReader` when the videos are samples of tar
            shards (:func:`create_reader`); a sample that cannot be read counts as an
            unreadable video.
        modality: what a segment holds (:mod:`tsmtrain.data.modality`): ``frames`` is then
            ``(T*F, H, W, C)``, F frames per segment, C = 2 for flow.
        flows: ``{video path: flow file}`` for ``modality`` flow (:func:`flow_files`).
        flow_settings: ``{"method", "preset", "bound"}``: compute the flow of a video that has no
            flow file, in memory (``tsmtrain predict`` on videos never prepared); None: such a
            video is unreadable.

    Raises (from ``__getitem__``):
        DataError: ``max_retries + 1`` videos in a row could not be decoded (with ``replace``).
    """

    def __init__(self, records: list[VideoRecord], num_segments: int, train: bool, decoder: str = "torchcodec",
                 frame_size: tuple[int, int] | None = None, max_retries: int = 10, seed: int = 0,
                 seek_mode: str = "auto", prepared: dict[str, dict] | None = None, device: str = "cpu",
                 short_side: int | None = None, store: TarShardReader | None = None, modality: Modality = RGB,
                 flows: dict[str, str] | None = None, flow_settings: dict | None = None, replace: bool = True):
        self.records, self.num_segments, self.train, self.replace = records, num_segments, train, replace
        self.modality, self.flows, self.flow_settings = modality, flows or {}, flow_settings
        self.decoder, self.frame_size, self.max_retries, self.seed = decoder, frame_size, max_retries, seed
        self.seek_mode, self.prepared, self.device = seek_mode, prepared or {}, device
        self.short_side, self.store = short_side, store
        self._stored_sizes: dict[str, tuple[int, int]] = {}  # (H, W) as stored, per path (this process)
        self._opened: tuple[int, list[str]] = (os.getpid(), [])  # files this process opened since the last item

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        index, epoch, segments = (*key, None)[:3] if isinstance(key, tuple) else (key, 0, None)
        # on a GPU, a loader worker only reads the bytes; decode_item decodes them
        return self._with_retries(index, epoch, [], self._fetched if self.decodes_on_gpu else self._decoded, segments)

    def _decoded(self, record: VideoRecord, index: int, epoch: int, segments: int | None = None) -> dict:
        return {"frames": self._load(record, index, epoch, segments=segments)}

    def _fetched(self, record: VideoRecord, index: int, epoch: int, segments: int | None = None) -> dict:
        return {"encoded": self.fetch(record.path)}

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether frames are decoded on a GPU (:attr:`device` is not the CPU): items are then the
        encoded videos (:meth:`fetch`), decoded in the training process by :meth:`decode_item`."""
        return str(self.device) != "cpu"

    def _with_retries(self, index: int, epoch: int, failed: list[str], load, segments: int | None = None) -> dict:
        """``load(record, index, epoch, segments)``'s dict for video ``index`` (``segments``: T,
        None: :attr:`num_segments`), completed into an item; a video
        that cannot be read is replaced by another, deterministically, until ``max_retries + 1``
        videos in a row (``failed`` holds those already lost for this item) have failed; without
        :attr:`replace`, it is an item of ``frames`` None (:meth:`_unread`)."""
        for attempt in range(len(failed), self.max_retries + 1):
            record = self.records[index]
            try:
                item = load(record, index, epoch, segments)
                return {**item, "label": record.label, "labels": record.labels, "index": index, "epoch": epoch,
                        "failed": failed, "opened": self.take_opened(), "segments": segments}
            except VideoDecodeError as exc:
                failed.append(str(exc))
                if not self.replace:
                    return self._unread(index, epoch, failed)
                index = self._replacement(index, attempt)
        raise DataError(
            f"{len(failed)} videos in a row could not be decoded (data.max_retries={self.max_retries}); last: {failed[-1]}"
        )

    def _unread(self, index: int, epoch: int, failed: list[str]) -> dict:
        """The item of video ``index`` that could not be read (``failed``: why), not replaced."""
        record = self.records[index]
        return {"frames": None, "label": record.label, "labels": record.labels, "index": index, "epoch": epoch,
                "failed": failed, "opened": self.take_opened()}

    def _replacement(self, index: int, attempt: int) -> int:
        """The video that replaces unreadable video ``index`` at retry ``attempt``: deterministic,
        spread over the list."""
        return (index + 1 + zlib.crc32(f"{index}:{attempt}".encode()) % max(1, len(self) - 1)) % len(self)

    def fetch(self, path: str) -> tuple[bytes, bytes | None]:
        """The encoded video at ``path`` and its frame table, as a loader worker reads them for
        decoding on the GPU: ``(video bytes, frame-mappings JSON bytes or None)``, from the file (and
        the frame table ``tsmtrain prepare`` stored beside it, when exact torchcodec seeking uses
        it) or from its tar shard.

        Raises:
            VideoDecodeError: the file or shard sample cannot be read.
        """
        if self.store is not None:
            try:
                return self.store.read(path)
            except SampleError as err:
                raise VideoDecodeError(path, str(err)) from None
            finally:
                self._note_opened(*self.store.take_opened())
        entry = self.prepared.get(path)
        tables = entry.get("frame_mappings") if entry else None
        if self.decoder != "torchcodec" or choose_seek_mode(self.seek_mode, entry is not None) != "exact":
            tables = None
        try:
            data = read_checked(path, entry.get("output_crc32") if entry else None)
            self._note_opened(path)
            mappings = Path(tables).read_bytes() if tables else None
        except OSError as err:  # worded as Video words it
            reason = "file not found" if isinstance(err, FileNotFoundError) else err.strerror or str(err)
            raise VideoDecodeError(err.filename or path, reason) from None
        if tables:
            self._note_opened(tables)
        return data, mappings

    def decode_item(self, item: dict) -> dict:
        """Decode an item of encoded bytes (from :meth:`fetch`, in a worker) on :attr:`device`, as
        ``__getitem__`` would have on the CPU: the same frames, sampling offsets and crop, a
        ``frames`` uint8 ``(T, H, W, 3)`` tensor on the GPU. A video NVDEC cannot decode is
        replaced like an unreadable file (the replacements are read and decoded here); without
        :attr:`replace` it is an item of ``frames`` None, as one that could not be read.

        Raises:
            DataError: ``max_retries + 1`` videos in a row could not be read or decoded.
        """
        index, epoch, segments = item["index"], item["epoch"], item.get("segments")
        record = self.records[index]
        if "encoded" not in item:  # not read, not replaced (``replace`` False)
            return item
        try:
            frames = self._load(record, index, epoch, encoded=item["encoded"], segments=segments)
        except VideoDecodeError as exc:
            failed = item["failed"] + [str(exc)]
            if not self.replace:
                return {**self._unread(index, epoch, failed), "opened": item["opened"]}
            replaced = self._with_retries(self._replacement(index, len(failed) - 1), epoch, failed, self._decoded,
                                          segments)
            return {**replaced, "opened": item["opened"] + replaced["opened"]}
        return {"frames": frames, "label": record.label, "labels": record.labels, "index": index, "epoch": epoch,
                "failed": item["failed"], "opened": item["opened"]}

    def open(self, path: str, encoded: tuple[bytes, bytes | None] | None = None) -> Video:
        """Open one video the way this dataset reads it (backend, size, seek mode, device);
        ``encoded``: its bytes and frame table as :meth:`fetch` read them (else they are read now).

        Raises:
            VideoDecodeError: the file (or shard sample) cannot be opened or read, or a prepared
                file's frame count differs from its manifest record (it was changed after
                ``tsmtrain prepare``).
        """
        entry = self.prepared.get(path)
        options = {"size": self.frame_size if self.frame_size or not self.short_side
                   else self._short_side_size(path, entry)}
        mappings = None
        if encoded is not None:
            options["data"], mappings = encoded
        elif self.store is not None:
            try:
                options["data"], mappings = self.store.read(path)
            except SampleError as err:
                raise VideoDecodeError(path, str(err)) from None
            finally:
                self._note_opened(*self.store.take_opened())
        else:
            self._note_opened(path)
            mappings = entry.get("frame_mappings") if entry else None
            if entry and entry.get("output_crc32") is not None:  # read whole and checked, as a shard sample
                options["data"] = read_checked(path, entry["output_crc32"])
        if self.decoder == "torchcodec":
            options["device"] = self.device
            mode = choose_seek_mode(self.seek_mode, entry is not None)
            if mode == "exact" and mappings:
                options["frame_mappings"] = mappings
                if self.store is None and encoded is None:
                    self._note_opened(mappings)
            else:
                options["seek_mode"] = mode
        video = open_video(path, self.decoder, **options)
        if entry is not None and entry.get("frames") not in (None, video.num_frames):
            raise VideoDecodeError(path, f"{video.num_frames} frames, but tsmtrain prepare recorded {entry['frames']}; "
                                         f"prepare it again")
        return video

    def _short_side_size(self, path: str, entry: dict | None) -> tuple[int, int] | None:
        """The ``(H, W)`` to decode ``path`` at so its short side is :attr:`short_side`; None when
        it is stored at that size already (no resize at all)."""
        stored = self._stored_sizes.get(path)
        if stored is None:
            if entry and entry.get("width") and entry.get("height"):
                stored = (int(entry["height"]), int(entry["width"]))  # tsmtrain prepare recorded it
            else:
                stored = probe_size(path, self.decoder, device=str(self.device))  # the header only
                self._note_opened(path)
            self._stored_sizes[path] = stored
        size = short_side_size(*stored, self.short_side)
        return None if size == stored else size

    def _note_opened(self, *paths: str) -> None:
        if self._opened[0] != os.getpid():  # a forked worker: what its parent opened is not its own
            self._opened = (os.getpid(), [])
        self._opened[1].extend(paths)

    def take_opened(self) -> list[str]:
        """The files this process opened since the last call (and forgets them)."""
        pid, opened = self._opened
        self._opened = (os.getpid(), [])
        return opened if pid == os.getpid() else []

    def crop_square(self, frames: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """Without ``frame_size``: the ``(S, S)`` square of ``(..., H, W, 3)`` frames resized to
        short side S, at ``rng``'s place along the long side (the centre when ``rng`` is None)."""
        if self.frame_size is not None or not self.short_side:
            return frames
        h, w = frames.shape[-3], frames.shape[-2]
        s = min(h, w)
        spare = max(h, w) - s
        at = int(rng.integers(0, spare + 1)) if rng is not None and spare else spare // 2
        return frames[..., at:at + s, :, :] if h > w else frames[..., :, at:at + s, :]

    def _load(self, record: VideoRecord, index: int, epoch: int,
              encoded: tuple[bytes, bytes | None] | None = None, segments: int | None = None) -> torch.Tensor:
        video = self.source(record.path, encoded)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.train else None
        idx = snippet_indices(video.num_frames, segments or self.num_segments, self.modality.frames_per_segment,
                              self.train, rng)
        return self.crop_square(video.frames(idx.reshape(-1).tolist()), rng).contiguous()  # (T*F, H, W, C) uint8

    def source(self, path: str, encoded: tuple[bytes, bytes | None] | None = None) -> "Video | FlowFrames":
        """What the frames of video ``path`` are read from for this modality: the video itself
        (:meth:`open`), or its flow (:class:`FlowFrames`: the flow file, or the flow computed now
        with :attr:`flow_settings` when it has none).

        Raises:
            VideoDecodeError: the video or its flow file cannot be read, or it has no flow.
        """
        if self.modality.name != "flow":
            return self.open(path, encoded)
        flow = self.flows.get(path)
        if flow is None:
            if self.flow_settings is None:
                raise VideoDecodeError(path, "no optical flow for it: prepare it with tsmtrain prepare --flow")
            return FlowFrames.computed(self.open(path), **self.flow_settings)
        self._note_opened(flow)
        entry = self.prepared.get(path) or {}
        frames = FlowFrames(flow, self.frame_size, self.short_side, crc32=entry.get("flow_crc32"))
        if entry.get("flow_frames") not in (None, frames.num_frames):
            raise VideoDecodeError(flow, f"{frames.num_frames} flow frames, but tsmtrain prepare recorded "
                                         f"{entry['flow_frames']}; prepare it again")
        return frames


class FlowFrames:
    """The optical flow of one video, read by flow-field index like frames: field ``i`` is the flow
    from frame ``i`` to ``i + 1`` (:mod:`tsmtrain.data.flow`), quantized to uint8.

    Args:
        path: the flow file (``NAME.flow.mkv``, x over y; decoded with torchcodec, every frame a
            keyframe).
        frame_size: ``(H, W)`` to resize the fields to; else ``short_side`` (resize to that short
            side), else as stored. Resizing is bilinear on the quantized values, which are not
            rescaled (as mmaction2 resizes flow images).
        crc32: the file's CRC-32 as ``tsmtrain prepare --flow`` recorded it (``flow_crc32``): the
            whole file is then read in one go, checked, and decoded from memory, as a tar shard's
            sample is; None (a manifest written before checksums): decoded from the file, unchecked.

    Attributes:
        num_frames: flow fields (the video's frames - 1).

    Raises:
        VideoDecodeError: the file cannot be opened, or its CRC-32 differs (a damaged sample: the
            loader replaces the video and counts it, as it does a damaged shard sample).
    """

    def __init__(self, path: str | None, frame_size: tuple[int, int] | None = None, short_side: int | None = None,
                 fields: torch.Tensor | None = None, crc32: int | None = None):
        self.path, self.frame_size, self.short_side = path, frame_size, short_side
        self._fields = fields
        self._video = None
        if fields is None and crc32 is not None:
            data = read_checked(path, crc32)
            self._video = open_video(path, "torchcodec", seek_mode="exact", data=data)
        elif fields is None:
            self._video = open_video(path, "torchcodec", seek_mode="exact")
        self.num_frames = len(fields) if fields is not None else self._video.num_frames

    @classmethod
    def computed(cls, video: Video, method: str, preset: str, bound: float) -> "FlowFrames":
        """The flow of every frame of ``video`` (decoded at its size), computed and quantized now
        (:func:`~tsmtrain.data.flow.compute_flow`, :func:`~tsmtrain.data.flow.quantize_flow`).

        Raises:
            VideoDecodeError: the video cannot be decoded, has one frame, or cv2 is missing.
        """
        from .flow import compute_flow, quantize_flow

        if video.num_frames < 2:
            raise VideoDecodeError(video.path, "one frame: no optical flow")
        frames = video.frames(range(video.num_frames)).cpu().numpy()
        try:
            q = quantize_flow(compute_flow(frames, method, preset), bound)
        except ImportError as err:
            raise VideoDecodeError(video.path, f"cannot compute optical flow: {err} (pip install "
                                               "opencv-contrib-python-headless)") from None
        return cls(None, fields=torch.from_numpy(q))

    def frames(self, indices) -> torch.Tensor:
        """uint8 ``(len(indices), H, W, 2)``: x then y of each field.

        Raises:
            VideoDecodeError: an index is out of range or the file cannot be decoded.
        """
        if self._fields is not None:
            idx = [int(i) for i in indices]
            if any(not 0 <= i < self.num_frames for i in idx):
                raise VideoDecodeError(str(self.path), f"flow indices out of range for {self.num_frames} fields")
            return self._fields[idx]
        planes = self._video.frames(indices)[..., 0]  # (M, 2H, W): gray, R = G = B
        if planes.shape[1] % 2:
            raise VideoDecodeError(self.path, f"frames of odd height {planes.shape[1]}: not x over y flow")
        h = planes.shape[1] // 2
        fields = torch.stack([planes[:, :h], planes[:, h:]], dim=-1)
        size = self.frame_size or (short_side_size(h, fields.shape[2], self.short_side) if self.short_side else None)
        if size is None or tuple(size) == tuple(fields.shape[1:3]):
            return fields
        x = torch.nn.functional.interpolate(fields.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bilinear",
                                            align_corners=False, antialias=True)
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def flow_files(root: str | Path, records: list[VideoRecord], prepared: dict[str, dict], method: str, preset: str,
               bound: float) -> dict[str, str]:
    """The flow file of every video of ``records``, checked before any clip is read.

    A prepared video's flow is the one its manifest record names (``tsmtrain prepare --flow``);
    a dataset that tsmtrain rendered (``data.generate``) keeps its flow beside each video, with
    the settings in ``root/.flow.json`` (:func:`tsmtrain.prep.flow_files.flow_of_dataset`). Prepared
    flow files without a recorded ``flow_crc32`` (a manifest older than the checksums) are
    logged once, as a warning: they are read unchecked.

    Returns:
        ``{video path: flow file path}``.

    Raises:
        DataError: a video has no flow, or its flow was computed with other settings than the
            recipe's ``data.flow_method``, ``flow_preset`` (DIS) and ``flow_bound``; the message
            counts them and names the first.
    """
    flows = find_flows(root, records, prepared, method, preset, bound)
    missing, other = flows.missing, flows.other
    if missing:
        raise DataError(f"data.modality: flow: {len(missing)} of {len(records)} videos have no optical flow, first "
                        f"{missing[0]}; prepare them with tsmtrain prepare --flow {method} (the folder it writes is "
                        f"data.root)")
    unchecked = [r.path for r in records if (prepared.get(r.path) or {}).get("flow")
                 and "flow_crc32" not in prepared[r.path]]
    if unchecked:
        log.warning("data.modality: flow: %d of %d videos' flow files have no checksum in the manifest (prepared "
                    "before flow checksums were recorded), first %s: they are read without an integrity check; "
                    "prepare them again into a new folder to add checksums", len(unchecked), len(records),
                    unchecked[0])
    if other:
        path, (m, p, b) = other[0]
        raise DataError(f"data.modality: flow: {len(other)} videos' flow was computed with --flow {m} "
                        f"--flow-preset {p} --flow-bound {b}, first {path}; the recipe says data.flow_method: "
                        f"{method}, data.flow_preset: {preset}, data.flow_bound: {bound} (set them to match, or "
                        f"prepare again)")
    return flows.found


def flow_settings(data) -> dict:
    """``{"method", "preset", "bound"}`` of a recipe's ``data`` section (``flow_method``,
    ``flow_preset``, ``flow_bound``)."""
    return {"method": data.flow_method, "preset": data.flow_preset, "bound": data.flow_bound}


def _flows(recipe, records: list[VideoRecord], prepared: dict[str, dict], store) -> dict[str, str] | None:
    """:func:`flow_files` for ``data.modality: flow`` (refused with shards), else None."""
    d = recipe.data
    if d.modality != "flow":
        return None
    if store is not None:
        raise DataError(f"data.modality: flow: data.root {d.root} is a shard index, and flow is not stored in "
                        "shards yet: prepare files (tsmtrain prepare --flow, without --shards)")
    return flow_files(d.root, records, prepared, **flow_settings(d))


@functools.lru_cache(maxsize=None)
def decoding_target(decoder: str, decode_device: str, training_device: torch.device) -> tuple[str, str]:
    """Which backend decodes where on this rank: the recipe's ``data.decoder`` and
    ``data.decode_device``, checked once per process.

    ``decode_device: cuda`` decodes on the rank's own GPU (``training_device``) when a probe
    decodes a 2-frame H.264 clip there (:func:`~tsmtrain.data.decoding.probe_gpu_decoding`).
    When it cannot (no NVDEC, a CPU-only torchcodec, PyNvVideoCodec without a driver), it warns
    once and decodes on the CPU in the loader workers instead (pynvvideocodec, GPU-only, is then
    replaced by torchcodec).

    Args:
        decoder: ``data.decoder``.
        decode_device: ``"cpu"`` or ``"cuda"``.
        training_device: the device this rank trains on.

    Returns:
        ``(backend, device)``: e.g. ``("pynvvideocodec", "cuda:0")``, ``("torchcodec", "cpu")``.

    Raises:
        DataError: ``data.decoder: pynvvideocodec`` on a rank that trains on the CPU (there is no
            GPU to decode on: the recipe must choose a CPU decoder).
    """
    if decode_device == "cpu":
        return decoder, "cpu"
    if training_device.type != "cuda":
        if decoder in GPU_ONLY:
            raise DataError(f"data.decoder: {decoder} decodes on an NVIDIA GPU (NVDEC) and this rank trains on "
                            f"{training_device}: set data.decoder: torchcodec and data.decode_device: cpu, or train "
                            f"on a GPU (train.device: cuda)")
        reason = f"this rank trains on {training_device}, not on a GPU"
    else:
        reason = probe_gpu_decoding(decoder, str(training_device))
    if reason is None:
        return decoder, str(training_device)
    fallback = "torchcodec" if decoder in GPU_ONLY else decoder
    warnings.warn(f"data.decoder: {decoder} with data.decode_device: cuda: {reason}; decoding with {fallback} "
                  f"on the CPU instead", stacklevel=2)
    return fallback, "cpu"


def clip_dataset(recipe, records: list[VideoRecord], train: bool, decode_device: str = "cpu",
                 decoder: str | None = None, replace: bool = True) -> VideoClipDataset:
    """The clip dataset a recipe's ``data`` section describes (a :class:`tsmtrain.recipe.Recipe`),
    for training or evaluation.

    ``decode_device`` and ``decoder`` say where frames are decoded and with which backend
    (default: ``data.decoder`` on the CPU; for a rank, :func:`decoding_target`); ``data.root`` is
    a folder of files or a shard index (:func:`create_reader`, whose errors this raises);
    ``replace``: as :class:`VideoClipDataset` (False for validation). With
    ``data.modality: flow`` every video's flow is found first (:func:`flow_files`, whose
    DataError this raises; flow in shards is refused).
    """
    d = recipe.data
    prepared, store = create_reader(d.root, records)
    return VideoClipDataset(records, d.num_segments, train=train, decoder=decoder or d.decoder, frame_size=d.frame_size,
                            max_retries=d.max_retries, seed=recipe.train.seed, seek_mode=d.seek_mode,
                            prepared=prepared, device=decode_device, short_side=short_side(d), store=store,
                            modality=modality_of(d), flows=_flows(recipe, records, prepared, store), replace=replace)


def short_side(data) -> int:
    """The short side S in pixels that a recipe's ``data`` section resizes videos to when it sets no
    ``frame_size``: ``data.short_side``, else ``input_size * 256 / 224`` rounded (the 256-pixel
    resize before a 224-pixel crop of TSM and mmaction2)."""
    return data.short_side or round(data.input_size * 256 / 224)


class MultiClipDataset(VideoClipDataset):
    """K test clips of T frames from each video of a list, for ``tsmtrain test`` and ``predict``.

    Item ``i`` is video ``i``, never another one: a test set must not change. The K*T*F frame
    indices (:func:`~tsmtrain.data.sampling.multi_snippet_indices`; F frames per segment of the
    modality, 1 for RGB) are decoded in one call, each distinct frame once. Each item is a dict:
    ``frames`` uint8 ``(K, T*F, H, W, C)`` (``(K, T, H, W, 3)`` for RGB), or ``None``
    when the video cannot be opened or decoded; ``label`` int; ``index`` int; ``error`` ``None``
    or the reason (path included) the video could not be read.

    Args:
        records: the videos.
        num_segments: T.
        num_clips: K.
        decoder, frame_size, seek_mode, prepared, device, short_side, store, modality, flows,
            flow_settings: as :class:`VideoClipDataset` (without ``frame_size``, the centre square of
            each video resized to ``short_side``).
    """

    def __init__(self, records: list[VideoRecord], num_segments: int, num_clips: int = 1, decoder: str = "torchcodec",
                 frame_size: tuple[int, int] | None = None, seek_mode: str = "auto",
                 prepared: dict[str, dict] | None = None, device: str = "cpu", short_side: int | None = None,
                 store: TarShardReader | None = None, modality: Modality = RGB, flows: dict[str, str] | None = None,
                 flow_settings: dict | None = None):
        super().__init__(records, num_segments, train=False, decoder=decoder, frame_size=frame_size, max_retries=0,
                         seek_mode=seek_mode, prepared=prepared, device=device, short_side=short_side, store=store,
                         modality=modality, flows=flows, flow_settings=flow_settings)
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.num_clips = num_clips

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        record = self.records[index]
        try:
            video = self.source(record.path)
            idx = multi_snippet_indices(video.num_frames, self.num_segments, self.num_clips,
                                        self.modality.frames_per_segment).reshape(self.num_clips, -1)  # (K, T*F)
            distinct, where = np.unique(idx, return_inverse=True)
            frames = video.frames(distinct.tolist())[torch.as_tensor(where.reshape(-1))]
            frames = self.crop_square(frames.reshape(*idx.shape, *frames.shape[1:]), None)  # (K, T*F, H, W, C)
            return {"frames": frames, "label": record.label, "index": index, "error": None,
                    "opened": self.take_opened()}
        except VideoDecodeError as exc:
            return {"frames": None, "label": record.label, "index": index, "error": str(exc),
                    "opened": self.take_opened()}


def multi_clip_dataset(recipe, records: list[VideoRecord], num_clips: int, decode_device: str = "cpu",
                       decoder: str | None = None, compute_flow: bool = False) -> MultiClipDataset:
    """The :class:`MultiClipDataset` of a recipe's ``data`` section (decoder, frame size, seek mode,
    modality, files or shards of ``data.root``: :func:`create_reader`, whose errors this raises)
    with K = ``num_clips``; ``decode_device`` and ``decoder`` as :func:`clip_dataset`.

    With ``data.modality: flow`` the videos' flow files are found first (:func:`flow_files`, whose
    DataError this raises), unless ``compute_flow``: then a video's prepared flow is read when it
    has one, and the others' flow is computed as they are read, with the recipe's flow settings
    (``tsmtrain predict`` on any video file)."""
    d = recipe.data
    prepared, store = create_reader(d.root, records)
    if compute_flow and d.modality == "flow":
        known = [r for r in records if (prepared.get(r.path) or {}).get("flow")]
        flows, settings = flow_files(d.root, known, prepared, **flow_settings(d)), flow_settings(d)
    else:
        flows, settings = _flows(recipe, records, prepared, store), None
    return MultiClipDataset(records, d.num_segments, num_clips, decoder=decoder or d.decoder, frame_size=d.frame_size,
                            seek_mode=d.seek_mode, prepared=prepared, device=decode_device,
                            short_side=short_side(d), store=store, modality=modality_of(d), flows=flows,
                            flow_settings=settings)


def _check_one_frame_size(items: list[dict], what: str, hw: slice) -> None:
    """Raise DataError naming two videos if ``items``' frames differ in shape (``hw``: where
    H and W sit in a frames tensor's shape), asking for ``data.frame_size``."""
    if len({tuple(it["frames"].shape) for it in items}) > 1:
        a, b = items[0], next(it for it in items if it["frames"].shape != items[0]["frames"].shape)
        raise DataError(
            f"{what} of different frame sizes cannot be batched: video #{a['index']} is "
            f"{tuple(a['frames'].shape[hw])}, video #{b['index']} is {tuple(b['frames'].shape[hw])}; set "
            f"data.frame_size: [H, W] in the recipe"
        )


def collate_views(items: list[dict]) -> dict:
    """Batch :class:`MultiClipDataset` items: ``frames`` uint8 ``(N, K, T, H, W, 3)`` of the N
    readable videos (``None`` when there is none), ``index`` and ``label`` int64 ``(N,)`` of
    those, and ``failed``: ``(index, label, error)`` of each unreadable one.

    Raises:
        DataError: videos differ in frame size; the message names two of them and asks for
            ``data.frame_size``.
    """
    ok = [it for it in items if it["frames"] is not None]
    failed = [(it["index"], it["label"], it["error"]) for it in items if it["frames"] is None]
    _check_one_frame_size(ok, "videos", slice(2, 4))
    return {
        "frames": torch.stack([it["frames"] for it in ok]) if ok else None,
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in ok], dtype=torch.int64),
        "failed": failed,
    }


class RankSampler(Sampler):
    """This rank's share of an epoch, as ``(index, epoch)`` pairs.

    The whole list is permuted with a generator seeded by ``seed + epoch`` (identical on all
    ranks), padded by wrapping around to a multiple of ``world_size``, and rank r takes
    positions r, r + world_size, ... (the scheme of ``torch.utils.data.DistributedSampler``).
    For training every rank therefore gets the same number of clips, so the ranks take the same
    number of allreduce steps. ``skip`` drops the first clips of the epoch on this rank: a run
    resumed in the middle of an epoch continues where it stopped.

    Args:
        size: number of videos in the list.
        rank, world_size: this rank and the number of ranks.
        shuffle: permute each epoch (training) or keep list order (evaluation).
        pad: pad so all ranks have equal parts (training); without it, parts may differ by one.
        seed: base seed.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, pad: bool = True, seed: int = 0):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.pad, self.seed = shuffle, pad, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch (the permutation) and how many of this rank's clips to skip."""
        self.epoch, self.skip = epoch, skip

    def state_dict(self) -> dict:
        """Where this rank is in the sample order: what a checkpoint needs to continue it."""
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed, "size": self.size,
                "world_size": self.world_size, "shuffle": self.shuffle, "pad": self.pad}

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, before ``skip``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.skip :]])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.skip)


class ShapeBatchSampler(Sampler):
    """Batches of a :class:`RankSampler` whose size and clip length change from batch to batch
    (multigrid training, :mod:`tsmtrain.train.multigrid`): batch k of an epoch has
    ``shapes(epoch)[k] = (batch, segments)``, its keys ``(index, epoch, segments)``; the clips left
    over after the last whole batch are dropped.

    Args:
        sampler: this rank's sample order; :meth:`set_epoch` sets its epoch and skip.
        shapes: ``epoch -> [(batch, segments), ...]``, the epoch's batches in order (the same on
            every rank).
    """

    def __init__(self, sampler: RankSampler, shapes):
        self.sampler, self.shapes = sampler, shapes
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Choose the epoch and the batches of it already done (a resumed run): the sampler skips
        their clips."""
        self.epoch, self.start = epoch, batches_done
        self.sampler.set_epoch(epoch, skip=sum(b for b, _ in self.shapes(epoch)[:batches_done]))

    def __iter__(self):
        keys = iter(self.sampler)
        for batch, segments in self.shapes(self.epoch)[self.start:]:
            yield [(index, epoch, segments) for index, epoch in itertools.islice(keys, batch)]

    def __len__(self) -> int:
        return max(0, len(self.shapes(self.epoch)) - self.start)


def collate_clips(items: list[dict]) -> dict:
    """Stack items into a batch: ``frames`` uint8 ``(N, T, H, W, 3)``, ``label`` int64 ``(N,)``,
    ``labels`` every label of each clip (a tuple per clip: several for a multi-label list), ``failed`` the list of every video that could not be decoded for this batch, ``opened`` the
    files opened for it and ``worker`` the loader worker that made it (-1: this process). In a
    loader worker the frames are stacked into shared memory, so the batch is copied once, not twice.

    Items of videos that could not be read and were not replaced (``frames`` None, validation)
    are left out of N and listed in ``unread``: ``(label, labels)`` of each; ``frames`` is None
    when no video of the batch could be read.

    Raises:
        DataError: clips differ in frame size; the message names two of the videos and asks
            for ``data.frame_size``.
    """
    unread = [(it["label"], it.get("labels", (it["label"],))) for it in items if it["frames"] is None]
    failed = [path for it in items for path in it["failed"]]
    opened = [path for it in items for path in it.get("opened", ())]
    items = [it for it in items if it["frames"] is not None]
    _check_one_frame_size(items, "clips", slice(1, 3))
    frames = [it["frames"] for it in items]
    out = None
    if frames and torch.utils.data.get_worker_info() is not None and frames[0].device.type == "cpu":
        # in a loader worker, stack straight into shared memory (as torch's default_collate
        # does): the batch then crosses to the training process without another copy
        storage = frames[0].untyped_storage()._new_shared(len(frames) * frames[0].nbytes)
        out = frames[0].new(storage).view(len(frames), *frames[0].shape)
    return {
        "frames": torch.stack(frames, out=out) if frames else None,
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "labels": [it.get("labels", (it["label"],)) for it in items],
        "failed": failed,
        "opened": opened,
        "worker": _worker_id(),
        "unread": unread,
    }


def _worker_id() -> int:
    return info.id if (info := torch.utils.data.get_worker_info()) is not None else -1


def collate_encoded(items: list[dict]) -> dict:
    """A batch of encoded items (:meth:`VideoClipDataset.fetch`, for decoding on the GPU):
    ``{"items": items, "worker": id}``; :func:`decode_batch` makes it a batch of clips."""
    return {"items": items, "worker": _worker_id()}


def decode_batch(dataset: VideoClipDataset, batch: dict) -> dict:
    """Decode a :func:`collate_encoded` batch on ``dataset.device``
    (:meth:`VideoClipDataset.decode_item`), into what :func:`collate_clips` returns, with
    ``frames`` ``(N, T, H, W, 3)`` uint8 on the GPU.

    Raises:
        DataError: as :meth:`VideoClipDataset.decode_item` and :func:`collate_clips`.
    """
    return {**collate_clips([dataset.decode_item(item) for item in batch["items"]]), "worker": batch["worker"]}


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _worker_init(parent: int, worker_id: int) -> None:
    """Run in each loader worker as it starts.

    Slurm signals every process of a job step, loader workers included (SIGUSR2 before the time
    limit, SIGTERM on scancel or preemption); the stop request is the training process's business
    (:mod:`tsmtrain.train`), and either signal's default action would kill the worker, so both
    are ignored here. The worker still ends with its training process: the kernel sends it
    SIGKILL when the process that started it dies (``PR_SET_PDEATHSIG``; checked against
    ``parent`` in case that happened before the call), and a loader shutting its workers down
    kills them (:class:`_WorkerContext`).
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the training process died before the prctl
        os._exit(1)


BIRTH_TIMEOUT_S = 10.0
"""Seconds a forked loader worker has to get through Python's after-fork set-up (it takes
milliseconds) before it is taken for stuck there, killed, and forked again."""

BIRTH_ATTEMPTS = 3
"""Forks of one loader worker before :class:`LoaderStalled` is raised."""

_birth_fds: tuple[int, int] | None = None  # (read, write) of the pipe of the fork in progress


def _announce_birth() -> None:
    """In the child of a worker's fork, at the end of CPython's after-fork set-up: say so."""
    if _birth_fds is not None:
        read, write = _birth_fds
        try:
            os.write(write, b"1")
            os.close(write)
            os.close(read)
        except OSError:
            pass


os.register_at_fork(after_in_child=lambda: _announce_birth())  # (looked up at each fork: tests replace it)


class _KillingPopen(_ForkPopen):
    """A forked loader worker that is known to have started, and whose ``terminate()`` is SIGKILL.

    **Started.** CPython 3.11's after-fork set-up in the child can wait for ever on a lock that
    another thread of the parent held at the moment of the fork (``PyOS_AfterFork_Child`` ->
    ``_PyEval_ReInitThreads`` -> ``_PyThreadState_DeleteExcept``; the training process runs
    Gloo's, Horovod's, the watchdog's and TensorBoard's threads). Such a child never runs a line
    of Python, and its rank would wait for it until the job's time limit. So each fork waits until
    the child's after-fork hooks have run (:func:`_announce_birth` writes to a pipe); a child
    silent for :data:`BIRTH_TIMEOUT_S` is killed, reaped and forked again, up to
    :data:`BIRTH_ATTEMPTS` times, with a warning naming it.

    **Ended.** Loader workers ignore SIGTERM (see :func:`_worker_init`), so the SIGTERM that
    DataLoader's shutdown and multiprocessing's exit handler send would leave them, and the exit
    handler joining them, waiting for ever.

    Raises:
        LoaderStalled: no fork of the worker got through its set-up.
    """

    def _launch(self, process_obj) -> None:
        global _birth_fds
        for attempt in range(1, BIRTH_ATTEMPTS + 1):
            read, write = _birth_fds = os.pipe()
            try:
                super()._launch(process_obj)
            finally:
                _birth_fds = None
                os.close(write)
            try:
                poll = select.poll()  # (select.select refuses descriptors above 1023)
                poll.register(read, select.POLLIN)
                born = bool(poll.poll(BIRTH_TIMEOUT_S * 1000)) and os.read(read, 1) == b"1"
            finally:
                os.close(read)
            if born:
                return
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.finalizer()  # the pipes of this fork
            self.finalizer = None
            log.warning("loader worker process %d was stuck in Python's after-fork set-up for %g s (a lock another "
                        "thread held at the fork); killed%s", self.pid, BIRTH_TIMEOUT_S,
                        ", forking it again" if attempt < BIRTH_ATTEMPTS else "")
        raise LoaderStalled(f"data loading: {BIRTH_ATTEMPTS} forks in a row of a loader worker were stuck in "
                            "Python's after-fork set-up (a lock another thread held at the fork); this process "
                            "stops rather than wait for ever")

    def terminate(self) -> None:
        self.kill()


class _WorkerProcess(multiprocessing.context.ForkProcess):
    @staticmethod
    def _Popen(process_obj):
        return _KillingPopen(process_obj)


class _WorkerContext(multiprocessing.context.ForkContext):
    """The ``fork`` start method, with workers that :class:`_KillingPopen` ends."""

    Process = _WorkerProcess


_live_iterators: "weakref.WeakSet" = weakref.WeakSet()

WORKER_TIMEOUT_S = 600.0
"""Seconds a process waits for its next batch from live loader workers before it raises
:class:`LoaderStalled` (DataLoader's ``timeout``; NCCL's default collective timeout is as long).
A batch of clips takes seconds; without a limit a stuck worker would hold its rank, and the
whole job with it, until the time limit."""


class _StallNamingIter(_MultiProcessingDataLoaderIter):
    """torch's multi-process iterator, whose timeout names the stuck worker (:class:`LoaderStalled`)."""

    def _get_data(self):
        try:
            return super()._get_data()
        except RuntimeError as err:
            if not str(err).startswith("DataLoader timed out"):
                raise
            owed = self._task_info.get(self._rcvd_idx, ())
            worker = owed[0] if owed else None
            who = (f"worker {worker} (process {self._workers[worker].pid})" if worker is not None
                   else "workers (processes " + ", ".join(str(w.pid) for w in self._workers) + ")")
            raise LoaderStalled(f"data loading: no batch from {who} for {self._timeout:g} s while it is alive: it "
                                "is stuck (a read that never returns on the file system, or a decoder that hangs); "
                                "this process stops rather than wait for ever") from None


class _Loader(DataLoader):
    """A DataLoader whose multi-process iterators :func:`shutdown_loaders` can find, and whose
    timeout names the stuck worker."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        iterator = _StallNamingIter(self)
        _live_iterators.add(iterator)
        return iterator


def shutdown_loaders() -> None:
    """Shut down the workers of every loader iterator still alive in this process (each is
    asked to stop, given a moment, then killed; see torch's ``_shutdown_workers``).

    Registered with :mod:`atexit` after :mod:`multiprocessing`, so it runs before
    multiprocessing's exit handler joins the workers: after an exception an iterator can stay
    referenced by the traceback, and its workers would otherwise never be told to stop.
    """
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()
        except Exception:  # shutting down: nothing to report to
            pass


atexit.register(shutdown_loaders)


def build_loader(dataset: VideoClipDataset, sampler: RankSampler | ShapeBatchSampler, batch_size: int, workers: int,
                 drop_last: bool, pin_memory: bool = False, persistent: bool = False,
                 collate=collate_clips, timeout_s: float = WORKER_TIMEOUT_S) -> DataLoader | DecodeAhead:
    """A DataLoader over ``dataset`` in ``sampler`` order, batching with :func:`collate_clips`.

    Each worker keeps ``prefetch_factor`` = 4 batches in flight. With ``persistent`` the worker
    processes (and their open decoders' libraries) live as long as the loader, so a new epoch
    starts without forking and warming up new workers: iterate the same loader again after
    ``sampler.set_epoch``. ``collate`` batches the items (:func:`collate_views` for a
    :class:`MultiClipDataset`). Items depend only on ``(index, epoch)``, not on the worker that
    loads them, so persistence changes no clip. ``pin_memory`` puts batches in page-locked
    host memory for asynchronous copies to a GPU.

    A :class:`ShapeBatchSampler` as ``sampler`` makes the batches itself (``batch_size`` and
    ``drop_last`` are then not used).

    A dataset that decodes on a GPU (``dataset.device`` not ``"cpu"``) is decoded in this process,
    where the CUDA context is (it cannot cross a fork): the workers only read each video's bytes
    (:func:`collate_encoded`), and the loader returned is a
    :class:`~tsmtrain.data.decode_ahead.DecodeAhead` that decodes batch k+1 on its own CUDA stream
    while batch k trains (:func:`decode_batch`). A :class:`MultiClipDataset` on a GPU is read and
    decoded in this process, without workers.

    It seeds its workers from a private generator, never from the global torch RNG, so that
    creating a loader does not shift the random stream that dropout draws from (exact resume).

    Workers ignore SIGUSR2 and SIGTERM (Slurm's stop request is the training process's) but die
    with the training process, and are killed when the loader shuts down or the process exits
    (see the module's docstring); so an exception, in a worker or in the training process,
    ends the process instead of leaving it waiting for its workers.

    Raises (while iterating, with workers):
        LoaderStalled: no batch for ``timeout_s`` seconds (default :data:`WORKER_TIMEOUT_S`)
            from a worker that is still alive.
    """
    ahead = getattr(dataset, "decodes_on_gpu", False) and not isinstance(dataset, MultiClipDataset)
    if ahead:
        collate, pin_memory = collate_encoded, False
    elif str(getattr(dataset, "device", "cpu")) != "cpu":
        workers, pin_memory = 0, False
    batching = ({"batch_sampler": sampler} if isinstance(sampler, ShapeBatchSampler) else
                {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last})
    loader = _Loader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
        multiprocessing_context=_WorkerContext() if workers else None,
        timeout=timeout_s if workers else 0,
    )
    return DecodeAhead(loader, functools.partial(decode_batch, dataset), dataset.device) if ahead else loader
