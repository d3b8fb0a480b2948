"""Segment-based frame sampling (Wang et al., "Temporal Segment Networks", ECCV 2016, sec. 3.1).

A video of F frames is cut into T segments of equal length F/T and one frame is taken from
each: at a random offset inside the segment for training, at the segment's centre for
evaluation. A video with fewer than T frames still gives T indices (some repeat), so every
clip has exactly T frames whatever its length.
"""

from __future__ import annotations

import numpy as np

__all__ = ["segment_indices"]


def segment_indices(num_frames: int, num_segments: int, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices, one per segment.

    Args:
        num_frames: F, frames in the video (>= 1).
        num_segments: T.
        train: random offset within each segment (True) or segment centre (False).
        rng: random generator for training offsets (a fresh unseeded one if omitted).

    Returns:
        int64 array ``(T,)`` of non-decreasing indices in ``[0, F)``.

    Raises:
        ValueError: ``num_frames < 1`` or ``num_segments < 1``.
    """
    if num_frames < 1 or num_segments < 1:
        raise ValueError(f"need num_frames >= 1 and num_segments >= 1, got {num_frames} and {num_segments}")
    seg = num_frames / num_segments  # segment length in frames, may be < 1
    starts = np.arange(num_segments) * seg
    if train:
        rng = rng or np.random.default_rng()
        offsets = rng.random(num_segments) * seg
    else:
        offsets = np.full(num_segments, seg / 2)
    idx = np.floor(starts + offsets).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1)
