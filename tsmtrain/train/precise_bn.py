"""Precise BatchNorm statistics at the base shape, before a multigrid run evaluates.

A multigrid run (:mod:`tsmtrain.train.multigrid`) trains most epochs on clips of fewer segments
and smaller crops, and its short cycle mixes crop sizes within an epoch. BatchNorm's running
statistics are averages over the shapes the run trained at, not the base shape evaluation uses.
Evaluated with them, a network that has learned scores far lower than it should. On the demo,
after 21 multigrid steps, top-1 is 48.5% with the running statistics and 74.5% with statistics
recomputed at the base shape from 32 training clips (docs/training.md, Multigrid).

So before every evaluation of a multigrid run, :func:`recompute_bn_stats` sets each BatchNorm
layer's running mean and variance to their exact averages over ``multigrid.precise_bn_clips``
training clips at the base shape. This is PySlowFast's ``BN.USE_PRECISE_STATS`` /
``BN.NUM_BATCHES_PRECISE`` (fvcore's ``update_bn_stats``); Wu and Johnson, "Rethinking 'Batch' in
BatchNorm" (2021), section 3, call it precise BatchNorm. The clips are sampled as evaluation
samples them (segment centres, centre crop), so the statistics are those of the inputs that
evaluation sees. Training does not read the running statistics, so the weights are untouched.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import RankSampler, build_loader, clip_dataset
from ..data.loader import collate_clips, decoding_target
from ..recipe import Recipe
from .setup import log
from .step import as_memory_format, autocast

__all__ = ["recompute_bn_stats", "precise_bn_records"]


def precise_bn_records(records: list, clips: int, seed: int, epoch: int) -> list:
    """The training videos whose clips give the statistics after ``epoch``.

    Args:
        records: the training list.
        clips: how many to take (all of them when the list is shorter).
        seed: ``train.seed``.
        epoch: epochs done.

    Returns:
        ``min(clips, len(records))`` records, a random choice fixed by ``seed`` and ``epoch``. It is
        the same on every rank, and the same for a resumed run as for one that never stopped.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(records), generator=gen)[:clips].tolist()
    return [records[i] for i in order]


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, records: list, recipe: Recipe, device: torch.device,
                       transform, epoch: int) -> int:
    """Set every BatchNorm layer's running mean and variance of ``model`` to their averages over
    ``multigrid.precise_bn_clips`` training clips at the base shape.

    Each batch of ``train.batch_size`` clips, uint8 ``(N, T, H, W, 3)``, is transformed to
    ``(N, T, C, S, S)`` by ``transform``. It then goes forward in training mode, so each layer
    normalises with the batch's own statistics, as in training. Each layer's mean and unbiased
    variance are averaged over the batches, weighted by their clips. The average variance is
    the mean of the per-batch variances, as fvcore's ``update_bn_stats``. ``momentum`` and
    ``num_batches_tracked`` are restored afterwards. Every rank uses the same clips, so the
    ranks end with the same statistics. With ``model.sync_bn`` every rank takes part in the same
    number of forwards, so the synchronised layers' collectives match.

    Args:
        model: the eager network, at the base shape (``set_segments(T0, 1)``).
        records: the training list.
        recipe: the run's recipe (``multigrid.precise_bn_clips``, ``train.seed``, ``batch_size``,
            ``precision``, ``channels_last``, ``data.workers``).
        device: the training device.
        transform: the evaluation transform (centre crop at ``data.input_size``, normalisation).
        epoch: epochs done, which picks the clips (:func:`precise_bn_records`).

    Returns:
        The clips read; 0 when ``precise_bn_clips`` is 0, the network has no BatchNorm layer, or no
        chosen video could be read. The statistics are then left as they were, with a warning in
        the last case, and also when an error interrupts the forwards.
    """
    clips = recipe.multigrid.precise_bn_clips
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not clips or not layers or not records:
        return 0
    chosen = precise_bn_records(records, clips, recipe.train.seed, epoch)
    decoder, where = decoding_target(recipe.data.decoder, recipe.data.decode_device, device)
    dataset = clip_dataset(recipe, chosen, train=False, decode_device=where, decoder=decoder, replace=False)
    loader = build_loader(dataset, RankSampler(len(dataset), 0, 1, shuffle=False, pad=False),
                          recipe.train.batch_size, recipe.data.workers, drop_last=False, collate=collate_clips)
    saved = [(m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone())
             for m in layers]
    means = [torch.zeros_like(m.running_mean) for m in layers]
    variances = [torch.zeros_like(m.running_var) for m in layers]
    was_training, seen, done = model.training, 0, False
    model.train()
    try:
        for m in layers:
            m.momentum = 1.0  # after a forward the running statistics are that batch's
        for batch in loader:
            if batch["frames"] is None:
                continue
            n = batch["frames"].shape[0]
            x = as_memory_format(transform(batch["frames"].to(device)), recipe.train.channels_last)
            with autocast(recipe.train.precision, device):
                model(x)
            for m, mean, var in zip(layers, means, variances):
                mean.add_(m.running_mean, alpha=n)
                var.add_(m.running_var, alpha=n)
            seen += n
        if seen:
            for m, mean, var in zip(layers, means, variances):
                m.running_mean.copy_(mean / seen)
                m.running_var.copy_(var / seen)
            done = True
        else:
            log.warning("precise BatchNorm: none of the %d training clips chosen after epoch %d could be read; "
                        "evaluating with the running statistics", len(chosen), epoch)
    finally:
        for m, (momentum, count, mean, var) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
            if not done:  # nothing read, or an error: the statistics as they were
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        model.train(was_training)
    return seen
