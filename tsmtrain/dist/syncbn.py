"""Synchronized BatchNorm (``model.sync_bn: true``): normalize with the statistics of the global
batch instead of each rank's share.

With few clips per GPU, each rank's BatchNorm statistics are noisy; the TSM authors train with 8
clips per GPU, or SyncBN below that (Lin, Gan, Han 2019, and their repository's notes). On GPUs
the engines use their libraries' layers (``torch.nn.SyncBatchNorm`` for DDP,
``hvd.SyncBatchNorm`` for Horovod); both refuse CPU tensors, so on CPUs :class:`SyncBatchNorm`
here does the same computation through any sum-allreduce:

* forward: each rank sums ``x`` and ``x**2`` per channel and counts its values; one allreduce of
  ``[sum, sum of squares, count]`` (float64) gives the global mean and (biased) variance, which
  normalize; the running variance gets the unbiased one, as ``nn.BatchNorm2d`` does;
* backward: one allreduce of ``[sum dy, sum dy * x_hat]`` per channel gives the input gradient
  of BatchNorm over the global batch, ``w / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))``;
  the weight and bias gradients stay local (the engine averages them like any other gradient).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, reduce):
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        x64 = x.double()
        local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.tensor([x.numel() / x.size(1)], dtype=torch.float64, device=x.device)])
        total = reduce(local)
        c = x.size(1)
        count = total[2 * c].item()
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * (var * count / max(count - 1, 1)).to(running_var.dtype))
        invstd = (var + eps).rsqrt().to(x.dtype)
        x_hat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.count, ctx.reduce, ctx.dims, ctx.shape = count, reduce, dims, shape
        out = x_hat
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        return out

    @staticmethod
    def backward(ctx, dy):
        x_hat, invstd, weight = ctx.saved_tensors
        dims, shape, c = ctx.dims, ctx.shape, x_hat.size(1)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            total = ctx.reduce(torch.cat([sum_dy, sum_dy_xhat]).double())
            mean_dy = (total[:c] / ctx.count).to(dy.dtype)
            mean_dy_xhat = (total[c:] / ctx.count).to(dy.dtype)
            scale = invstd if weight is None else invstd * weight
            grad_x = scale.view(shape) * (dy - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch, for any number of dimensions ``(N, C, ...)``.

    Args:
        num_features: channels ``C``.
        reduce: sums a float64 tensor over all ranks and returns the sum (a new tensor or the
            same one); every rank calls it in the same order.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.

    In evaluation (or with one rank's ``reduce`` being the identity) it is plain BatchNorm with
    the running statistics. ``momentum=None`` (cumulative average) is not supported.

    Raises:
        ValueError: ``momentum`` is None, or an input with fewer than 2 dimensions.
    """

    def __init__(self, num_features: int, reduce: Reduce, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        if momentum is None:
            raise ValueError("SyncBatchNorm: momentum=None (cumulative average) is not supported")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.reduce = reduce

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        tracked = self.training and self.track_running_stats
        return _SyncBN.apply(input, self.weight, self.bias, self.running_mean if tracked else None,
                             self.running_var if tracked else None, self.eps, self.momentum, self.reduce)


def convert_sync_batchnorm(module: nn.Module, factory: Callable[[_BatchNorm], nn.Module] | None = None,
                           reduce: Reduce | None = None) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (recursively) by a synchronized one that keeps
    its parameters, buffers, device and training mode; returns the new root (``module`` itself
    unless it is a BatchNorm layer).

    Args:
        factory: builds the new layer from the old one (e.g. ``hvd.SyncBatchNorm``); default
            :class:`SyncBatchNorm` with ``reduce``.
        reduce: the sum-allreduce for the default factory.

    Raises:
        ValueError: neither ``factory`` nor ``reduce`` given.
    """
    if factory is None:
        if reduce is None:
            raise ValueError("convert_sync_batchnorm: give a factory or a reduce function")
        factory = lambda bn: SyncBatchNorm(bn.num_features, reduce, bn.eps, bn.momentum, bn.affine,  # noqa: E731
                                           bn.track_running_stats)
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = factory(module)
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, factory, reduce))
    return module
