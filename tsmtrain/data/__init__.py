"""The data path: list files, segment sampling, decoding, the loader, batched augmentation,
video preparation, the data benchmark and the embedded datasets.

Modules, in the order a clip travels through them:

* :mod:`.lists`: list files (``relative/path.ext label``) -> :class:`VideoRecord`
* :mod:`.sampling`: TSN segment sampling -> frame indices
* :mod:`.decoding`: decode only those frames (torchcodec or decord)
* :mod:`.loader`: the clip dataset, the per-rank shard sampler, the DataLoader
* :mod:`.transforms`: batched augmentation on the training device
* :mod:`.synthetic`, :mod:`.arrow`: the embedded datasets (rendered demo, arrow of time)

This package never imports :mod:`tsmtrain.models`.
"""

from .lists import ListFileError, VideoRecord, read_list
from .loader import (DataError, MultiClipDataset, ShardSampler, VideoClipDataset, build_loader, clip_dataset, collate_clips,
                     collate_views, multi_clip_dataset, prepared_videos)

__all__ = ["DataError", "ListFileError", "VideoRecord", "read_list", "ShardSampler", "VideoClipDataset", "build_loader",
           "clip_dataset", "collate_clips", "prepared_videos", "MultiClipDataset", "multi_clip_dataset",
           "collate_views"]
