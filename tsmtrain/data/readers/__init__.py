"""Readers of the stored data, one per layout, picked by :func:`create_reader` from what
``data.root`` holds (as timm's ``reader_factory`` picks a folder, tar or WebDataset reader):

* :mod:`.files`: one file per video (a plain folder, or one ``tsmtrain prepare`` wrote, with its
  manifest)
* :mod:`.tar`: indexed tar shards (``tsmtrain prepare --shards``)
* :mod:`.features`: feature files (``tsmtrain extract``), for training a head on features
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..lists import VideoRecord
from .files import prepared_videos
from .tar import ShardIndex, TarShardReader, shard_index_file

__all__ = ["create_reader"]



@functools.lru_cache(maxsize=4)
def _load_index(path: str, mtime_ns: int, size: int) -> ShardIndex:
    """One read of a shard index per process while the file is unchanged (train and validation
    sets share it)."""
    return ShardIndex.load(path)



def create_reader(root: str | Path, records: list[VideoRecord]) -> tuple[dict[str, dict], TarShardReader | None]:
    """Where ``records``' videos come from, by ``data.root``: a folder (files; the manifest of
    ``tsmtrain prepare`` in it gives the prepared ones, :func:`prepared_videos`) or a shard index
    (:mod:`tsmtrain.prep.tar_writer`).

    Returns:
        ``(prepared, store)``: the prepared videos' records by path, and a
        :class:`~tsmtrain.data.readers.tar.TarShardReader` (None for files).

    Raises:
        tsmtrain.data.readers.tar.ShardError: the index is unreadable, or a shard holding one of
            ``records`` is missing or truncated (checked now, before any clip is read: every such
            shard is named with the videos it holds), or a record is in no shard.
        tsmtrain.data.manifest.ManifestError: a malformed manifest.
    """
    index_file = shard_index_file(root)
    if index_file is None:
        return prepared_videos(root), None
    stat = os.stat(index_file)
    index = _load_index(str(index_file), stat.st_mtime_ns, stat.st_size)  # paths as read_list joins them
    index.check([r.path for r in records])
    return index.prepared(), TarShardReader(index)
