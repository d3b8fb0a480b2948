"""Late fusion of two-stream results (``tsmtrain fuse``): the saved per-video class scores of
several tested runs, combined by a weighted average.

Two-stream networks (appearance + motion: Simonyan & Zisserman 2014; TSN, Wang et al. 2016) are
fused late: each stream is tested on its own, its per-video class scores (softmax averaged over
the views) are saved, and the streams' score vectors are averaged with weights, as the test
scripts of TSM and mmaction2 do.

The scores file, ``scores.npz`` (:data:`SCORES_FILE`), written by ``tsmtrain test`` next to
``summary.json`` in ``RUN_DIR/test/PROTOCOL[-LIST]/`` (:func:`write_scores`), holds, in list
order (numpy ``.npz``, no pickled objects):

* ``scores``: float32 ``(V, K)``: the averaged softmax scores of the V videos that were read;
* ``labels``: int64 ``(V,)``; ``paths``: str ``(V,)``, the list entries as written in the list
  file (relative to ``data.root``);
* ``unreadable_paths``: str ``(U,)`` and ``unreadable_labels``: int64 ``(U,)``: the videos that
  could not be read (no scores);
* ``classes``: str ``(K,)``, the label map's names (``(0,)`` without one); ``num_classes``: K;
* ``list_sha256``: the list's fingerprint (:func:`list_fingerprint`), also in ``summary.json``'s
  ``scores`` section with ``classes_sha256`` (:func:`classes_fingerprint`);
* ``multi_label``: bool ``()``: True for a multi-label run (``model.loss: sigmoid``); absent in
  files written before multi-label runs were tested (read as False).

A multi-label run's file has the same arrays, with ``scores`` the per-class sigmoid
probabilities averaged over the views, and ``labels`` int64 ``(V, K)`` and ``unreadable_labels``
int64 ``(U, K)`` multi-hot (1 at each of the video's labels).

:func:`fuse_runs` loads one scores file per run (:func:`load_scores`: a run directory's latest
test, a named test folder of it, or a test folder itself), refuses streams tested on different
lists or class maps or a single-label stream with a multi-label one (:func:`check_same_test`),
fuses the videos read in every run (:func:`fuse_scores`) and computes top-1, top-5 and mean class
accuracy of each stream and of the fusion on them with :func:`tsmtrain.eval.protocols.summarise`
(:func:`figures`); of multi-label streams mAP, GAP@20 and Hit@1
(:func:`tsmtrain.eval.multilabel_metrics.multilabel_figures`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import write_atomic
from .multilabel_metrics import multi_hot, multilabel_figures
from ..errors import UserError

__all__ = ["SCORES_FILE", "FusionError", "StreamScores", "list_fingerprint", "classes_fingerprint", "write_scores",
           "find_test_folder", "load_scores", "check_same_test", "parse_weights", "fuse_scores", "figures",
           "fuse_runs", "format_fusion"]

SCORES_FILE = "scores.npz"
"""The name of a test's per-video scores file in its test folder."""

_EXAMPLES = 3  # paths named in a message about a difference


class FusionError(UserError):
    """A fusion that cannot be done: a run without saved scores, streams tested on different
    lists or class maps, bad weights. The message is one line naming the runs."""


def _label_text(label: int | Sequence[int]) -> str:
    """A label as a list line gives it: ``3``; a multi-label video's set, sorted: ``0 2 5``."""
    return str(int(label)) if np.ndim(label) == 0 else " ".join(str(int(c)) for c in sorted(label))


def list_fingerprint(paths: list[str], labels: list[int] | list[Sequence[int]]) -> str:
    """The sha256 (hex) of a test list: its sorted ``(path, label)`` pairs, one ``PATH\\tLABEL``
    line each (UTF-8), so the same videos with the same labels in any order match. A
    multi-label video's labels (a sequence) are written sorted, separated by spaces
    (``PATH\\t0 2``), so their order in the list does not matter either."""
    text = "".join(f"{p}\t{y}\n" for p, y in sorted(zip(paths, map(_label_text, labels))))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def classes_fingerprint(names: list[str] | None, num_classes: int) -> str:
    """The sha256 (hex) of a class map: its names, one per line; without names, of ``K classes``."""
    text = "".join(f"{n}\n" for n in names) if names else f"{num_classes} classes\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _label_array(labels: list, num_classes: int, multi_label: bool) -> np.ndarray:
    """int64 ``(n,)`` labels, or multi-hot ``(n, K)`` of label sequences (``multi_label``)."""
    if multi_label:
        return multi_hot(labels, num_classes).astype(np.int64)
    return np.array(labels, dtype=np.int64)


def write_scores(out_dir: Path, paths: list[str], labels: list[int] | list[Sequence[int]],
                 scores: list[np.ndarray | None], num_classes: int, names: list[str] | None,
                 multi_label: bool = False) -> tuple[Path, dict]:
    """Write ``out_dir/scores.npz`` (format: the module's docstring).

    Args:
        paths: every video of the list, as written in the list file, in list order.
        labels: their labels; ``multi_label`` (``model.loss: sigmoid``): each video's label
            indices (a sequence), saved multi-hot ``(V, K)``.
        scores: per video its ``(K,)`` averaged class probabilities, or None when unreadable.
        names: the class names (``K`` of them) or None.

    Returns:
        ``(path, meta)``: meta is the ``scores`` section of ``summary.json``: ``file``, ``videos``
        (V, with scores), ``unreadable`` (their paths), ``num_classes``, ``classes_sha256``,
        ``list_sha256``, ``multi_label``.

    Raises:
        ValueError: the lengths differ, a score vector is not ``(K,)``, a multi-label label outside 0..K-1.
        FileWriteError: the file cannot be written (:func:`tsmtrain.io.write_atomic`).
    """
    if not len(paths) == len(labels) == len(scores):
        raise ValueError(f"{len(paths)} paths, {len(labels)} labels, {len(scores)} score vectors")
    read = [i for i, s in enumerate(scores) if s is not None]
    lost = [i for i, s in enumerate(scores) if s is None]
    matrix = np.stack([np.asarray(scores[i], dtype=np.float32) for i in read]) if read \
        else np.zeros((0, num_classes), dtype=np.float32)
    if matrix.shape[1:] != (num_classes,):
        raise ValueError(f"score vectors of shape {matrix.shape[1:]}, expected ({num_classes},)")
    fingerprint, chosen = list_fingerprint(paths, labels), lambda rows: [labels[i] for i in rows]
    path = Path(out_dir) / SCORES_FILE
    with write_atomic(path) as part, open(part, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez_compressed(f, scores=matrix, labels=_label_array(chosen(read), num_classes, multi_label),
                            paths=np.array([paths[i] for i in read], dtype=str),
                            unreadable_paths=np.array([paths[i] for i in lost], dtype=str),
                            unreadable_labels=_label_array(chosen(lost), num_classes, multi_label),
                            classes=np.array(names or [], dtype=str),
                            num_classes=np.int64(num_classes), list_sha256=np.array(fingerprint),
                            multi_label=np.bool_(multi_label))
    meta = {"file": SCORES_FILE, "videos": len(read), "unreadable": [paths[i] for i in lost],
            "num_classes": num_classes, "classes_sha256": classes_fingerprint(names, num_classes),
            "list_sha256": fingerprint, "multi_label": bool(multi_label)}
    return path, meta


@dataclass
class StreamScores:
    """One run's saved test scores (:func:`load_scores`).

    Attributes:
        run: the run as given (a run directory or a test folder).
        folder: the test folder read.
        scores: float32 ``(V, K)``; labels: int64 ``(V,)``, or multi-hot ``(V, K)`` for a
            multi-label run; paths: ``V`` list entries.
        unreadable: path -> label (multi-label: the sorted tuple of its labels) of the videos
            that could not be read.
        classes: the K class names, or None.
        num_classes: K.
        summary: the test's ``summary.json`` (``{}`` when absent).
        multi_label: whether the run is multi-label (``model.loss: sigmoid``).
    """

    run: str
    folder: Path
    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    unreadable: dict[str, int]
    classes: list[str] | None
    num_classes: int
    summary: dict
    multi_label: bool = False

    @property
    def entries(self) -> dict[str, int | tuple[int, ...]]:
        """Every video of the tested list, path -> label (read or not); multi-label: path -> the
        sorted tuple of its labels."""
        labels = [tuple(np.flatnonzero(row).tolist()) for row in self.labels] if self.multi_label \
            else self.labels.tolist()
        return {**dict(zip(self.paths, labels)), **self.unreadable}

    @property
    def protocol(self) -> str:
        """e.g. ``2x3`` (clips x crops), ``?`` when the summary does not say."""
        p = self.summary.get("protocol") or {}
        return f"{p['clips']}x{p['crops']}" if "clips" in p and "crops" in p else "?"


def find_test_folder(run: str | Path, test_dir: str | None = None) -> Path:
    """The test folder of ``run`` whose scores to fuse.

    Args:
        run: a test folder (holds ``scores.npz`` or ``summary.json``), or a run directory
            (its tests are in ``RUN/test/*/``).
        test_dir: the test folder's name under ``RUN/test/`` (e.g. ``test-2clips-3crops``);
            None: the latest test (newest ``summary.json``).

    Raises:
        FusionError: no such directory, or no test in it.
    """
    run = Path(run)
    if not run.is_dir():
        raise FusionError(f"{run}: no such run directory or test folder")
    if (run / SCORES_FILE).is_file() or (run / "summary.json").is_file():
        return run
    if test_dir is not None:
        folder = run / "test" / test_dir
        if not folder.is_dir():
            found = sorted(p.name for p in (run / "test").glob("*/summary.json")) if (run / "test").is_dir() else []
            raise FusionError(f"{run}: no test folder {test_dir} in {run / 'test'}"
                              + (f" (there: {', '.join(found)})" if found else ""))
        return folder
    tests = sorted((run / "test").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not tests:
        raise FusionError(f"{run} has no saved test scores: run `tsmtrain test` on its recipe first")
    return tests[-1].parent


def load_scores(run: str | Path, test_dir: str | None = None) -> StreamScores:
    """Load the saved scores of ``run``'s test (:func:`find_test_folder` chooses the folder).

    Returns:
        A :class:`StreamScores` (``scores`` float32 ``(V, K)``).

    Raises:
        FusionError: no test, a test saved without scores (before they were saved), a file
            that is not a scores file, a label outside ``0..K-1`` (multi-label: a value not 0 or
            1), or a NaN or infinite score (names the file, the video and the value).
    """
    folder = find_test_folder(run, test_dir)
    path = folder / SCORES_FILE
    if not path.is_file():
        raise FusionError(f"{folder} has no {SCORES_FILE} (tested before test scores were saved): "
                          f"run `tsmtrain test` on its recipe again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            scores = npz["scores"].astype(np.float32)
            labels, paths = npz["labels"].astype(np.int64), [str(p) for p in npz["paths"]]
            multi = bool(npz["multi_label"]) if "multi_label" in npz.files else False
            lost, lost_paths = npz["unreadable_labels"].astype(np.int64), [str(p) for p in npz["unreadable_paths"]]
            unreadable = {p: tuple(np.flatnonzero(y).tolist()) if multi else int(y) for p, y in zip(lost_paths, lost)}
            classes, k = [str(c) for c in npz["classes"]] or None, int(npz["num_classes"])
    except Exception as exc:  # truncated, foreign, or missing an array
        raise FusionError(f"{path}: not a tsmtrain scores file ({type(exc).__name__}: {exc})") from None
    if scores.shape != (len(paths), k) or labels.shape != ((len(paths), k) if multi else (len(paths),)):
        raise FusionError(f"{path}: scores {scores.shape}, labels {labels.shape}, {len(paths)} paths, {k} classes")
    _check_values(path, scores, (labels, paths), (lost, lost_paths), k, multi)
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return StreamScores(str(run), folder, scores, labels, paths, unreadable, classes, k, summary, multi)


def _check_values(path: Path, scores: np.ndarray, read: tuple[np.ndarray, list[str]],
                  lost: tuple[np.ndarray, list[str]], k: int, multi: bool) -> None:
    """Refuse the labels (``read`` and ``lost``: the read and unreadable videos' labels and
    paths; single-label ``(V,)`` in ``0..k-1``, multi-hot ``(V, k)`` of 0 and 1) and the scores
    (finite) of a scores file that :func:`figures` would index out of range or average into NaN,
    with one line naming the file, the first bad video and its value."""
    paths = read[1]
    for name, (values, who) in (("labels", read), ("unreadable_labels", lost)):
        bad = (values != 0) & (values != 1) if multi else (values < 0) | (values >= k)
        if bad.any():
            first = np.argwhere(bad)[0]
            where = f"class {first[1]} of " if multi else ""
            valid = "0 or 1 (multi-hot)" if multi else f"0..{k - 1} (num_classes {k})"
            raise FusionError(f"{path}: {name}: the label {where}video {who[first[0]]!r} is {values[tuple(first)]}, "
                              f"outside {valid} ({int(bad.sum())} such labels)")
    finite = np.isfinite(scores)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise FusionError(f"{path}: the score of class {col} of video {paths[row]!r} is {scores[row, col]} "
                          f"({int((~finite).sum())} scores not finite): test the run again")


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return f"e.g. {shown}" + (", ..." if len(items) > _EXAMPLES else "")


def check_same_test(a: StreamScores, b: StreamScores) -> None:
    """Refuse two streams that were not tested on the same videos and classes.

    Raises:
        FusionError: a single-label run with a multi-label one, different class counts,
            different class names (when both have names), or different lists (videos only in one
            of them, or labelled differently); the message names both runs and the difference.
    """
    if a.multi_label != b.multi_label:
        multi, single = (a, b) if a.multi_label else (b, a)
        raise FusionError(f"{multi.run} is a multi-label run (sigmoid probabilities, model.loss: sigmoid) and "
                          f"{single.run} a single-label one (softmax scores): their scores cannot be fused")
    if a.num_classes != b.num_classes:
        raise FusionError(f"{a.run} and {b.run} were tested with different class maps: {a.num_classes} classes in "
                          f"{a.run}, {b.num_classes} in {b.run}")
    if a.classes and b.classes and a.classes != b.classes:
        diff = [c for c in range(a.num_classes) if a.classes[c] != b.classes[c]]
        c = diff[0]
        raise FusionError(f"{a.run} and {b.run} were tested with different class maps: {len(diff)} classes named "
                          f"differently, e.g. class {c} is {a.classes[c]!r} in {a.run}, {b.classes[c]!r} in {b.run}")
    ea, eb = a.entries, b.entries
    if ea == eb:
        return
    parts = []
    for one, other, run in ((ea, eb, a.run), (eb, ea, b.run)):
        only = [p for p in one if p not in other]
        if only:
            parts.append(f"{len(only)} videos only in {run}, {_examples(only)}")
    relabelled = [f"{p} ({_label_text(y)} in {a.run}, {_label_text(eb[p])} in {b.run})"
                  for p, y in ea.items() if p in eb and eb[p] != y]
    if relabelled:
        parts.append(f"{len(relabelled)} videos labelled differently, {_examples(relabelled)}")
    raise FusionError(f"{a.run} and {b.run} were tested on different lists: {'; '.join(parts)}")


def parse_weights(text: str, runs: int) -> list[float]:
    """``--weights 1,1.5`` as floats, one per run.

    Raises:
        FusionError: not numbers, not ``runs`` of them, negative or not finite, or all zero.
    """
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise FusionError(f"--weights {text!r}: expected numbers separated by commas, e.g. 1,1.5") from None
    if len(weights) != runs:
        raise FusionError(f"--weights {text!r}: {len(weights)} weight{'s' * (len(weights) != 1)} for {runs} runs")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError(f"--weights {text!r}: weights must be finite, at least 0, and not all 0")
    return weights


def fuse_scores(scores: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """The weighted average of the streams' score matrices.

    Args:
        scores: one ``(V, K)`` matrix per stream, rows the same videos in the same order.
        weights: one per stream (None: 1 each); the result is ``sum(w_i * s_i) / sum(w_i)``.

    Returns:
        float64 ``(V, K)``.

    Raises:
        FusionError: no stream, shapes that differ, or a weight count that differs.
    """
    if not scores:
        raise FusionError("no scores to fuse")
    weights = [1.0] * len(scores) if weights is None else list(weights)
    if len(weights) != len(scores):
        raise FusionError(f"{len(weights)} weights for {len(scores)} runs")
    if len({s.shape for s in scores}) != 1:
        raise FusionError(f"score matrices of different shapes: {[s.shape for s in scores]}")
    total = sum(w * s.astype(np.float64) for w, s in zip(weights, scores))
    return total / sum(weights)


def figures(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5 and mean class accuracy of per-video scores, by
    :func:`tsmtrain.eval.protocols.summarise` (top-5 is top-``min(5, K)``; ties: the lower class);
    of multi-label scores (``labels`` multi-hot ``(V, K)``) mAP, GAP@20 and Hit@1 by
    :func:`tsmtrain.eval.multilabel_metrics.multilabel_figures`.

    Args:
        scores: ``(V, K)``; labels: ``(V,)``, or 0/1 ``(V, K)`` for multi-label scores.

    Returns:
        ``{"videos": V, "top1": %, "top5": %, "mean_class_accuracy": %}``; multi-label:
        ``{"videos": V, "mAP", "GAP20", "hit1"}`` (fractions 0..1, NaN where undefined).
    """
    if np.ndim(labels) == 2:
        if len(scores) == 0:
            return {"videos": 0, "mAP": math.nan, "GAP20": math.nan, "hit1": math.nan}
        return {"videos": len(scores), **multilabel_figures(scores, labels)}
    from .protocols import summarise

    top = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, num_classes)]
    results = [{"label": int(y), "top": t.tolist(), "error": None} for y, t in zip(labels, top)]
    s = summarise(results, num_classes)
    return {k: s[k] for k in ("videos", "top1", "top5", "mean_class_accuracy")}


def fuse_runs(runs: list[str | Path], weights: list[float] | None = None, test_dir: str | None = None) -> dict:
    """``tsmtrain fuse``: load each run's saved test scores, check that they were tested on the
    same list and class map, fuse them on the videos read in every run and compute the figures
    of each stream and of the fusion on those videos.

    Args:
        runs: run directories or test folders (:func:`find_test_folder`), at least two.
        weights: one per run (None: 1 each).
        test_dir: the test folder's name in every run directory (None: each one's latest).

    Returns:
        A JSON-ready dict: ``streams`` (per run: ``run``, ``folder``, ``protocol``, ``weight`` and
        :func:`figures`), ``fused`` (:func:`figures`), ``videos`` (fused), ``list_videos``,
        ``excluded`` (paths unreadable in some run), ``num_classes``, ``list`` (the first run's list file),
        ``multi_label`` (then the figures are mAP, GAP@20 and Hit@1 of fused sigmoid probabilities).

    Raises:
        FusionError: fewer than two runs, a weight count that differs, a run without saved scores, runs
            tested on different lists or class maps, a single-label run with a multi-label one, no
            video read in every run.
    """
    if len(runs) < 2:
        raise FusionError(f"give at least two runs to fuse, got {len(runs)}")
    if weights is not None and len(weights) != len(runs):
        raise FusionError(f"{len(weights)} weights for {len(runs)} runs")
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    streams = [load_scores(run, test_dir) for run in runs]
    for other in streams[1:]:
        check_same_test(streams[0], other)
    first = streams[0]
    shared = [p for p in first.paths if all(p not in s.unreadable for s in streams)]
    if not shared:
        raise FusionError(f"no video was read in every run ({', '.join(s.run for s in streams)})")
    rows = [{p: i for i, p in enumerate(s.paths)} for s in streams]
    aligned = [s.scores[[row[p] for p in shared]] for s, row in zip(streams, rows)]
    labels = first.labels[[rows[0][p] for p in shared]]
    k = first.num_classes
    fused = fuse_scores(aligned, weights)
    return {"streams": [{"run": s.run, "folder": str(s.folder), "protocol": s.protocol, "weight": w,
                         **figures(m, labels, k)} for s, w, m in zip(streams, weights, aligned)],
            "fused": figures(fused, labels, k), "videos": len(shared), "list_videos": len(first.entries),
            "excluded": sorted(set(first.entries) - set(shared)), "num_classes": k,
            "list": first.summary.get("list"), "multi_label": first.multi_label}


def format_fusion(result: dict) -> str:
    """:func:`fuse_runs`'s result as the lines ``tsmtrain fuse`` prints: what was fused, then one
    row per stream and one for the fusion: weight, protocol (clips x crops), videos, top-1, top-5,
    mean class accuracy (percent); of multi-label runs mAP, GAP@20 and Hit@1 (printed in percent)."""
    k, multi = result["num_classes"], result.get("multi_label", False)
    lines = [f"{len(result['streams'])} runs, {result['videos']} videos read in every run (of {result['list_videos']} "
             f"in the list{' ' + result['list'] if result['list'] else ''}), {k} classes"
             + (", multi-label (sigmoid probabilities fused)" if multi else "")]
    if result["excluded"]:
        lines.append(f"excluded (unreadable in some run): {', '.join(result['excluded'])}")
    width = max(len("fused"), *(len(s["run"]) for s in result["streams"]))
    if multi:
        keys, heads = ("mAP", "GAP20", "hit1"), ("mAP", "GAP@20", "Hit@1")
        scale = 100.0  # fractions printed in percent
    else:
        keys = ("top1", "top5", "mean_class_accuracy")
        heads = ("top-1", "top-5" if k >= 5 else f"top-{k}", "mean class")
        scale = 1.0
    lines.append(f"{'stream':<{width}}  {'weight':>6}  {'views':>5}  {'videos':>6}  {heads[0]:>7}  {heads[1]:>7}  "
                 f"{heads[2]:>10}")
    rows = [(s["run"], f"{s['weight']:g}", s["protocol"], s) for s in result["streams"]]
    rows.append(("fused", "", "", result["fused"]))
    for name, weight, views, f in rows:
        a, b, c = (scale * f[key] for key in keys)
        lines.append(f"{name:<{width}}  {weight:>6}  {views:>5}  {f['videos']:>6}  {a:>6.2f}%  {b:>6.2f}%  {c:>9.2f}%")
    return "\n".join(lines)
