"""Segment-based frame sampling (Wang et al., "Temporal Segment Networks", ECCV 2016, sec. 3.1).

A video of F frames is cut into T segments of equal length F/T and one frame is taken from
each: at a random offset inside the segment for training, at the segment's centre for
evaluation. A video with fewer than T frames still gives T indices (some repeat), so every
clip has exactly T frames whatever its length.

For testing with several clips per video (:func:`multi_clip_indices`), clip k of K takes, in
every segment, the frame at ``(k + 1/2) / K`` of the segment: the K clips together are TSN's
centre sampling with K*T segments, dealt out in turn (see that function for the sources).
"""

from __future__ import annotations

import numpy as np

__all__ = ["segment_indices", "multi_clip_indices", "snippet_indices", "multi_snippet_indices"]


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


def multi_clip_indices(num_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """Frame indices of K test clips of T segments each, spread evenly over the video.

    The video is cut into T segments of length ``seg = F / T``; clip ``k`` (0-based) takes, in
    segment ``t``, frame ``floor(t * seg + seg * (k + 1/2) / K)``. So every clip covers the
    whole video as TSN's evaluation sampling does, and the K clips are shifted against each
    other by ``seg / K``: together they are the centre sampling of K*T segments, dealt out in
    turn. K=1 gives exactly :func:`segment_indices` with ``train=False`` (the segment centres:
    TSM's ``ops/dataset.py`` ``_get_test_indices``, ``int(tick / 2.0 + tick * x)``, and
    mmaction2's ``SampleFrames(clip_len=1, num_clips=T, test_mode=True)``).

    For K=2 the TSM repository's ``--twice_sample`` (and mmaction2's ``twice_sample=True``)
    takes the segment centres and the segment starts instead (fractions 1/2 and 0 of each
    segment, here 1/4 and 3/4); its ``--dense_sample`` (the 10-clip result in its README) takes
    T frames 64/T apart in a 64-frame window at 10 evenly spaced starts, a different scheme
    that this function does not implement.

    Args:
        num_frames: F, frames in the video (>= 1).
        num_segments: T.
        num_clips: K (>= 1).

    Returns:
        int64 array ``(K, T)`` of indices in ``[0, F)``, each row non-decreasing. A video with
        fewer than K*T frames repeats some.

    Raises:
        ValueError: ``num_frames``, ``num_segments`` or ``num_clips`` below 1.
    """
    if num_frames < 1 or num_segments < 1 or num_clips < 1:
        raise ValueError(f"need num_frames, num_segments and num_clips >= 1, got {num_frames}, {num_segments} "
                         f"and {num_clips}")
    seg = num_frames / num_segments
    starts = np.arange(num_segments) * seg
    rows = []
    for k in range(num_clips):
        # for K=1, seg * 0.5 / 1 == seg / 2 exactly: the same floats as segment_indices(train=False)
        idx = np.floor(starts + seg * (k + 0.5) / num_clips).astype(np.int64)
        rows.append(np.clip(idx, 0, num_frames - 1))
    return np.stack(rows)


def snippet_indices(num_frames: int, num_segments: int, length: int, train: bool,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of a snippet of ``length`` consecutive frames per segment (TSN's ``new_length``:
    the L flow fields or L + 1 RGB frames of a motion input; Wang et al. 2016, sec. 3.1).

    The snippet starts are :func:`segment_indices` over the ``F - L + 1`` frames where a whole
    snippet fits (mmaction2's ``SampleFrames(clip_len=L, num_clips=T)`` the same way); a video
    shorter than L repeats its last frame. ``length=1`` gives exactly :func:`segment_indices`
    (the same random draws).

    Returns:
        int64 ``(T, L)``, row t the snippet of segment t, in ``[0, F)``.

    Raises:
        ValueError: an argument below 1.
    """
    if length < 1:
        raise ValueError(f"need length >= 1, got {length}")
    starts = segment_indices(max(1, num_frames - length + 1), num_segments, train, rng)
    return np.minimum(starts[:, None] + np.arange(length), max(num_frames, 1) - 1)


def multi_snippet_indices(num_frames: int, num_segments: int, num_clips: int, length: int) -> np.ndarray:
    """:func:`multi_clip_indices` with a snippet of ``length`` consecutive frames per segment (as
    :func:`snippet_indices`): int64 ``(K, T, L)``; ``length=1`` gives :func:`multi_clip_indices`."""
    if length < 1:
        raise ValueError(f"need length >= 1, got {length}")
    starts = multi_clip_indices(max(1, num_frames - length + 1), num_segments, num_clips)
    return np.minimum(starts[..., None] + np.arange(length), max(num_frames, 1) - 1)
