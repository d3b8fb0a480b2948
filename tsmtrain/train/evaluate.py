"""Evaluation: the model over a list of videos on every rank's shard, top-1/top-5 and loss
summed over all ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import ShardSampler, build_loader, clip_dataset
from ..data.loader import decoding_target
from ..dist.base import Engine
from ..recipe import Recipe
from .metrics import MetricsWriter
from .runtime import log
from .step import as_memory_format, autocast

__all__ = ["predict", "evaluate", "evaluate_epoch"]


@torch.no_grad()
def predict(model, records, recipe: Recipe, engine: Engine, device, transform):
    """Run ``model`` in evaluation mode over this rank's shard of ``records``.

    Yields ``(logits (N, K), labels (N,), failed paths)`` per batch, on ``device``; videos are
    sampled at segment centres and centre-cropped by ``transform``. The forward runs under the
    recipe's ``train.precision`` and memory format (``train.channels_last``), uncompiled.
    """
    decoder, where = decoding_target(recipe.data.decoder, recipe.data.decode_device, torch.device(device))
    dataset = clip_dataset(recipe, records, train=False, decode_device=where, decoder=decoder)
    sampler = ShardSampler(len(dataset), engine.rank, engine.size, shuffle=False, pad=False)
    loader = build_loader(dataset, sampler, recipe.train.batch_size, recipe.data.workers, drop_last=False)
    was_training = model.training
    model.eval()
    for batch in loader:
        x = as_memory_format(transform(batch["frames"].to(device)), recipe.train.channels_last)
        with autocast(recipe.train.precision, device):
            logits = model(x)
        yield logits.float(), batch["label"].to(device), batch["failed"]
    model.train(was_training)


def evaluate(model, records, recipe: Recipe, engine: Engine, device, transform) -> dict:
    """Top-1, top-5 (percent) and mean cross-entropy loss on a list of videos, over all ranks.

    Each rank evaluates its own shard (:func:`predict`); sums are allreduced, so every video
    counts once whatever the number of ranks.
    """
    k = min(5, recipe.model.num_classes)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, clips, failed
    for logits, y, failed in predict(model, records, recipe, engine, device, transform):
        for path in failed:
            log.warning("skipped unreadable video: %s", path)
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(1).sum().item()
        sums[3] += len(y)
        sums[4] += len(failed)
    tot = engine.allreduce(sums, average=False)
    n = max(tot[3].item(), 1)
    return {"top1": 100 * tot[1].item() / n, "top5": 100 * tot[2].item() / n, "loss": tot[0].item() / n,
            "clips": int(tot[3].item()), "skipped_videos": int(tot[4].item())}


def evaluate_epoch(model, records, recipe: Recipe, engine: Engine, device, transform, metrics: MetricsWriter,
                   epoch: int, step: int) -> dict:
    """Evaluate after epoch ``epoch - 1``, log it and append it to metrics.jsonl; returns
    :func:`evaluate`'s result."""
    result = evaluate(model, records, recipe, engine, device, transform)
    metrics.write(epoch=epoch - 1, step=step, **{f"val_{k}": v for k, v in result.items()})
    log.info("epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d clips)",
             epoch - 1, result["top1"], result["top5"], result["loss"], result["clips"])
    return result
