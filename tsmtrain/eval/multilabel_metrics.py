"""The figures the field reports for multi-label video annotation, from per-video class scores.

* **mAP**: the mean over classes of average precision (AP), each class's videos ranked by their
  score for it (Charades, AVA, YouTube-8M's "mAP"). AP is the mean of the precision at each
  positive's rank, ``sum_k P(k) rel(k) / positives`` (scikit-learn's ``average_precision_score``,
  without interpolation). A class with no positive video has no AP and is left out of the mean.
* **GAP@20**: YouTube-8M's global average precision (Abu-El-Haija et al. 2016, "YouTube-8M: A
  Large-Scale Video Classification Benchmark", sec. 5; ``eval_util.calculate_gap`` of the
  starter code): each video's top 20 classes are pooled into one list of ``(score, correct)``
  predictions over all videos, ranked by score, and its AP is taken with the total number of
  positive labels of all videos as the denominator (so labels outside a video's top 20 count
  as missed).
* **Hit@1**: the fraction of videos whose best class is one of their labels.

All take ``scores`` float ``(V, K)`` and ``targets`` ``(V, K)`` of 0/1 (:func:`multi_hot`); they
use NumPy only. Ties between scores are ranked by stable order of appearance (class index within a
video, video index within a class); scikit-learn ranks tied scores as one threshold instead, which
only matters for exactly equal scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["multi_hot", "average_precision", "mean_average_precision", "global_average_precision", "hit_at_1",
           "multilabel_figures"]


def multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """float32 ``(V, K)`` with 1 at each video's labels.

    Raises:
        ValueError: a label outside ``0..K-1``.
    """
    out = np.zeros((len(labels), num_classes), np.float32)
    for i, row in enumerate(labels):
        for c in row:
            if not 0 <= c < num_classes:
                raise ValueError(f"label {c} of video {i} outside 0..{num_classes - 1}")
            out[i, c] = 1
    return out


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (V, K), got {scores.shape} and {targets.shape}")
    return scores, targets.astype(bool)


def average_precision(scores: np.ndarray, positive: np.ndarray, positives: int | None = None) -> float:
    """AP of one ranked list: ``scores`` ``(n,)``, ``positive`` ``(n,)`` bool; ``positives`` the
    denominator (default: ``positive.sum()``). NaN when there is no positive."""
    total = int(positive.sum()) if positives is None else int(positives)
    if total == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(positive, bool)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / total)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP: the mean of each class's AP over the classes with at least one positive video; NaN
    when no class has one.

    Raises:
        ValueError: ``scores`` and ``targets`` are not both ``(V, K)``.
    """
    scores, targets = _check(scores, targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def global_average_precision(scores: np.ndarray, targets: np.ndarray, top_k: int = 20) -> float:
    """GAP@k (YouTube-8M): AP of every video's top ``k`` predictions pooled and ranked by score,
    over the total number of positive labels. NaN when there is no positive label.

    Raises:
        ValueError: as :func:`mean_average_precision`, or ``top_k < 1``.
    """
    scores, targets = _check(scores, targets)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (V, k)
    pooled = np.take_along_axis(scores, top, 1).reshape(-1)
    correct = np.take_along_axis(targets, top, 1).reshape(-1)
    return average_precision(pooled, correct, positives=int(targets.sum()))


def hit_at_1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of videos whose highest-scored class is one of their labels (0..1).

    Raises:
        ValueError: as :func:`mean_average_precision`, or no video.
    """
    scores, targets = _check(scores, targets)
    if len(scores) == 0:
        raise ValueError("no video to score")
    return float(targets[np.arange(len(scores)), scores.argmax(1)].mean())


def multilabel_figures(scores: np.ndarray, targets: np.ndarray) -> dict:
    """``{"mAP", "GAP20", "hit1"}``: mAP, GAP@20 and Hit@1 (fractions, 0..1) of ``(V, K)`` scores
    and 0/1 targets (keys without ``@``, as metrics.jsonl and TensorBoard tags take them)."""
    return {"mAP": mean_average_precision(scores, targets), "GAP20": global_average_precision(scores, targets),
            "hit1": hit_at_1(scores, targets)}
