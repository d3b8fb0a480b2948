"""BatchNorm over a fixed number of clips: multigrid training's sub-batch normalisation.

Wu et al. (CVPR 2020, section 3.3 and PySlowFast's ``SubBatchNorm3d``) keep the number of clips
that BatchNorm computes its statistics over fixed while the mini-batch grows: the batch is split
into sub-batches of that many clips, each normalised with its own mean and variance. TSM's network
is 2D, its BatchNorm input ``(N*T, C, H, W)`` holds each clip's T frames in consecutive rows, so a
sub-batch of clips is a run of consecutive rows.

:func:`set_bn_splits` switches a network's ``nn.BatchNorm2d`` layers to :class:`SubBatchNorm2d` in
place (the class only: parameters, buffers and state-dict keys stay those of ``BatchNorm2d``, so
checkpoints are unchanged); with one split it is ``BatchNorm2d`` exactly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SubBatchNorm2d", "set_bn_splits"]


class SubBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that in training normalises each of :attr:`splits` equal runs of
    consecutive rows of its ``(M, C, H, W)`` input with that run's own batch statistics (biased
    variance, as BatchNorm). The running statistics are updated once per call, with the mean of the
    runs' means and the variance of the union of the runs (mean of the runs' unbiased variances plus
    the variance of their means: PySlowFast's ``aggregate_stats``). In evaluation, or with one split,
    it is ``nn.BatchNorm2d``. A layer whose sub-batches would hold one value per channel (one frame of
    1x1 pixels) takes the largest number of splits that leaves two.

    Raises:
        ValueError: in training, M is not a multiple of :attr:`splits`.
    """

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.splits
        if not self.training or k <= 1:
            return super().forward(x)
        m, c, h, w = x.shape
        if m % k:
            raise ValueError(f"{m} rows cannot be split into {k} equal sub-batches")
        while k > 1 and (m // k * h * w < 2 or m % k):  # statistics need 2 values per channel: fewer splits
            k -= 1
        if k == 1:
            return super().forward(x)
        # sub-batch j's channel i becomes channel j*c + i of one batch of m/k rows: one native BatchNorm
        grouped = x.view(k, m // k, c, h, w).transpose(0, 1).reshape(m // k, k * c, h, w)
        track = self.track_running_stats and self.running_mean is not None
        # momentum 1: these buffers receive each sub-batch's mean and unbiased variance
        means = torch.zeros(k * c, dtype=self.running_mean.dtype, device=x.device) if track else None
        variances = torch.ones(k * c, dtype=self.running_var.dtype, device=x.device) if track else None
        y = nn.functional.batch_norm(grouped, means, variances, self.weight.repeat(k) if self.affine else None,
                                     self.bias.repeat(k) if self.affine else None, True, 1.0, self.eps)
        y = y.view(m // k, k, c, h, w).transpose(0, 1).reshape(m, c, h, w)
        if track:
            with torch.no_grad():
                means, variances = means.view(k, c), variances.view(k, c)
                whole = means.mean(0)
                momentum = 0.1 if self.momentum is None else self.momentum
                self.running_mean.lerp_(whole, momentum)
                self.running_var.lerp_(variances.mean(0) + (means - whole).pow(2).mean(0), momentum)
                self.num_batches_tracked.add_(1)
        return y


def set_bn_splits(model: nn.Module, splits: int) -> None:
    """Make every ``nn.BatchNorm2d`` of ``model`` normalise ``splits`` sub-batches separately in
    training (:class:`SubBatchNorm2d`; ``splits`` 1: as ``nn.BatchNorm2d``). Other normalisation
    layers (``SyncBatchNorm`` with ``model.sync_bn``) are left alone."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d and splits > 1:
            module.__class__ = SubBatchNorm2d
        if isinstance(module, SubBatchNorm2d):
            module.splits = splits
