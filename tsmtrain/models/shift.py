"""Temporal shift (Lin, Gan, Han, "TSM: Temporal Shift Module for Efficient Video
Understanding", ICCV 2019, section 3 and Fig. 1b/3).

A 2D network sees a clip of T frames as a batch of N*T images. The temporal shift moves a
fraction of the channels one step along time so that a plain 2D convolution after it mixes
information from neighbouring frames at zero extra multiply-adds:

* channels ``[0, fold)``: frame t takes frame t+1's values (shift towards the past),
* channels ``[fold, 2*fold)``: frame t takes frame t-1's values (shift towards the future),
* channels ``[2*fold, C)``: unchanged,

with ``fold = C // shift_div`` and zeros where the shift runs past the clip's first or last
frame. The *residual* shift (paper section 3.3) puts it on the residual branch of a block,
before its first convolution, so the identity path keeps the unshifted activations.

The shift is an autograd Function so that it costs what a copy of its input costs: the forward
writes every output element exactly once (the two shifted channel groups, the unshifted rest,
and zeros only on the clip borders, into an uninitialised tensor), and the backward is the
opposite shift of the incoming gradient, written the same way. Autograd's own backward of the
slice copies would allocate and zero a full-size tensor per slice instead. It keeps the memory
format of its input (contiguous or channels_last) and dtype (so it runs unchanged under
autocast), and torch.compile traces through it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["temporal_shift", "TemporalShift"]


def _shift_into(x: torch.Tensor, num_segments: int, fold: int, reverse: bool) -> torch.Tensor:
    """The shifted copy of ``x`` ``(N*T, C, H, W)``; ``reverse`` shifts the other way (the
    gradient of the forward shift). Every output element is written once; same memory format."""
    nt, c, h, w = x.shape
    out = torch.empty_like(x)  # keeps x's memory format (contiguous or channels_last)
    src = x.view(nt // num_segments, num_segments, c, h, w)
    dst = out.view(nt // num_segments, num_segments, c, h, w)
    back, fwd = slice(0, fold), slice(fold, 2 * fold)
    if reverse:  # the adjoint: what went from t+1 to t goes back from t to t+1, and vice versa
        back, fwd = fwd, back
    dst[:, :-1, back] = src[:, 1:, back]  # frame t <- frame t+1
    dst[:, -1, back] = 0  # ... past the clip's last frame
    dst[:, 1:, fwd] = src[:, :-1, fwd]  # frame t <- frame t-1
    dst[:, 0, fwd] = 0  # ... before the clip's first frame
    dst[:, :, 2 * fold:] = src[:, :, 2 * fold:]
    return out


class _TemporalShift(torch.autograd.Function):
    """``y = shift(x)``, ``dL/dx = shift^T(dL/dy)``; the shift is a permutation of channel
    values along time with zero fill, so its transpose is the opposite shift."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_segments: int, fold: int, reverse: bool) -> torch.Tensor:
        ctx.num_segments, ctx.fold, ctx.reverse = num_segments, fold, reverse
        return _shift_into(x, num_segments, fold, reverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # itself an apply, so that double backward works (and costs one more shift)
        return _TemporalShift.apply(grad, ctx.num_segments, ctx.fold, not ctx.reverse), None, None, None


def temporal_shift(x: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """Shift ``C // shift_div`` channels back and as many forward in time.

    Args:
        x: activations ``(N*T, C, H, W)``, the T frames of each clip contiguous along the first
            dimension; any memory format (contiguous or channels_last), any floating dtype.
        num_segments: T.
        shift_div: 1/shift_div of the channels shift each way (paper default 8: 1/4 moves).

    Returns:
        A new tensor ``(N*T, C, H, W)`` in ``x``'s memory format and dtype; ``x`` is not
        modified. With ``C // shift_div == 0`` nothing moves (a copy of ``x``); the recipe check
        refuses such a ``model.shift_div`` (:func:`tsmtrain.recipe.load_recipe`).

    Raises:
        ValueError: if ``x`` is not 4-D or its leading dimension is not a multiple of
            ``num_segments``.
    """
    if x.dim() != 4:
        raise ValueError(f"temporal_shift: expected (N*T, C, H, W) activations, got shape {tuple(x.shape)}")
    nt, c = x.shape[:2]
    if nt % num_segments:
        raise ValueError(f"temporal_shift: leading dimension {nt} is not a multiple of num_segments={num_segments}")
    return _TemporalShift.apply(x, num_segments, c // shift_div, False)


class TemporalShift(nn.Module):
    """Wraps a layer so that its input is temporally shifted first: ``net(shift(x))``.

    Placed around the first convolution of a residual branch it gives the paper's residual
    shift. Input and output ``(N*T, C, H, W)``.
    """

    def __init__(self, net: nn.Module, num_segments: int, shift_div: int = 8):
        super().__init__()
        self.net = net
        self.num_segments = num_segments
        self.shift_div = shift_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(temporal_shift(x, self.num_segments, self.shift_div))

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, shift_div={self.shift_div}"
