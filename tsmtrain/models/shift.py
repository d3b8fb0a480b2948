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

The shift is written to cost what a copy of its input costs: the forward writes every output
element exactly once (the two shifted channel groups, the unshifted rest, and zeros only on the
clip borders, into an uninitialised tensor), and the backward is the opposite shift of the
incoming gradient, written the same way. Autograd's own backward of slice copies would
allocate and zero a full-size tensor per slice instead. It keeps the memory format of its input
(contiguous or channels_last) and dtype (so it runs unchanged under autocast). Three
implementations give bitwise the same result:

* on CPU tensors, the native operator ``torch.ops.tsmtrain.temporal_shift`` (``csrc/temporal_shift.cpp``,
  built with the system C++ compiler on first use by :func:`native_shift`, cached by torch in
  ``~/.cache/torch_extensions``): one pass over the output in memory order, split over torch's
  intra-op threads exactly as a copy is, with its autograd in C++ and a direct Python binding,
  so a call costs what ``x.clone()`` costs;
* elsewhere (CUDA, or where the operator cannot be built), :class:`_TemporalShift`, an autograd
  Function of three strided copies and one fill;
* under torch.compile, a padded concatenation that inductor fuses into one kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["temporal_shift", "TemporalShift", "native_shift"]

log = logging.getLogger(__name__)
NATIVE_SOURCE = Path(__file__).with_name("csrc") / "temporal_shift.cpp"
NATIVE_ENV = "TSMTRAIN_NATIVE_SHIFT"  # "0": never build or use the native operator


@functools.cache
def native_shift():
    """The native CPU temporal shift, built from ``csrc/temporal_shift.cpp`` on the first call of a
    process (about a minute the first time on a machine, then loaded from torch's extension cache
    in ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; ranks that start together wait
    for one build), or None where it cannot be built (no C++ compiler or ninja; the reason is
    logged once) or ``TSMTRAIN_NATIVE_SHIFT=0`` is set. Never raises.

    Returns a function ``f(x, num_segments, shift_div)`` that is :func:`temporal_shift` for CPU
    tensors: ``(N*T, C, H, W)`` of any dtype, contiguous or channels_last (another layout is
    copied to contiguous first), result in the same memory format, ``ValueError`` for a bad shape.
    It calls the registered operator ``torch.ops.tsmtrain.temporal_shift(x, num_segments, fold,
    reverse)`` (``fold = C // shift_div``; ``reverse`` shifts the other way, the gradient's shift)
    through a direct binding that costs what ``x.clone()``'s does, about 2 microseconds less than
    a call through ``torch.ops``.
    """
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "No CUDA runtime is found" at import: not needed here
    try:
        from torch.utils import cpp_extension

        # one build folder per checkout: torch's build.ninja names the source's path, so two checkouts
        # sharing one cache would rebuild it (and make each other's processes wait) in turn
        where = hashlib.sha1(str(NATIVE_SOURCE.resolve()).encode()).hexdigest()[:8]
        module = cpp_extension.load(name=f"tsmtrain_temporal_shift_{where}", sources=[str(NATIVE_SOURCE)],
                                    extra_cflags=["-O3", "-fopenmp"], is_python_module=True, verbose=False)
        return module.temporal_shift
    except Exception as exc:  # a missing compiler or ninja, a failed build: the PyTorch shift still works
        reason = str(exc).strip().splitlines()
        log.warning("temporal shift: the native CPU operator could not be built (%s); using the PyTorch "
                    "shift, which gives the same results more slowly", reason[-1] if reason else type(exc).__name__)
        return None
    finally:
        quiet.setLevel(level)


_native = None  # the native shift once looked up, False where there is none; None: not yet looked up


def _look_up_native():
    global _native
    _native = native_shift() or False
    return _native


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is contiguous or channels_last, else a contiguous copy (a gradient may come
    expanded, e.g. from ``sum()``)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _shift_into(x: torch.Tensor, num_segments: int, fold: int, reverse: bool) -> torch.Tensor:
    """The shifted copy of ``x`` ``(N*T, C, H, W)``; ``reverse`` shifts the other way (the
    gradient of the forward shift). Same memory format as ``x``; every element written once."""
    if torch.compiler.is_compiling():
        return _shifted_by_cat(x, num_segments, fold, reverse)
    x = _dense(x)
    out = torch.empty_like(x)  # a dense input keeps its strides, so its memory format
    _write_strided(out, x, num_segments, fold, reverse)
    return out


def _write_strided(out: torch.Tensor, x: torch.Tensor, t: int, fold: int, reverse: bool) -> None:
    """Eager: four kernels, three copies (the group from frame t+1, the group from frame t-1,
    the unshifted rest) between strided views of ``x`` and ``out``, and one fill of the zeros on
    the clip borders. Each view is one ``as_strided`` call built from the tensor's own strides
    (so contiguous and channels_last take the same code); Python's slicing takes several calls
    per view, which is most of the shift's time on small activations."""
    nt, c, h, w = x.shape
    n = nt // t
    back, fwd = (fold, 0) if reverse else (0, fold)  # first channel of the group from t+1, from t-1

    def view(v: torch.Tensor, size: tuple, frame: int, channel: int) -> torch.Tensor:
        """``v`` as (clips, frames, channels, H, W) of ``size`` from (frame, channel) of clip 0."""
        sf, sc, sh, sw = v.stride()
        return v.as_strided(size, (t * sf, sf, sc, sh, sw), v.storage_offset() + frame * sf + channel * sc)

    group = (n, t - 1, fold, h, w)
    view(out, group, 0, back).copy_(view(x, group, 1, back))  # frame t <- frame t+1
    view(out, group, 1, fwd).copy_(view(x, group, 0, fwd))  # frame t <- frame t-1
    rest = (n, t, c - 2 * fold, h, w)
    view(out, rest, 0, 2 * fold).copy_(view(x, rest, 0, 2 * fold))
    # zeros: the group from t+1 at each clip's last frame and the group from t-1 at its first,
    # one view of both (the one further into memory is the other plus a step)
    sf, sc, sh, sw = out.stride()
    last, first = (t - 1) * sf + back * sc, fwd * sc
    out.as_strided((2, n, fold, h, w), (abs(last - first), t * sf, sc, sh, sw),
                   out.storage_offset() + min(last, first)).zero_()


def _shifted_by_cat(x: torch.Tensor, t: int, fold: int, reverse: bool) -> torch.Tensor:
    """The same result without writes into a tensor, for torch.compile: a zero frame padded
    before and after each clip, and one concatenation of the three channel groups read from it
    at frame t+1, t-1 and t. Inductor turns this into one kernel that reads ``x`` once and never
    makes the padded tensor (writes into views would become one full-size scatter per write)."""
    nt, c, h, w = x.shape
    clips = x.view(nt // t, t, c, h, w)
    padded = nn.functional.pad(clips, (0, 0, 0, 0, 0, 0, 1, 1))  # (N, T+2, C, H, W)
    after, before = padded[:, 2:], padded[:, :-2]  # frame t+1, frame t-1 (zero past the clip)
    first, second = (before, after) if reverse else (after, before)
    parts = [first[:, :, :fold], second[:, :, fold:2 * fold], clips[:, :, 2 * fold:]]
    return torch.cat(parts, dim=2).view(nt, c, h, w)


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
    # CPU, eager: the native shift checks the shape itself. The Python on this path is kept to two
    # attribute reads and a call: on small activations every 100 ns shows in the shift's cost.
    if x.is_cpu and not torch.compiler.is_compiling() and not _exporting():
        op = _native if _native is not None else _look_up_native()
        if op:
            return op(x, num_segments, shift_div)
    if x.dim() != 4:
        raise ValueError(f"temporal_shift: expected (N*T, C, H, W) activations, got shape {tuple(x.shape)}")
    nt, c, _, _ = x.shape
    if _exporting():  # standard operators only: the exported graph must not need tsmtrain
        return _shifted_by_cat(x, num_segments, c // shift_div, False)
    if nt % num_segments:
        raise ValueError(f"temporal_shift: leading dimension {nt} is not a multiple of num_segments={num_segments}")
    return _TemporalShift.apply(x, num_segments, c // shift_div, False)


def _exporting() -> bool:
    """True while ``torch.jit.trace`` or ``torch.onnx.export`` records the network: the shift is
    then :func:`_shifted_by_cat` (pad, slice, concatenate), so the file holds only standard
    operators, never the native operator or the autograd Function's in-place strided writes."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


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
