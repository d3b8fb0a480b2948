"""Videos stored one per file under ``data.root``: a plain folder, or the output folder of
``tsmtrain prepare`` (whose manifest gives each prepared video's frames, size, frame table and
checksum)."""

from __future__ import annotations

import zlib
from pathlib import Path

from ..manifest import MANIFEST, read_manifest

__all__ = ["prepared_videos", "read_checked"]


def prepared_videos(root: str | Path) -> dict[str, dict]:
    """The videos that ``tsmtrain prepare`` wrote into ``root``, from its manifest.

    Returns:
        ``{str(root / output): record}`` for every record with status ok, its
        ``frame_mappings`` and ``flow`` made full paths too; an empty dict when ``root`` holds no
        manifest.

    Raises:
        tsmtrain.data.manifest.ManifestError: the manifest is malformed (names file and line).
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return {}
    videos = {}
    for output, record in read_manifest(root).items():
        record = dict(record)
        for key in ("frame_mappings", "flow"):
            if record.get(key):
                record[key] = str(root / record[key])
        videos[str(root / output)] = record
    return videos


def read_checked(path: str, crc32: int | None) -> bytes:
    """The bytes of a file ``tsmtrain prepare`` wrote, read whole; with the ``crc32`` its manifest
    records, checked against it (as :class:`~tsmtrain.data.readers.tar.TarShardReader` checks a sample).

    Raises:
        VideoDecodeError: the file cannot be read, or its CRC-32 differs (a damaged sample: the
            loader replaces the video and counts it).
    """
    from ..decoding import VideoDecodeError  # torch: imported when a video is read, not by the pre-flight check

    try:
        data = Path(path).read_bytes()
    except OSError as err:  # worded as Video words it
        raise VideoDecodeError(path, "file not found" if isinstance(err, FileNotFoundError)
                               else err.strerror or str(err)) from None
    if crc32 is not None and zlib.crc32(data) != crc32:
        raise VideoDecodeError(path, "CRC-32 mismatch: not the bytes tsmtrain prepare wrote (damaged sample)")
    return data
