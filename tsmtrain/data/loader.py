"""The clip dataset, the per-rank shard sampler and the loader.

Each item is a clip of T frames chosen by segment sampling (:mod:`tsmtrain.data.sampling`),
decoded from the video file (only those frames; :mod:`tsmtrain.data.decoding`) as uint8
``(T, H, W, 3)``. Augmentation happens later, batched on the training device
(:mod:`tsmtrain.data.transforms`). A video that cannot be opened or decoded is logged by path,
counted, and replaced by another video of the list, so one bad file never stops training.
"""

from __future__ import annotations

import logging
import math
import signal
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .decoding import Video, VideoDecodeError, choose_seek_mode, open_video
from .lists import VideoRecord
from .sampling import multi_clip_indices, segment_indices

__all__ = ["VideoClipDataset", "ShardSampler", "collate_clips", "build_loader", "prepared_videos", "clip_dataset",
           "MultiClipDataset", "multi_clip_dataset", "collate_views"]

log = logging.getLogger(__name__)


class VideoClipDataset(Dataset):
    """Clips of ``num_segments`` frames from the videos of a list file.

    Items are indexed by ``(index, epoch)`` pairs (as :class:`ShardSampler` yields them) or
    plain indices (epoch 0). Training offsets are drawn from a generator seeded by
    ``(seed, epoch, index)``, so a clip does not depend on which worker loads it, and a run
    resumed mid-epoch sees the same clips.

    Each item is a dict: ``frames`` uint8 ``(T, H, W, 3)`` on :attr:`device`, ``label`` int,
    ``index`` int (the video finally used), ``failed`` list of paths that could not be decoded
    on the way.

    Args:
        records: the videos.
        num_segments: T.
        train: random (True) or central (False) frame in each segment.
        decoder: ``"torchcodec"`` or ``"decord"``.
        frame_size: ``(H, W)`` in pixels that the decoder resizes every frame to (needed when
            videos differ in size); None: frames as stored.
        max_retries: unreadable videos replaced in a row before giving up.
        seed: base seed for the sampling offsets.
        seek_mode: torchcodec's seek mode setting, ``"auto"`` (approximate for the videos in
            ``prepared``, exact for the others; :func:`~tsmtrain.data.decoding.choose_seek_mode`),
            ``"exact"`` or ``"approximate"``.
        prepared: ``{video path: manifest record}`` of the videos ``tsmtrain prepare`` wrote
            (:func:`prepared_videos`); their frame counts are checked against the record, and
            with exact seeking their stored frame mappings spare the scan at open.
        device: ``"cpu"``, or a CUDA device to decode on with NVDEC (in the training process:
            :func:`build_loader` then uses no worker processes).

    Raises (from ``__getitem__``):
        RuntimeError: ``max_retries + 1`` videos in a row could not be decoded.
    """

    def __init__(self, records: list[VideoRecord], num_segments: int, train: bool, decoder: str = "torchcodec",
                 frame_size: tuple[int, int] | None = None, max_retries: int = 10, seed: int = 0,
                 seek_mode: str = "auto", prepared: dict[str, dict] | None = None, device: str = "cpu"):
        self.records, self.num_segments, self.train = records, num_segments, train
        self.decoder, self.frame_size, self.max_retries, self.seed = decoder, frame_size, max_retries, seed
        self.seek_mode, self.prepared, self.device = seek_mode, prepared or {}, device

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        failed = []
        for attempt in range(self.max_retries + 1):
            record = self.records[index]
            try:
                frames = self._load(record, index, epoch)
                return {"frames": frames, "label": record.label, "index": index, "failed": failed}
            except VideoDecodeError as exc:
                failed.append(str(exc))
                # deterministic replacement, spread over the list
                index = (index + 1 + zlib.crc32(f"{index}:{attempt}".encode()) % max(1, len(self) - 1)) % len(self)
        raise RuntimeError(
            f"{len(failed)} videos in a row could not be decoded (data.max_retries={self.max_retries}); last: {failed[-1]}"
        )

    def open(self, path: str) -> Video:
        """Open one video the way this dataset reads it (backend, size, seek mode, device).

        Raises:
            VideoDecodeError: the file cannot be opened, or a prepared file's frame count
                differs from its manifest record (it was changed after ``tsmtrain prepare``).
        """
        options = {"size": self.frame_size}
        entry = self.prepared.get(path)
        if self.decoder == "torchcodec":
            options["device"] = self.device
            mode = choose_seek_mode(self.seek_mode, entry is not None)
            if mode == "exact" and entry and entry.get("frame_mappings"):
                options["frame_mappings"] = entry["frame_mappings"]
            else:
                options["seek_mode"] = mode
        video = open_video(path, self.decoder, **options)
        if entry is not None and entry.get("frames") not in (None, video.num_frames):
            raise VideoDecodeError(path, f"{video.num_frames} frames, but tsmtrain prepare recorded {entry['frames']}; "
                                         f"prepare it again")
        return video

    def _load(self, record: VideoRecord, index: int, epoch: int) -> torch.Tensor:
        video = self.open(record.path)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.train else None
        idx = segment_indices(video.num_frames, self.num_segments, self.train, rng)
        return video.frames(idx.tolist())  # (T, H, W, 3) uint8


def prepared_videos(root: str | Path) -> dict[str, dict]:
    """The videos that ``tsmtrain prepare`` wrote into ``root``, from its manifest.

    Returns:
        ``{str(root / output): record}`` for every record with status ok, its
        ``frame_mappings`` made a full path too; an empty dict when ``root`` holds no manifest.

    Raises:
        ValueError: the manifest is malformed (the message names file and line).
    """
    from .prepare import MANIFEST, read_manifest

    root = Path(root)
    if not (root / MANIFEST).is_file():
        return {}
    videos = {}
    for output, record in read_manifest(root).items():
        record = dict(record)
        if record.get("frame_mappings"):
            record["frame_mappings"] = str(root / record["frame_mappings"])
        videos[str(root / output)] = record
    return videos


def clip_dataset(recipe, records: list[VideoRecord], train: bool, decode_device: str = "cpu") -> VideoClipDataset:
    """The clip dataset a recipe's ``data`` section describes (a :class:`tsmtrain.recipe.Recipe`),
    for training or evaluation.

    ``decode_device`` is where frames are decoded (``cpu`` or the rank's ``cuda:N``, from
    :func:`tsmtrain.data.decoding.cuda_decoding_device`); videos that ``tsmtrain prepare`` wrote
    into ``data.root`` are found in its manifest (:func:`prepared_videos`).
    """
    d = recipe.data
    return VideoClipDataset(records, d.num_segments, train=train, decoder=d.decoder, frame_size=d.frame_size,
                            max_retries=d.max_retries, seed=recipe.train.seed, seek_mode=d.seek_mode,
                            prepared=prepared_videos(d.root), device=decode_device)


class MultiClipDataset(VideoClipDataset):
    """K test clips of T frames from each video of a list, for ``tsmtrain test`` and ``predict``.

    Item ``i`` is video ``i``, never another one: a test set must not change. The K*T frame
    indices (:func:`~tsmtrain.data.sampling.multi_clip_indices`) are decoded in one call, each
    distinct frame once. Each item is a dict: ``frames`` uint8 ``(K, T, H, W, 3)``, or ``None``
    when the video cannot be opened or decoded; ``label`` int; ``index`` int; ``error`` ``None``
    or the reason (path included) the video could not be read.

    Args:
        records: the videos.
        num_segments: T.
        num_clips: K.
        decoder, frame_size, seek_mode, prepared, device: as :class:`VideoClipDataset`.
    """

    def __init__(self, records: list[VideoRecord], num_segments: int, num_clips: int = 1, decoder: str = "torchcodec",
                 frame_size: tuple[int, int] | None = None, seek_mode: str = "auto",
                 prepared: dict[str, dict] | None = None, device: str = "cpu"):
        super().__init__(records, num_segments, train=False, decoder=decoder, frame_size=frame_size, max_retries=0,
                         seek_mode=seek_mode, prepared=prepared, device=device)
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.num_clips = num_clips

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        record = self.records[index]
        try:
            video = self.open(record.path)
            idx = multi_clip_indices(video.num_frames, self.num_segments, self.num_clips)  # (K, T)
            distinct, where = np.unique(idx, return_inverse=True)
            frames = video.frames(distinct.tolist())[torch.as_tensor(where.reshape(-1))]
            frames = frames.reshape(*idx.shape, *frames.shape[1:])  # (K, T, H, W, 3)
            return {"frames": frames, "label": record.label, "index": index, "error": None}
        except VideoDecodeError as exc:
            return {"frames": None, "label": record.label, "index": index, "error": str(exc)}


def multi_clip_dataset(recipe, records: list[VideoRecord], num_clips: int, decode_device: str = "cpu") -> MultiClipDataset:
    """The :class:`MultiClipDataset` of a recipe's ``data`` section (decoder, frame size, seek mode,
    prepared videos in ``data.root``) with K = ``num_clips``."""
    d = recipe.data
    return MultiClipDataset(records, d.num_segments, num_clips, decoder=d.decoder, frame_size=d.frame_size,
                            seek_mode=d.seek_mode, prepared=prepared_videos(d.root), device=decode_device)


def _check_one_frame_size(items: list[dict], what: str, hw: slice) -> None:
    """Raise ValueError naming two videos if ``items``' frames differ in shape (``hw``: where
    H and W sit in a frames tensor's shape), asking for ``data.frame_size``."""
    if len({tuple(it["frames"].shape) for it in items}) > 1:
        a, b = items[0], next(it for it in items if it["frames"].shape != items[0]["frames"].shape)
        raise ValueError(
            f"{what} of different frame sizes cannot be batched: video #{a['index']} is "
            f"{tuple(a['frames'].shape[hw])}, video #{b['index']} is {tuple(b['frames'].shape[hw])}; set "
            f"data.frame_size: [H, W] in the recipe"
        )


def collate_views(items: list[dict]) -> dict:
    """Batch :class:`MultiClipDataset` items: ``frames`` uint8 ``(N, K, T, H, W, 3)`` of the N
    readable videos (``None`` when there is none), ``index`` and ``label`` int64 ``(N,)`` of
    those, and ``failed``: ``(index, label, error)`` of each unreadable one.

    Raises:
        ValueError: videos differ in frame size; the message names two of them and asks for
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


class ShardSampler(Sampler):
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
        pad: pad so all ranks have equal shares (training); without it, shards may differ by one.
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

    def shard(self) -> list[int]:
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
        return iter([(i, self.epoch) for i in self.shard()[self.skip :]])

    def __len__(self) -> int:
        return max(0, len(self.shard()) - self.skip)


def collate_clips(items: list[dict]) -> dict:
    """Stack items into a batch: ``frames`` uint8 ``(N, T, H, W, 3)``, ``label`` int64 ``(N,)``,
    ``failed`` the list of every video that could not be decoded for this batch. In a loader
    worker the frames are stacked into shared memory, so the batch is copied once, not twice.

    Raises:
        ValueError: clips differ in frame size; the message names two of the videos and asks
            for ``data.frame_size``.
    """
    _check_one_frame_size(items, "clips", slice(1, 3))
    frames = [it["frames"] for it in items]
    out = None
    if torch.utils.data.get_worker_info() is not None and frames[0].device.type == "cpu":
        # in a loader worker, stack straight into shared memory (as torch's default_collate
        # does): the batch then crosses to the training process without another copy
        storage = frames[0].untyped_storage()._new_shared(len(frames) * frames[0].nbytes)
        out = frames[0].new(storage).view(len(frames), *frames[0].shape)
    return {
        "frames": torch.stack(frames, out=out),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "failed": [path for it in items for path in it["failed"]],
    }


def _ignore_stop_signal(worker_id: int) -> None:
    # Slurm signals every process of a job step, loader workers included (SIGUSR2 before the time
    # limit, SIGTERM on scancel or preemption); the stop request is the training process's
    # business (tsmtrain.train), and either signal's default action would kill the worker. A
    # worker still ends with its training process (DataLoader's watchdog) or on SIGKILL.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: VideoClipDataset, sampler: ShardSampler, batch_size: int, workers: int,
                 drop_last: bool, pin_memory: bool = False, persistent: bool = False, collate=collate_clips) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler`` order, batching with :func:`collate_clips`.

    Each worker keeps ``prefetch_factor`` = 4 batches in flight. With ``persistent`` the worker
    processes (and their open decoders' libraries) live as long as the loader, so a new epoch
    starts without forking and warming up new workers: iterate the same loader again after
    ``sampler.set_epoch``. ``collate`` batches the items (:func:`collate_views` for a
    :class:`MultiClipDataset`). Items depend only on ``(index, epoch)``, not on the worker that
    loads them, so persistence changes no clip. ``pin_memory`` puts batches in page-locked
    host memory for asynchronous copies to a GPU.

    A dataset that decodes on a GPU (``dataset.device`` not ``"cpu"``) is read in this process,
    without workers: NVDEC decodes asynchronously, and a CUDA context cannot cross a fork.

    It seeds its workers from a private generator, never from the global torch RNG, so that
    creating a loader does not shift the random stream that dropout draws from (exact resume).
    """
    if str(getattr(dataset, "device", "cpu")) != "cpu":
        # a CUDA context created before fork cannot be used in a worker: decode in this process
        workers, pin_memory = 0, False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),
        worker_init_fn=_ignore_stop_signal,
    )
