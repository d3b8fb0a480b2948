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
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["temporal_shift", "TemporalShift"]


def temporal_shift(x: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """Shift ``C // shift_div`` channels back and as many forward in time.

    Args:
        x: activations ``(N*T, C, H, W)``, the T frames of each clip contiguous.
        num_segments: T.
        shift_div: 1/shift_div of the channels shift each way (paper default 8: 1/4 moves).

    Returns:
        A new tensor ``(N*T, C, H, W)``; ``x`` is not modified.

    Raises:
        ValueError: if the leading dimension is not a multiple of ``num_segments``.
    """
    nt, c, h, w = x.shape
    if nt % num_segments:
        raise ValueError(f"temporal_shift: leading dimension {nt} is not a multiple of num_segments={num_segments}")
    x = x.view(nt // num_segments, num_segments, c, h, w)
    fold = c // shift_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]  # frame t <- frame t+1
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]  # frame t <- frame t-1
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out.view(nt, c, h, w)


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
