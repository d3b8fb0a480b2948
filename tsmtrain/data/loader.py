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

from .decoding import VideoDecodeError, open_video
from .lists import VideoRecord
from .sampling import segment_indices

__all__ = ["VideoClipDataset", "ShardSampler", "collate_clips", "build_loader"]

log = logging.getLogger(__name__)


class VideoClipDataset(Dataset):
    """Clips of ``num_segments`` frames from the videos of a list file.

    Items are indexed by ``(index, epoch)`` pairs (as :class:`ShardSampler` yields them) or
    plain indices (epoch 0). Training offsets are drawn from a generator seeded by
    ``(seed, epoch, index)``, so a clip does not depend on which worker loads it, and a run
    resumed mid-epoch sees the same clips.

    Each item is a dict: ``frames`` uint8 ``(T, H, W, 3)``, ``label`` int, ``index`` int (the
    video finally used), ``failed`` list of paths that could not be decoded on the way.

    Args:
        records: the videos.
        num_segments: T.
        train: random (True) or central (False) frame in each segment.
        decoder: ``"decord"`` or ``"torchcodec"``.
        frame_size: ``(H, W)`` to resize every frame to on the CPU (needed when videos differ in size).
        max_retries: unreadable videos replaced in a row before giving up.
        seed: base seed for the sampling offsets.

    Raises (from ``__getitem__``):
        RuntimeError: ``max_retries + 1`` videos in a row could not be decoded.
    """

    def __init__(self, records: list[VideoRecord], num_segments: int, train: bool, decoder: str = "decord",
                 frame_size: tuple[int, int] | None = None, max_retries: int = 10, seed: int = 0):
        self.records, self.num_segments, self.train = records, num_segments, train
        self.decoder, self.frame_size, self.max_retries, self.seed = decoder, frame_size, max_retries, seed

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

    def _load(self, record: VideoRecord, index: int, epoch: int) -> torch.Tensor:
        video = open_video(record.path, self.decoder)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.train else None
        idx = segment_indices(video.num_frames, self.num_segments, self.train, rng)
        frames = torch.from_numpy(np.ascontiguousarray(video.get(idx.tolist())))  # (T, H, W, 3) uint8
        if self.frame_size is not None and tuple(frames.shape[1:3]) != tuple(self.frame_size):
            from torchvision.transforms.v2.functional import resize

            frames = resize(frames.permute(0, 3, 1, 2), list(self.frame_size), antialias=True).permute(0, 2, 3, 1)
        return frames.contiguous()


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
    ``failed`` the list of every video that could not be decoded for this batch.

    Raises:
        ValueError: clips differ in frame size; the message names two of the videos and asks
            for ``data.frame_size``.
    """
    shapes = {tuple(it["frames"].shape) for it in items}
    if len(shapes) > 1:
        a, b = items[0], next(it for it in items if it["frames"].shape != items[0]["frames"].shape)
        raise ValueError(
            f"clips of different frame sizes cannot be batched: video #{a['index']} is {tuple(a['frames'].shape[1:3])}, "
            f"video #{b['index']} is {tuple(b['frames'].shape[1:3])}; set data.frame_size: [H, W] in the recipe"
        )
    return {
        "frames": torch.stack([it["frames"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "failed": [path for it in items for path in it["failed"]],
    }


def _ignore_stop_signal(worker_id: int) -> None:
    # Slurm signals every process of a job step, loader workers included; the stop request is
    # the training process's business (tsmtrain.train), and SIGUSR2's default action would kill
    # the worker.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def build_loader(dataset: VideoClipDataset, sampler: ShardSampler, batch_size: int, workers: int,
                 drop_last: bool, pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler`` order, batching with :func:`collate_clips`.

    Each worker keeps ``prefetch_factor`` = 4 batches in flight. With ``persistent`` the worker
    processes (and their open decoders' libraries) live as long as the loader, so a new epoch
    starts without forking and warming up new workers: iterate the same loader again after
    ``sampler.set_epoch``. Items depend only on ``(index, epoch)``, not on the worker that
    loads them, so persistence changes no clip. ``pin_memory`` puts batches in page-locked
    host memory for asynchronous copies to a GPU.

    It seeds its workers from a private generator, never from the global torch RNG, so that
    creating a loader does not shift the random stream that dropout draws from (exact resume).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_clips,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),
        worker_init_fn=_ignore_stop_signal,
    )
