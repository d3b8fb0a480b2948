"""The online data path: everything a loader worker runs, from a list line to a batch on the
training device. Offline preparation (ffmpeg, tar writing, flow computation, the rendered
datasets) is :mod:`tsmtrain.prep`, which this package never imports.

Modules, in the order a clip travels through them:

* :mod:`.lists`: list files (``relative/path.ext label``) -> :class:`VideoRecord`
* :mod:`.sampling`: TSN segment sampling (a snippet of frames per segment for motion) -> frame indices
* :mod:`.modality`: what a segment holds (RGB, optical flow, RGB difference) and its channels
* :mod:`.readers`: where the bytes come from, picked by :func:`~.readers.create_reader` from
  ``data.root``: files (:mod:`.readers.files`), indexed tar shards (:mod:`.readers.tar`), feature
  files (:mod:`.readers.features`); :mod:`.manifest` reads what ``tsmtrain prepare`` recorded
* :mod:`.decoding`: decode only those frames (torchcodec or decord on the CPU; pynvvideocodec or
  torchcodec with NVDEC on the GPU); :mod:`.flow`: stored optical flow read back (or computed
  in memory for videos never prepared)
* :mod:`.loader`: the clip datasets, the per-rank sampler (:class:`RankSampler`: this rank's
  part of the list), the DataLoader
* :mod:`.decode_ahead`: GPU decoding of batch k+1 on a CUDA stream while batch k trains
* :mod:`.transforms`: batched augmentation on the training device
* :mod:`.preflight`: the check before training that every listed video can be read

Label maps (class names) belong to the recipe: :mod:`tsmtrain.recipe.label_map`.

This package never imports :mod:`tsmtrain.models` or :mod:`tsmtrain.prep`. The names of
:mod:`.loader` (which imports torch) are loaded lazily, on first use (PEP 562 ``__getattr__``),
so that the torch-free module :mod:`.lists` imports without torch: the recipe check and
``tsmtrain submit`` need it on a login node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .lists import ListFileError, VideoRecord, read_list

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .loader import (DataError, MultiClipDataset, RankSampler, VideoClipDataset, build_loader, clip_dataset,
                         collate_clips, collate_views, multi_clip_dataset)

__all__ = ["DataError", "ListFileError", "VideoRecord", "read_list", "RankSampler", "VideoClipDataset", "build_loader",
           "clip_dataset", "collate_clips", "MultiClipDataset", "multi_clip_dataset", "collate_views"]

_LAZY = {name: ".loader" for name in ("DataError", "MultiClipDataset", "RankSampler", "VideoClipDataset",
                                      "build_loader", "clip_dataset", "collate_clips", "collate_views",
                                      "multi_clip_dataset")}
"""Public names imported on first use, each with the submodule that defines it."""


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
