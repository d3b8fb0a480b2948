"""Evaluation: the model over a list of videos on every rank's part, top-1/top-5 and loss
summed over all ranks; for multi-label runs (``model.loss: sigmoid``) also mAP, GAP@20 and Hit@1
of the scores gathered from every rank (:mod:`tsmtrain.eval.multilabel_metrics`)."""

from __future__ import annotations

import torch

from ..data import RankSampler, build_loader, clip_dataset
from ..data.readers.features import FeatureDataset, collate_features
from ..data.loader import collate_clips, decoding_target
from ..dist.base import Engine
from ..dist.head_parallel import HeadParallel
from ..recipe import Recipe
from ..train.metrics_log import MetricsWriter
from ..train.setup import log
from ..train.step import as_memory_format, autocast, classification_loss, targets

__all__ = ["predict", "evaluate", "evaluate_epoch"]


@torch.no_grad()
def predict(model, records, recipe: Recipe, engine: Engine, device, transform, head_parallel: HeadParallel | None = None):
    """Run ``model`` in evaluation mode over this rank's part of ``records``.

    ``records`` may also be a :class:`~tsmtrain.data.readers.features.FeatureDataset` (``data.features``).

    Yields ``(logits (N, K), labels, failed, unread)`` per batch, on ``device``: labels ``(N,)``, or
    multi-hot ``(N, K)`` with ``model.loss: sigmoid`` (:func:`~tsmtrain.train.step.targets`);
    ``failed`` why each video that could not be read could not (path included); ``unread`` the
    labels of those videos in the same form, ``(U,)`` or ``(U, K)``. An unreadable video is not
    replaced by another (that would change top-1): it is in ``unread``, not in the N. Videos are
    sampled at segment centres and centre-cropped by ``transform``. The forward runs under the
    recipe's ``train.precision`` and memory format (``train.channels_last``), uncompiled.

    With ``head_parallel`` (``model.fc`` is this rank's slice of the classifier) every rank's
    features are scored by every rank's classes and each rank gets all K logits of its own
    clips; ranks with fewer batches then run empty ones, so that every rank takes part in as
    many gathers.
    """
    decoder, where = decoding_target(recipe.data.decoder, recipe.data.decode_device, torch.device(device))
    if isinstance(records, FeatureDataset):  # data.features: the extracted features of the validation list
        dataset, collate = records, collate_features
    else:
        dataset = clip_dataset(recipe, records, train=False, decode_device=where, decoder=decoder, replace=False)
        collate = collate_clips
    sampler = RankSampler(len(dataset), engine.rank, engine.size, shuffle=False, pad=False)
    loader = build_loader(dataset, sampler, recipe.train.batch_size, recipe.data.workers, drop_last=False,
                          collate=collate)
    was_training = model.training
    model.eval()
    for batch in loader:
        unread = batch.get("unread", [])
        unread_y = targets({"label": torch.tensor([u[0] for u in unread], dtype=torch.int64),
                            "labels": [u[1] for u in unread]}, recipe.model).to(device)
        if batch["frames"] is None:  # no video of the batch could be read
            logits = (torch.zeros(0, recipe.model.num_classes, device=device) if head_parallel is None
                      else _sliced_logits(model, None, head_parallel))  # the gather all ranks take part in
            yield logits.float(), targets(batch, recipe.model).to(device), batch["failed"], unread_y
            continue
        x = as_memory_format(transform(batch["frames"].to(device)), recipe.train.channels_last)
        with autocast(recipe.train.precision, device):
            logits = model(x) if head_parallel is None else _sliced_logits(model, x, head_parallel)
        yield logits.float(), targets(batch, recipe.model).to(device), batch["failed"], unread_y
    if head_parallel is not None:  # as many gathers as the rank with the most batches
        for _ in range(max(head_parallel.counts(len(loader))) - len(loader)):
            _sliced_logits(model, None, head_parallel)
    model.train(was_training)


def _sliced_logits(model, x: torch.Tensor | None, head_parallel: HeadParallel) -> torch.Tensor:
    """All K logits ``(n, K)`` of this rank's clips ``x`` (``None``: an empty batch, ``n = 0``)
    with a head sliced across ranks."""
    fc = model.fc
    features = model(x, classify=False) if x is not None else next(fc.parameters()).new_zeros(0, model.feature_dim)
    counts = head_parallel.counts(len(features))
    return head_parallel.full(head_parallel.logits(features, fc, counts), counts)


def evaluate(model, records, recipe: Recipe, engine: Engine, device, transform,
             head_parallel: HeadParallel | None = None) -> dict:
    """Top-1, top-5 (percent) and mean loss on a list of videos, over all ranks.

    Each rank evaluates its own part (:func:`predict`); sums are allreduced, so every video
    counts once whatever the number of ranks. With ``model.loss: sigmoid`` top-1 is Hit@1 (the
    best class is one of the labels), top-5 counts a label among the best 5, and ``mAP``,
    ``GAP20`` and ``hit1`` (fractions) come from every rank's scores gathered
    (:func:`gather_rows`, :func:`~tsmtrain.eval.multilabel_metrics.multilabel_figures`).

    A video that cannot be read counts as wrong (top-1, top-5; for multi-label, scores of 0, all
    labels missed), as ``tsmtrain test`` counts it, and in ``skipped_videos``; ``clips`` counts
    every video of the list, ``loss`` is the mean over the videos read.
    """
    k = min(5, recipe.model.num_classes)
    multi = recipe.model.loss == "sigmoid"
    sums = torch.zeros(6, dtype=torch.float64)  # loss, top1, top5, clips, unreadable, clips read
    kept = []  # multi-label: (probabilities, targets) of this rank's clips
    for logits, y, failed, unread in predict(model, records, recipe, engine, device, transform, head_parallel):
        for reason in failed:
            log.warning("unreadable validation video, counted as wrong: %s", reason)
        if len(y):
            top = logits.topk(k, dim=1).indices
            sums[0] += classification_loss(logits, y, recipe.model.loss).item() * len(y)
            hits = y.gather(1, top) > 0 if multi else top == y[:, None]  # (N, k): the i-th best is a label
            sums[1] += hits[:, 0].sum().item()
            sums[2] += hits.any(1).sum().item()
        sums[3] += len(y) + len(unread)
        sums[4] += len(unread)
        sums[5] += len(y)
        if multi:
            kept.append(torch.cat([torch.sigmoid(logits), y], 1).double().cpu())
            kept.append(torch.cat([torch.zeros_like(unread), unread], 1).double().cpu())  # scores 0: missed
    tot = engine.allreduce(sums, average=False)
    n = max(tot[3].item(), 1)
    result = {"top1": 100 * tot[1].item() / n, "top5": 100 * tot[2].item() / n,
              "loss": tot[0].item() / max(tot[5].item(), 1),
              "clips": int(tot[3].item()), "skipped_videos": int(tot[4].item())}
    if multi:
        from .multilabel_metrics import multilabel_figures

        both = gather_rows(engine, torch.cat(kept) if kept else torch.zeros(0, 2 * recipe.model.num_classes,
                                                                              dtype=torch.float64))
        result.update(multilabel_figures(both[:, :recipe.model.num_classes].numpy(),
                                         both[:, recipe.model.num_classes:].numpy()))
    return result


def gather_rows(engine: Engine, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's float64 ``(n_r, D)`` rows, stacked in rank order on every rank ``(sum n_r, D)``:
    two allreduces (the counts, then the rows placed at their offsets in zeros)."""
    counts = torch.zeros(engine.size, dtype=torch.float64)
    counts[engine.rank] = len(rows)
    counts = engine.allreduce(counts, average=False).long().tolist()
    start = sum(counts[:engine.rank])
    every = torch.zeros(sum(counts), rows.shape[1], dtype=torch.float64)
    every[start:start + len(rows)] = rows
    return engine.allreduce(every.flatten(), average=False).view(sum(counts), rows.shape[1])


def evaluate_epoch(model, records, recipe: Recipe, engine: Engine, device, transform, metrics: MetricsWriter,
                   epoch: int, step: int, head_parallel: HeadParallel | None = None) -> dict:
    """Evaluate after epoch ``epoch - 1``, log it and append it to metrics.jsonl; returns
    :func:`evaluate`'s result."""
    result = evaluate(model, records, recipe, engine, device, transform, head_parallel)
    metrics.write(epoch=epoch - 1, step=step, **{f"val_{k}": v for k, v in result.items()})
    log.info("epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d clips%s)%s",
             epoch - 1, result["top1"], result["top5"], result["loss"], result["clips"],
             f", {result['skipped_videos']} unreadable, counted as wrong" if result["skipped_videos"] else "",
             f"; mAP {result['mAP']:.4f}, GAP@20 {result['GAP20']:.4f}, Hit@1 {result['hit1']:.4f}"
             if "mAP" in result else "")
    return result
