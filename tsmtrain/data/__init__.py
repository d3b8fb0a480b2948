"""The data path: list files, segment sampling, decoding, the loader, batched augmentation,
video preparation, the data benchmark and the embedded datasets.

Modules, in the order a clip travels through them:

* :mod:`.lists`: list files (``relative/path.ext label``) -> :class:`VideoRecord`
* :mod:`.classes`: label maps (one class name per line) -> class names
* :mod:`.sampling`: TSN segment sampling (a snippet of frames per segment for motion) -> frame indices
* :mod:`.modality`: what a segment holds (RGB, optical flow, RGB difference) and its channels
* :mod:`.flow`: optical flow computed, quantized and stored beside each video (``prepare --flow``)
* :mod:`.decoding`: decode only those frames (torchcodec or decord on the CPU; pynvvideocodec or
  torchcodec with NVDEC on the GPU)
* :mod:`.loader`: the clip dataset, the per-rank shard sampler, the DataLoader
* :mod:`.decode_ahead`: GPU decoding of batch k+1 on a CUDA stream while batch k trains
* :mod:`.shards`: indexed tar shards (written by ``prepare --shards``, read by the loader)
* :mod:`.transforms`: batched augmentation on the training device
* :mod:`.synthetic`, :mod:`.arrow`: the embedded datasets (rendered demo, study and multi-label
  demo; arrow of time)

This package never imports :mod:`tsmtrain.models`. The names of :mod:`.loader` (which imports
torch) are loaded lazily, on first use (PEP 562 ``__getattr__``), so that the torch-free modules
(:mod:`.lists`, :mod:`.classes`) import without torch: the recipe check and ``tsmtrain submit``
need them on a login node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

from .classes import ClassNamesError, read_class_names
from .lists import ListFileError, VideoRecord, read_list

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .loader import (DataError, MultiClipDataset, ShardSampler, VideoClipDataset, build_loader, clip_dataset,
                         collate_clips, collate_views, multi_clip_dataset, prepared_videos, video_source)

__all__ = ["DataError", "ListFileError", "VideoRecord", "read_list", "ShardSampler", "VideoClipDataset", "build_loader",
           "clip_dataset", "collate_clips", "prepared_videos", "MultiClipDataset", "multi_clip_dataset",
           "collate_views", "video_source", "ClassNamesError", "read_class_names"]

_LAZY = {name: ".loader" for name in ("DataError", "MultiClipDataset", "ShardSampler", "VideoClipDataset",
                                      "build_loader", "clip_dataset", "collate_clips", "collate_views",
                                      "multi_clip_dataset", "prepared_videos", "video_source")}
"""Public names imported on first use, each with the submodule that defines it."""


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
