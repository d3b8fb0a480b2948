"""``tsmtrain test`` and ``tsmtrain predict``: a checkpoint under a named test protocol.

A protocol is K clips x C crops per video (:class:`Protocol`): K clips of T frames spread evenly
over the video (:func:`tsmtrain.data.sampling.multi_clip_indices`), each cut into C spatial crops
(:func:`tsmtrain.data.transforms.view_boxes`: 1 centre crop, 3 crops along the long side, or 10
crops: corners, centre and their flips). The network scores each of the K*C views; the softmax
scores of all views are averaged per video (:func:`average_view_scores`). The TSM repository's
``test_models.py`` averages the views' logits instead (its ``--softmax`` applies softmax after
the average); mmaction2's ``average_clips='prob'`` (its default for TSM) averages softmax
scores, as here. A multi-label run (``model.loss: sigmoid``) averages each view's per-class
sigmoid probabilities instead (mmaction2's ``average_clips='prob'`` with a sigmoid head does the
same), and is scored by mAP, GAP@20 and Hit@1 (:func:`summarise_multilabel`).

Each rank tests its own part of the list (:class:`~tsmtrain.data.RankSampler` without
padding: rank r takes videos r, r + world size, ...), and rank 0 gathers the per-video results
(:meth:`~tsmtrain.dist.base.Engine.allgather_object`), checks that every video of the list came
back exactly once, and computes the figures (:func:`summarise`): top-1, top-5 and mean class
accuracy (per-class accuracy averaged over the classes present, as ``test_models.py``'s "Class
Accuracy"). A video that cannot be decoded is never replaced by another one (the test set must
not change): it is reported with its path and counted as a wrong prediction in every figure
(multi-label: its labels are never retrieved and it misses in Hit@1).

Files (rank 0, in ``RUN_DIR/test/test-KclipsxCcrops[-LIST]/``, :func:`write_reports`):
``summary.json``, ``per_class.csv``, ``confusion.png``, ``predictions.csv`` and ``scores.npz``
(every video's K class scores, for late fusion: :mod:`tsmtrain.eval.fusion`); a multi-label
run writes no confusion matrix (:func:`write_multilabel_reports`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import RankSampler, VideoRecord, build_loader, collate_views, multi_clip_dataset, read_list
from ..recipe.label_map import ClassNamesError, read_class_names
from ..data.readers.features import INDEX, SOURCE, file_digest, read_index
from ..data.loader import DataError, decoding_target
from ..data.modality import modality_of
from ..data.transforms import TEST_CROPS, TestViews, view_side
from ..dist.base import Engine
from ..io import write_atomic, write_json
from ..models import create_model
from ..models.weights import load_weights
from ..recipe import Recipe
from ..train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .fusion import write_scores
from ..train.head_slices import full_model_state
from .multilabel_metrics import average_precision, multi_hot
from ..errors import TrainingError
from ..train.setup import choose_device, choose_engine, log, set_threads
from ..train.step import as_memory_format, autocast

__all__ = ["Protocol", "average_view_scores", "load_model", "score_part", "gather_results", "summarise",
           "summarise_multilabel", "write_reports", "write_multilabel_reports", "run_test", "predict_videos",
           "TestReport", "format_report"]


@dataclass(frozen=True)
class Protocol:
    """A test protocol: ``clips`` clips x ``crops`` crops per video.

    Raises (on creation):
        ValueError: ``clips < 1`` or ``crops`` not 1, 3 or 10.
    """

    clips: int = 1
    crops: int = 1

    def __post_init__(self):
        if self.clips < 1:
            raise ValueError(f"--clips must be at least 1, got {self.clips}")
        if self.crops not in TEST_CROPS:
            raise ValueError(f"--crops must be 1, 3 or 10, got {self.crops}")

    @property
    def views(self) -> int:
        """Views per video, K * C."""
        return self.clips * self.crops

    @property
    def name(self) -> str:
        """e.g. ``test-2clips-3crops`` (the output folder's name)."""
        return f"test-{self.clips}clip{'s' if self.clips > 1 else ''}-{self.crops}crop{'s' if self.crops > 1 else ''}"

    def describe(self, input_size: int) -> str:
        """e.g. ``2 clips x 3 crops (6 views of 73x73)``."""
        side = view_side(input_size, self.crops)
        return (f"{self.clips} clip{'s' if self.clips > 1 else ''} x {self.crops} crop{'s' if self.crops > 1 else ''} "
                f"({self.views} view{'s' if self.views > 1 else ''} of {side}x{side})")


def average_view_scores(logits: torch.Tensor, loss: str = "softmax") -> torch.Tensor:
    """Per-video class scores from the logits of its views: each view's probabilities, averaged
    over the views (probabilities, not logits, are averaged).

    Args:
        logits: ``(N, V, K)``: N videos, V views each, K classes (log-odds with ``sigmoid``).
        loss: the recipe's ``model.loss``: ``softmax`` (one label per video: the softmax of each
            view) or ``sigmoid`` (multi-label: each class's sigmoid probability per view).

    Returns:
        float32 ``(N, K)`` of probabilities in 0..1; with ``softmax`` each row sums to 1.

    Raises:
        ValueError: ``logits`` is not 3-dimensional or has no view, or another ``loss``.
    """
    if logits.dim() != 3 or logits.shape[1] < 1:
        raise ValueError(f"expected logits (N, V, K) with V >= 1, got shape {tuple(logits.shape)}")
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be softmax or sigmoid, got {loss!r}")
    x = logits.float()
    return (torch.sigmoid(x) if loss == "sigmoid" else x.softmax(dim=-1)).mean(dim=1)


def load_model(recipe: Recipe, checkpoint: str | Path | None, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """The recipe's network with a checkpoint's weights, in evaluation mode on ``device``.

    Args:
        recipe: the recipe (its ``model`` section must be the checkpoint's).
        checkpoint: a weights file (``--weights``): a tsmtrain checkpoint, or a model-zoo file of
            the TSM repository or mmaction2 (:func:`tsmtrain.models.weights.load_weights`, its
            report logged); None: the latest checkpoint in the run directory
            (``run.dir/run.name``, :func:`~tsmtrain.train.checkpoint.latest_checkpoint`).

    Returns:
        ``(model, checkpoint path)``.

    Raises:
        TrainingError: no checkpoint in the run directory (the message names it), the file is
            missing or unreadable, or it holds another model (names the differing keys).
        CheckpointError: a run checkpoint that is damaged, or refused (:class:`~tsmtrain.train.checkpoint.UnsafeCheckpointError`:
            it holds Python objects that could run code).
        tsmtrain.models.weights.WeightsError: a weights file that cannot be used (one line).
    """
    run_dir = recipe.run_dir
    if checkpoint is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise TrainingError(f"no checkpoint in the run directory {run_dir}: train the recipe first "
                                f"(tsmtrain run) or give --weights FILE")
        state = load_checkpoint(path)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise TrainingError(f"--weights {path}: no such file")
        state = _run_checkpoint(path)
    model = create_model(recipe.model.model_copy(update={"pretrained": None}), recipe.data.num_segments,
                         modality_of(recipe.data).in_channels)
    if state is None:  # a model-zoo file, a converted one, or a bare state_dict
        report = load_weights(model, path, need_classifier=True, label="--weights")
        for line in report.lines():
            log.info("%s", line)
        return model.to(device).eval(), path
    try:
        weights, saved = full_model_state(path, state, load_checkpoint), state.get("recipe", {})  # a sliced head joined
    except CheckpointError:  # one line naming the file and why (a file that carries code included)
        raise
    except Exception as exc:  # a foreign file: say which
        raise TrainingError(f"{path}: not a tsmtrain checkpoint ({type(exc).__name__}: {exc})") from None
    keys = ("arch", "num_classes", "shift", "shift_div")
    theirs, ours = saved.get("model", {}), recipe.model.model_dump(mode="json")
    diff = [f"model.{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in keys if k in theirs and theirs[k] != ours[k]]
    if diff:
        raise TrainingError(f"{path} is a checkpoint of another model ({', '.join(diff)})")
    segments = saved.get("data", {}).get("num_segments")
    if segments is not None and segments != recipe.data.num_segments:
        log.warning("%s was trained with %d segments; testing with data.num_segments = %d", path, segments,
                    recipe.data.num_segments)
    if recipe.data.features is not None:
        weights = _with_extracted_backbone(recipe, weights, path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise TrainingError(f"{path}: weights do not fit the recipe's model: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), path


def _run_checkpoint(path: Path) -> dict | None:
    """The state of a checkpoint ``tsmtrain run`` wrote (a dict with ``model`` and ``step``), or
    None for any other file (read again by :func:`~tsmtrain.models.weights.load_weights`, which
    says what is wrong with it, if anything)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None
    return state if isinstance(state.get("model"), dict) and "step" in state else None


def _with_extracted_backbone(recipe: Recipe, head: dict, path: Path) -> dict:
    """The weights of a whole network for a head trained on features (``data.features``): the
    backbone of the checkpoint the features were extracted from (their index names it), this
    run's head.

    The SHA-256 the features recorded of that checkpoint (``index.json``'s ``checkpoint_sha256``,
    ``source.json``'s) is checked before the file is unpickled.

    Raises:
        TrainingError: no features index, the checkpoint it names is gone, or it is not the file
            the features were extracted from (its SHA-256 differs, or none was recorded).
    """
    split = Path(recipe.data.features) / "train"
    try:
        index = read_index(split)
        source = Path(index["checkpoint"])
        recorded = {INDEX: index.get("checkpoint_sha256")}
        if (split / SOURCE).is_file():
            recorded[SOURCE] = json.loads((split / SOURCE).read_text()).get("checkpoint_sha256")
    except DataError as err:
        raise TrainingError(f"data.features: {err}") from None
    except (KeyError, TypeError, OSError, ValueError) as err:
        raise TrainingError(f"data.features: {split / INDEX}: not a features index of tsmtrain extract "
                            f"({type(err).__name__}: {err})") from None
    if not source.is_file():
        raise TrainingError(f"{path} is a head trained on features of {source}, which is gone: its backbone is needed")
    recorded = {name: digest for name, digest in recorded.items() if digest}
    if not recorded:
        raise TrainingError(f"data.features: {split / INDEX} records no SHA-256 of its checkpoint {source}: "
                            f"extract the features again")
    digest = file_digest(source)
    wrong = [name for name, value in recorded.items() if value != digest]
    if wrong:
        raise TrainingError(f"data.features: {source} is not the checkpoint the features were extracted from "
                            f"(its SHA-256 {digest[:12]}... differs from the one in {split / wrong[0]}): refused "
                            f"unread")
    backbone = full_model_state(source, load_checkpoint(source), load_checkpoint)
    log.info("the head of %s on the backbone of %s (where data.features came from)", path, source)
    return {**{k: v for k, v in backbone.items() if not k.startswith("fc.")}, **head}


@torch.no_grad()
def score_part(model: torch.nn.Module, records: list[VideoRecord], recipe: Recipe, protocol: Protocol,
               engine: Engine, device: torch.device, top: int = 5, videos_per_batch: int | None = None) -> list[dict]:
    """Score this rank's part of ``records`` under ``protocol``.

    Rank r takes videos r, r + world size, ... (no padding: every video on exactly one rank).
    Each batch's views (``(N, K*C, T, 3, V, V)``, :class:`~tsmtrain.data.transforms.TestViews`)
    run through ``model`` as ``N*K*C`` clips under the recipe's precision and memory format.

    Args:
        videos_per_batch: videos decoded and scored together; None: ``train.batch_size``
            clips' worth, at least one video.

    Returns:
        One dict per video of the part (:func:`_result`): ``index`` (in ``records``), ``label``,
        ``labels`` (all its labels, a tuple), ``top`` (the ``min(top, classes)`` best classes, best
        first), ``scores`` (their probabilities averaged over the views, :func:`average_view_scores`:
        softmax, or sigmoid for ``model.loss: sigmoid``), ``class_scores`` (float32 ``(K,)``: every
        class's; None when unreadable), ``error`` (None, or why the video could not be read).
    """
    d = recipe.data
    decoder, where = decoding_target(d.decoder, d.decode_device, torch.device(device))
    dataset = multi_clip_dataset(recipe, records, protocol.clips, decode_device=where, decoder=decoder)
    sampler = RankSampler(len(dataset), engine.rank, engine.size, shuffle=False, pad=False)
    n = videos_per_batch or max(1, recipe.train.batch_size // protocol.views)
    loader = build_loader(dataset, sampler, n, d.workers, drop_last=False, collate=collate_views)
    views = TestViews(d.input_size, protocol.crops, modality=modality_of(d)).to(device)
    model.eval()
    k = min(top, recipe.model.num_classes)
    results = []
    for batch in loader:
        for index, _, error in batch["failed"]:
            log.warning("unreadable video, counted as wrong: %s", error)
            results.append(_result(index, records[index], error=error))
        if batch["frames"] is None:
            continue
        x = views(batch["frames"].to(device))  # (N, V, T, 3, S, S)
        nv = x.shape[:2]
        with autocast(recipe.train.precision, device):
            logits = model(as_memory_format(x.flatten(0, 1), recipe.train.channels_last))
        probs = average_view_scores(logits.float().view(*nv, -1), recipe.model.loss)  # (N, K)
        best = probs.topk(k, dim=1)
        every = probs.cpu().numpy().astype(np.float32)
        for i, index in enumerate(batch["index"].tolist()):
            results.append(_result(index, records[index], best.indices[i].tolist(), best.values[i].tolist(),
                                   every[i].copy()))
    return results


def _result(index: int, record: VideoRecord, top: list[int] | None = None, scores: list[float] | None = None,
            class_scores: np.ndarray | None = None, error: str | None = None) -> dict:
    """One video's result as :func:`score_part` returns it (an unreadable one: ``error`` only)."""
    return {"index": index, "label": record.label, "labels": record.labels, "top": top or [], "scores": scores or [],
            "class_scores": class_scores, "error": error}


def gather_results(engine: Engine, results: list[dict], total: int) -> list[dict] | None:
    """Every rank's :func:`score_part` results on rank 0, in list order; None on the other ranks.

    Raises:
        RuntimeError: a video came back twice or not at all (the split into parts is broken).
    """
    parts = engine.allgather_object(results, name="test_results")
    if engine.rank != 0:
        return None
    merged = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    indices = [r["index"] for r in merged]
    if indices != list(range(total)):
        seen = set(indices)
        twice = sorted({i for i in indices if indices.count(i) > 1})[:5]
        missing = [i for i in range(total) if i not in seen][:5]
        raise RuntimeError(f"test results: {len(indices)} for {total} videos (twice: {twice}, missing: {missing})")
    return merged


def summarise(results: list[dict], num_classes: int) -> dict:
    """The figures of a test from its per-video results (:func:`score_part`, gathered).

    An unreadable video counts as a wrong prediction (in top-1, top-5, its class's accuracy);
    it is left out of the confusion matrix and counted in ``unreadable`` instead.

    Returns:
        dict: ``videos``, ``unreadable``, ``top1``, ``top5`` (percent; top-5 is top-``min(5, K)``),
        ``mean_class_accuracy`` (percent: the mean over the classes that have videos of the
        fraction of their videos predicted right), ``per_class`` (one dict per class: ``class``,
        ``videos``, ``correct``, ``unreadable``, ``accuracy`` in percent or None without videos),
        ``confusion`` (``(K, K)`` int64 numpy array: rows the true class, columns the predicted
        one, readable videos only).
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    videos = np.zeros(num_classes, dtype=np.int64)
    unreadable = np.zeros(num_classes, dtype=np.int64)
    top1 = top5 = 0
    for r in results:
        videos[r["label"]] += 1
        if r["error"] is not None:
            unreadable[r["label"]] += 1
            continue
        confusion[r["label"], r["top"][0]] += 1
        top1 += r["top"][0] == r["label"]
        top5 += r["label"] in r["top"]
    correct = np.diag(confusion)
    per_class = [{"class": c, "videos": int(videos[c]), "correct": int(correct[c]), "unreadable": int(unreadable[c]),
                  "accuracy": 100.0 * correct[c] / videos[c] if videos[c] else None} for c in range(num_classes)]
    present = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    n = len(results)
    return {"videos": n, "unreadable": int(unreadable.sum()),
            "top1": 100.0 * top1 / n if n else math.nan, "top5": 100.0 * top5 / n if n else math.nan,
            "mean_class_accuracy": float(np.mean(present)) if present else math.nan,
            "per_class": per_class, "confusion": confusion}


def summarise_multilabel(results: list[dict], num_classes: int, top_k: int = 20) -> dict:
    """The figures of a multi-label test from its per-video results (:func:`score_part`,
    gathered; ``class_scores`` the averaged sigmoid probabilities, ``labels`` each video's set).

    mAP, GAP@``top_k`` and Hit@1 as :mod:`tsmtrain.eval.multilabel_metrics` computes them; when every
    video was read they equal :func:`~tsmtrain.eval.multilabel_metrics.multilabel_figures` of the
    ``(V, K)`` scores and multi-hot labels. An unreadable video counts as missed: its labels
    stay in each AP's positives (and GAP's) but are never retrieved, and it misses in Hit@1.

    Returns:
        dict: ``videos``, ``unreadable``, ``mAP``, ``GAP20`` (GAP@``top_k``), ``hit1``
        (fractions 0..1, as ``metrics.jsonl``'s ``val_mAP``; NaN without a positive label or
        video), ``per_class`` (one dict per class: ``class``, ``videos`` (its positives),
        ``unreadable`` (those unread), ``ap`` (0..1, None without a positive video)).

    Raises:
        ValueError: a label outside ``0..K-1``.
    """
    read = [r for r in results if r["error"] is None]
    scores = np.stack([r["class_scores"] for r in read]).astype(np.float64) if read else np.zeros((0, num_classes))
    targets = multi_hot([r["labels"] for r in read], num_classes).astype(bool)
    every = multi_hot([r["labels"] for r in results], num_classes)
    positives = every.sum(0).astype(np.int64)  # (K,): every video's labels, read or not
    aps = [average_precision(scores[:, c], targets[:, c], int(positives[c])) if positives[c] else None
           for c in range(num_classes)]
    present = [a for a in aps if a is not None]
    k = min(top_k, num_classes)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (V_read, k)
    gap = average_precision(np.take_along_axis(scores, top, 1).reshape(-1),
                            np.take_along_axis(targets, top, 1).reshape(-1), int(every.sum()))
    hits = int(targets[np.arange(len(read)), scores.argmax(1)].sum()) if read else 0
    per_class = [{"class": c, "videos": int(positives[c]), "unreadable": int(positives[c] - targets[:, c].sum()),
                  "ap": aps[c]} for c in range(num_classes)]
    n = len(results)
    return {"videos": n, "unreadable": n - len(read), "mAP": float(np.mean(present)) if present else math.nan,
            "GAP20": gap, "hit1": hits / n if n else math.nan, "per_class": per_class}


def _name(names: list[str] | None, c: int) -> str:
    return names[c] if names else str(c)


def write_reports(out_dir: Path, summary: dict, results: list[dict], records: list[VideoRecord], root: str,
                  names: list[str] | None, meta: dict) -> dict[str, Path]:
    """Write a test's files into ``out_dir`` (created):

    * ``summary.json``: ``meta`` (protocol, checkpoint, list, ...) and the figures;
    * ``per_class.csv``: class, name, videos, correct, unreadable, accuracy (%);
    * ``confusion.png``: the confusion matrix, each row divided by its class's readable videos
      (matplotlib, Agg backend);
    * ``predictions.csv``: per video, its path (relative to ``data.root`` where it lies under
      it), label, label name, status (``ok`` or the decoding error), then the top-5 classes,
      their names and averaged softmax scores, best first;
    * ``scores.npz``: per readable video its ``(K,)`` averaged softmax scores, with labels and
      paths (:func:`tsmtrain.eval.fusion.write_scores`; ``summary.json`` gets its ``scores``
      section: the list's and the class map's fingerprints, the unreadable videos), when the
      results have ``class_scores``.

    Returns:
        ``{"summary": path, "per_class": path, "confusion": path, "predictions": path,
        "scores": path}`` (no ``"scores"`` without ``class_scores``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    files = {k: out_dir / f for k, f in (("summary", "summary.json"), ("per_class", "per_class.csv"),
                                         ("confusion", "confusion.png"), ("predictions", "predictions.csv"),
                                         ("scores", "scores.npz"))}
    videos = [_relative(records[r["index"]].path, root) for r in results]
    if not all("class_scores" in r for r in results):
        files.pop("scores").unlink(missing_ok=True)  # no stale scores of an earlier test
    else:
        files["scores"], meta["scores"] = write_scores(out_dir, videos, [r["label"] for r in results],
                                                       [r["class_scores"] for r in results],
                                                       summary["confusion"].shape[0], names)
    doc = {**meta, **{k: v for k, v in summary.items() if k not in ("per_class", "confusion")},
           "per_class": [{**p, "name": _name(names, p["class"])} for p in summary["per_class"]]}
    write_json(files["summary"], doc)
    with write_atomic(files["per_class"]) as part, open(part, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "correct", "unreadable", "accuracy"])
        for p in summary["per_class"]:
            w.writerow([p["class"], _name(names, p["class"]), p["videos"], p["correct"], p["unreadable"],
                        "" if p["accuracy"] is None else f"{p['accuracy']:.2f}"])
    k = max((len(r["top"]) for r in results), default=0)
    with write_atomic(files["predictions"]) as part, open(part, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "label", "label_name", "status"]
                   + [f"top{i}_{x}" for i in range(1, k + 1) for x in ("class", "name", "score")])
        for r, video in zip(results, videos):
            row = [video, r["label"], _name(names, r["label"]), "ok" if r["error"] is None else r["error"]]
            for c, s in zip(r["top"], r["scores"]):
                row += [c, _name(names, c), f"{s:.6f}"]
            w.writerow(row)
    _plot_confusion(files["confusion"], summary["confusion"], names, meta.get("title", ""))
    return files


def write_multilabel_reports(out_dir: Path, summary: dict, results: list[dict], records: list[VideoRecord],
                             root: str, names: list[str] | None, meta: dict) -> dict[str, Path]:
    """Write a multi-label test's files into ``out_dir`` (created), as :func:`write_reports`
    does for one label per video, without a confusion matrix:

    * ``summary.json``: ``meta``, ``"multi_label": true`` and :func:`summarise_multilabel`'s
      figures (``mAP``, ``GAP20``, ``hit1`` as fractions 0..1, per class its ``ap``);
    * ``per_class.csv``: class, name, videos (positives), unreadable, ap (0..1, empty without
      a positive video);
    * ``predictions.csv``: per video its path, labels (class indices separated by spaces),
      label names (separated by ``; ``), status, then the top-5 classes, their names and
      averaged sigmoid probabilities, best first;
    * ``scores.npz``: ``(V, K)`` averaged sigmoid probabilities with the multi-hot labels
      (:func:`tsmtrain.eval.fusion.write_scores` with ``multi_label=True``).

    Returns:
        ``{"summary": path, "per_class": path, "predictions": path, "scores": path}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "confusion.png").unlink(missing_ok=True)  # none of an earlier single-label test
    files = {k: out_dir / f for k, f in (("summary", "summary.json"), ("per_class", "per_class.csv"),
                                         ("predictions", "predictions.csv"))}
    videos = [_relative(records[r["index"]].path, root) for r in results]
    files["scores"], scores_meta = write_scores(out_dir, videos, [r["labels"] for r in results],
                                                [r["class_scores"] for r in results], len(summary["per_class"]),
                                                names, multi_label=True)
    doc = {**meta, "multi_label": True, "scores": scores_meta, **{k: v for k, v in summary.items()
                                                                  if k != "per_class"},
           "per_class": [{**p, "name": _name(names, p["class"])} for p in summary["per_class"]]}
    write_json(files["summary"], doc)
    with write_atomic(files["per_class"]) as part, open(part, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "unreadable", "ap"])
        w.writerows([p["class"], _name(names, p["class"]), p["videos"], p["unreadable"],
                     "" if p["ap"] is None else f"{p['ap']:.6f}"] for p in summary["per_class"])
    _write_multilabel_predictions(files["predictions"], results, videos, names)
    return files


def _write_multilabel_predictions(path: Path, results: list[dict], videos: list[str], names: list[str] | None) -> None:
    """``predictions.csv`` of a multi-label test (columns: :func:`write_multilabel_reports`)."""
    k = max((len(r["top"]) for r in results), default=0)
    with write_atomic(path) as part, open(part, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "labels", "label_names", "status"]
                   + [f"top{i}_{x}" for i in range(1, k + 1) for x in ("class", "name", "score")])
        for r, video in zip(results, videos):
            w.writerow([video, " ".join(map(str, r["labels"])), "; ".join(_name(names, c) for c in r["labels"]),
                        "ok" if r["error"] is None else r["error"]]
                       + [x for c, p in zip(r["top"], r["scores"]) for x in (c, _name(names, c), f"{p:.6f}")])


def _relative(path: str, root: str) -> str:
    """A video's path relative to ``data.root`` where it lies under it (as in the list file)."""
    path, root_path = Path(path), Path(root)
    return str(path.relative_to(root_path) if path.is_relative_to(root_path) else path)


def _plot_confusion(path: Path, confusion: np.ndarray, names: list[str] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = confusion.shape[0]
    rows = confusion.sum(axis=1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.45 * k, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's videos")
    if k <= 40:
        labels = [_name(names, c) for c in range(k)]
        ax.set_xticks(range(k), labels, rotation=90 if names else 0, fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with write_atomic(path) as part, open(part, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


@dataclass
class TestReport:
    """What :func:`run_test` ends with on rank 0 (figures empty on the others).

    Attributes:
        rank: this rank.
        summary: :func:`summarise`'s figures, or :func:`summarise_multilabel`'s for a
            multi-label run (rank 0).
        files: the files written (rank 0).
        checkpoint: the checkpoint tested.
        protocol: the protocol.
        unreadable: ``(path, reason)`` of each unreadable video (rank 0).
        names: the class names, or None.
        multi_label: whether the run is multi-label (``model.loss: sigmoid``).
    """

    __test__ = False  # not a pytest class

    rank: int
    checkpoint: Path
    protocol: Protocol
    summary: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)
    names: list | None = None
    multi_label: bool = False


def format_report(report: TestReport, num_classes: int, input_size: int) -> str:
    """Rank 0's report as the lines ``tsmtrain test`` prints: the protocol and checkpoint, top-1,
    top-5 and mean class accuracy (percent), a per-class table when there are at most 20
    classes, and the files written; for a multi-label run mAP, GAP@20 and Hit@1 (printed in
    percent) and a per-class AP table instead. Unreadable videos are listed by :func:`run_test`'s
    caller."""
    s, names = report.summary, report.names
    lines = [f"{report.protocol.describe(input_size)}, {s['videos']} videos, {s['unreadable']} unreadable "
             f"(counted as {'missed' if report.multi_label else 'wrong'}), checkpoint {report.checkpoint}"]
    lines += (_multilabel_lines if report.multi_label else _single_label_lines)(s, names, num_classes)
    lines += [f"wrote {path}" for path in report.files.values()]
    return "\n".join(lines)


def _single_label_lines(s: dict, names: list[str] | None, num_classes: int) -> list[str]:
    """The figures of :func:`summarise` as lines: top-1, top-5 and mean class accuracy, and each
    class's accuracy when there are at most 20 classes."""
    few = f" (of {num_classes} classes)" if num_classes < 5 else ""
    lines = [f"top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%{few}  "
             f"mean class accuracy {s['mean_class_accuracy']:.2f}%"]
    if num_classes <= 20:
        for p in s["per_class"]:
            name = names[p["class"]] if names else str(p["class"])
            acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.2f}%"
            lines.append(f"  {p['class']:>3} {name:<30} {acc:>8}  ({p['correct']}/{p['videos']}"
                         + (f", {p['unreadable']} unreadable)" if p["unreadable"] else ")"))
    return lines


def _multilabel_lines(s: dict, names: list[str] | None, num_classes: int) -> list[str]:
    """The figures of :func:`summarise_multilabel` as lines: mAP, GAP@20, Hit@1 (percent), and
    each class's AP and positives when there are at most 20 classes."""
    lines = [f"mAP {100 * s['mAP']:.2f}%  GAP@20 {100 * s['GAP20']:.2f}%  Hit@1 {100 * s['hit1']:.2f}%  "
             f"(sigmoid probabilities averaged over the views)"]
    if num_classes <= 20:
        for p in s["per_class"]:
            name = names[p["class"]] if names else str(p["class"])
            ap = "-" if p["ap"] is None else f"{100 * p['ap']:.2f}%"
            lines.append(f"  {p['class']:>3} {name:<30} AP {ap:>7}  ({p['videos']} videos"
                         + (f", {p['unreadable']} unreadable)" if p["unreadable"] else ")"))
    return lines


def _class_names(recipe: Recipe) -> list[str] | None:
    if recipe.data.classes is None:
        return None
    try:
        return read_class_names(recipe.data.classes, recipe.model.num_classes)
    except ClassNamesError as err:
        raise TrainingError(f"data.classes: {err}") from None


def _warn_flips(recipe: Recipe, protocol: Protocol) -> None:
    """10 crops include mirrored views; a recipe trained without flips (``data.flip: false``,
    left and right matter) scores mirrored motion as the opposite class."""
    if protocol.crops == 10 and not recipe.data.flip:
        log.warning("data.flip is false (left and right matter for this data): 5 of the 10 crops are mirrored, "
                    "which turns left-to-right motion into right-to-left; prefer --crops 1 or 3")


def _console_logging(rank: int) -> None:
    """Messages to stderr: INFO on rank 0, WARNING on the others (no file: a test does not
    write into train.log)."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(handler)


def run_test(recipe: Recipe, protocol: Protocol, checkpoint: str | Path | None = None,
             list_file: str | Path | None = None, engine: Engine | None = None) -> TestReport:
    """``tsmtrain test``, on every rank: score the list under ``protocol``, gather, write files.

    Args:
        recipe: the recipe (model, data settings, run directory).
        protocol: clips x crops.
        checkpoint: the checkpoint; None: the run directory's latest.
        list_file: the videos (``path label [label ...]`` lines under ``data.root``); None: ``data.val_list``.
        engine: the engine; None: the recipe's (:func:`~tsmtrain.train.setup.choose_engine`).

    Returns:
        A :class:`TestReport`; rank 0's has the figures (top-1, top-5, mean class accuracy; or
        mAP, GAP@20, Hit@1 for a multi-label run) and the files, written into
        ``RUN_DIR/test/PROTOCOL[-LIST]/``.

    Raises:
        TrainingError: no list to test, no checkpoint, a checkpoint of another model, a label
            map that does not fit ``model.num_classes``.
        tsmtrain.data.ListFileError: a malformed list file.
    """
    engine = engine or choose_engine(recipe)
    _console_logging(engine.rank)
    list_file = list_file or recipe.data.val_list
    if list_file is None:
        raise TrainingError("data.val_list is not set: give the videos to test with --list FILE")
    names, multi = _class_names(recipe), recipe.model.loss == "sigmoid"
    if engine.rank == 0:
        _warn_flips(recipe, protocol)
    set_threads(recipe.train.threads, engine.local_size)
    device = choose_device(recipe.train.device, engine.local_rank)
    records = read_list(list_file, recipe.data.root, recipe.model.num_classes, multi_label=multi)
    model, path = load_model(recipe, checkpoint, device)
    if engine.rank == 0:
        log.info("testing %s on %s (%d videos), %s, %d rank(s), device %s", path, list_file, len(records),
                 protocol.describe(recipe.data.input_size), engine.size, device)
    results = score_part(model, records, recipe, protocol, engine, device)
    merged = gather_results(engine, results, len(records))
    report = TestReport(engine.rank, path, protocol, names=names, multi_label=multi)
    if merged is not None:
        _report_on_rank_0(report, recipe, merged, records, list_file, engine.size)
    return report


def _report_on_rank_0(report: TestReport, recipe: Recipe, merged: list[dict], records: list[VideoRecord],
                      list_file: str | Path, ranks: int) -> None:
    """Fill ``report`` with the figures of the gathered results and write the files."""
    protocol, k = report.protocol, recipe.model.num_classes
    report.summary = summarise_multilabel(merged, k) if report.multi_label else summarise(merged, k)
    report.unreadable = [(records[r["index"]].path, r["error"]) for r in merged if r["error"] is not None]
    run_dir = recipe.run_dir
    folder = protocol.name if list_file == recipe.data.val_list else f"{protocol.name}-{Path(list_file).stem}"
    meta = {"protocol": {"clips": protocol.clips, "crops": protocol.crops, "views": protocol.views,
                         "view_side": view_side(recipe.data.input_size, protocol.crops)},
            "checkpoint": str(report.checkpoint), "list": str(list_file), "ranks": ranks,
            "title": f"{run_dir.name}: {protocol.describe(recipe.data.input_size)}, {list_file}"}
    write = write_multilabel_reports if report.multi_label else write_reports
    report.files = write(run_dir / "test" / folder, report.summary, merged, records, recipe.data.root, report.names,
                         meta)


@torch.no_grad()
def predict_videos(recipe: Recipe, paths: list[str], protocol: Protocol = Protocol(), checkpoint: str | Path | None = None,
                   top: int = 5, device: str | torch.device = "cpu") -> tuple[list[dict], Path, list[str] | None]:
    """``tsmtrain predict``: the best classes of each video file under a test protocol, in this
    process (on the CPU by default).

    Returns:
        ``(predictions, checkpoint path, class names or None)``; one prediction per path, in
        order: ``path``, ``top`` (class indices, best first), ``scores`` (their probabilities
        averaged over the views, 0..1: softmax, or each class's sigmoid for ``model.loss:
        sigmoid``, :func:`average_view_scores`), ``error`` (None, or why the file could not be
        read; then ``top`` is empty).

    Raises:
        TrainingError: as :func:`load_model`, or a label map that does not fit.
        ValueError: ``top < 1``.
    """
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    names = _class_names(recipe)
    _warn_flips(recipe, protocol)
    device = torch.device(device)
    model, path = load_model(recipe, checkpoint, device)
    records = [VideoRecord(str(p), 0) for p in paths]
    dataset = multi_clip_dataset(recipe, records, protocol.clips, compute_flow=True)
    views = TestViews(recipe.data.input_size, protocol.crops, modality=modality_of(recipe.data)).to(device)
    k = min(top, recipe.model.num_classes)
    out = []
    for i, p in enumerate(paths):
        item = dataset[i]
        if item["frames"] is None:
            out.append({"path": p, "top": [], "scores": [], "error": item["error"]})
            continue
        x = views(item["frames"][None].to(device))  # (1, V, T, 3, S, S)
        probs = average_view_scores(model(x.flatten(0, 1)).view(1, x.shape[1], -1), recipe.model.loss)[0]
        best = probs.topk(k)
        out.append({"path": p, "top": best.indices.tolist(), "scores": best.values.tolist(), "error": None})
    return out, path, names
