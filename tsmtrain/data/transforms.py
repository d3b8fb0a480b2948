"""Batched video augmentation as tensor operations, run on the training device.

The data loader delivers uint8 clips of shape (N, T, H, W, 3); once that batch has been
moved to the training device, :class:`VideoTransform` crops, resizes, flips and normalises
it there (on the GPU when training on one), giving float32 (N, T, 3, S, S).

The method follows TSN (Wang et al. 2016, "Temporal Segment Networks", multi-scale
cropping with scale jittering) as implemented in the TSM code (Lin et al. 2019,
``ops/transforms.py``: ``GroupMultiScaleCrop``, ``GroupRandomHorizontalFlip``,
``GroupScale`` + ``GroupCenterCrop``, ``GroupNormalize``):

* training: crop sizes are ``int(shorter_side * s)`` for ``s`` in ``scales`` (default
  1, .875, .75, .66); a size within 3 pixels of ``input_size`` is snapped to it, as in
  ``GroupMultiScaleCrop``. Crop height and width are chosen independently with indices
  ``i, j`` into the scales such that ``|i - j| <= 1`` (``max_distort=1``: some aspect
  jitter), uniformly over the allowed pairs. One difference from TSM: the crop position is
  uniform over all positions where the crop fits, instead of TSM's fixed corner/centre
  offsets (``fix_crop`` / ``more_fix_crop``). The crop is resized to
  ``input_size x input_size`` (bilinear), then the clip is flipped horizontally with
  probability 0.5 (``flip=False`` turns this off, for data sets where left and right
  matter, such as Something-Something).
* evaluation: the shorter side is resized to ``int(input_size * 256 / 224)`` (256 for 224,
  the usual ImageNet resize/crop ratio, as in TSM's ``scale_size``) and the centre
  ``input_size x input_size`` is cropped.
* both: ``(x / 255 - mean) / std`` with ImageNet mean/std by default.

The same crop and flip is applied to all T frames of a clip; different clips get
independent draws. Random parameters are drawn on the CPU from a ``torch.Generator`` (or
from torch's global CPU generator), so results are reproducible and do not depend on the
device; only the tensor operations run on the clips' device.

Resizing uses ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
antialias=False)``. Unlike TSM's PIL resizing it does not low-pass filter when shrinking,
so strong downscaling aliases slightly; this keeps the same fast kernel on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .modality import RGB, Modality
TSM_SCALES = (1.0, 0.875, 0.75, 0.66)
EVAL_RESIZE_RATIO = 256 / 224
MAX_DISTORT = 1


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive), drawn on the CPU."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _check_scales(scales: Sequence[float]) -> None:
    if not scales or any(not 0 < s <= 1 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of numbers in (0, 1], got {tuple(scales)}")


def crop_params(
    h: int,
    w: int,
    input_size: int,
    scales: Sequence[float] = TSM_SCALES,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw one multi-scale crop box for a frame of size ``h x w`` (TSN/TSM method).

    Candidate sizes are ``int(min(h, w) * s)`` for ``s`` in ``scales``, snapped to
    ``input_size`` when within 3 pixels of it (as TSM's ``GroupMultiScaleCrop``) and capped
    at the frame size. Height index ``i`` and width index ``j`` are drawn uniformly among
    the pairs with ``|i - j| <= 1``; the position is uniform over all positions where the
    crop fits (TSM uses fixed corner/centre offsets instead).

    Args:
        h, w: frame height and width in pixels.
        input_size: network input size S (used only for the 3-pixel snapping).
        scales: fractions of the shorter side, each in (0, 1].
        generator: CPU ``torch.Generator``; None uses torch's global CPU generator.

    Returns:
        ``(top, left, crop_h, crop_w)`` with ``0 <= top``, ``top + crop_h <= h``,
        ``0 <= left``, ``left + crop_w <= w`` and ``crop_h, crop_w >= 1``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"frame size must be positive, got h={h}, w={w}")
    _check_scales(scales)
    base = min(h, w)
    sizes = [max(1, int(base * s)) for s in scales]
    sizes = [input_size if abs(x - input_size) < 3 else x for x in sizes]
    pairs = [
        (min(ch, h), min(cw, w))
        for i, ch in enumerate(sizes)
        for j, cw in enumerate(sizes)
        if abs(i - j) <= MAX_DISTORT
    ]
    crop_h, crop_w = pairs[_randint(0, len(pairs) - 1, generator)]
    top = _randint(0, h - crop_h, generator)
    left = _randint(0, w - crop_w, generator)
    return top, left, crop_h, crop_w


def eval_resize_size(input_size: int) -> int:
    """Shorter side used before the evaluation centre crop: ``int(input_size * 256 / 224)``."""
    return int(input_size * EVAL_RESIZE_RATIO)


class VideoTransform(torch.nn.Module):
    """Crop, resize, flip and normalise a batch of uint8 clips on their own device.

    Args:
        train: True for random multi-scale crop + flip, False for resize + centre crop.
        input_size: output side S.
        scales: crop scales of the shorter side (training only).
        flip: random horizontal flip with probability 0.5 (training only); for flow it also
            negates x (``255 - q``, :attr:`~tsmtrain.data.modality.Modality.flip_invert`).
        mean, std: per-channel normalisation, in [0, 1] units; None: the modality's.
        generator: CPU ``torch.Generator`` for the random parameters; None uses torch's
            global CPU generator (seed it with ``torch.manual_seed``).
        modality: what a segment holds (:mod:`tsmtrain.data.modality`); RGB by default.

    Call with uint8 clips of shape (N, T*F, H, W, C) (channels last, as the decoders return
    them; F frames per segment and C channels per frame, 1 and 3 for RGB) on any device; returns
    float32 (N, T, C_in, S, S) on the same device (:meth:`Modality.stack`; (N, T, 3, S, S) for RGB).
    """

    def __init__(
        self,
        train: bool,
        input_size: int = 224,
        scales: Sequence[float] = TSM_SCALES,
        flip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        modality: Modality = RGB,
    ):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.modality = Modality(modality.name, modality.length, mean or modality.mean, std or modality.std)
        mean, std = self.modality.mean, self.modality.std
        c = self.modality.channels
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        _check_scales(scales)
        self.train_mode = bool(train)  # not `training`: nn.Module.train()/eval() must not switch it
        self.input_size = int(input_size)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.generator = generator
        # Normalise in 0..255 units: (x - 255 * mean) / (255 * std) == (x / 255 - mean) / std.
        mean255 = torch.tensor(mean, dtype=torch.float32).view(1, 1, c, 1, 1) * 255
        std255 = torch.tensor(std, dtype=torch.float32).view(1, 1, c, 1, 1) * 255
        self.register_buffer("_mean255", mean255, persistent=False)
        self.register_buffer("_std255", std255, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"train={self.train_mode}, input_size={self.input_size}, scales={self.scales}, "
            f"flip={self.flip}, modality={self.modality.name}, length={self.modality.length}"
        )

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, T*F, H, W, C) uint8 -> (N, T, C_in, S, S) float32, same device."""
        c, f = self.modality.channels, self.modality.frames_per_segment
        if not isinstance(clips, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor of uint8 clips (N, T, H, W, {c}), got {type(clips).__name__}")
        if clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != c:
            shape = "(N, T, H, W, 3) (RGB" if self.modality.name == "rgb" else f"(N, T*{f}, H, W, {c}) ({self.modality.name}"
            raise ValueError(f"expected uint8 clips of shape {shape}, channels last), got dtype {clips.dtype} and "
                             f"shape {tuple(clips.shape)}")
        n, t, h, w, _ = clips.shape
        if h < 1 or w < 1 or t < 1:
            raise ValueError(f"expected non-empty frames (N, T, H, W, {c}), got shape {tuple(clips.shape)}")
        s = self.input_size
        if n == 0:
            return torch.empty((0, t // f, self.modality.in_channels, s, s), dtype=torch.float32, device=clips.device)
        if self.train_mode:
            out = self._random_crop_resize(clips)
            if self.flip:
                flip = torch.rand(n, generator=self.generator) < 0.5
                if flip.any():
                    idx = flip.nonzero().flatten().to(clips.device)
                    out[idx] = flip_frames(out[idx], self.modality.flip_invert)
        else:
            out = self._centre_crop_resize(clips)
        mean = self._mean255.to(out.device)
        std = self._std255.to(out.device)
        return self.modality.stack(out.sub_(mean).div_(std))

    def _random_crop_resize(self, clips: torch.Tensor) -> torch.Tensor:
        """Per clip: crop the uint8 frames, convert the crop to float, resize to S x S.

        One ``interpolate`` per clip; on CPU this was faster than doing all clips at once
        with ``torchvision.ops.roi_align`` (which also averages several samples per output
        pixel unless ``sampling_ratio=1``, i.e. a different filter).
        """
        n, t, h, w, c = clips.shape
        s = self.input_size
        out = torch.empty((n, t, c, s, s), dtype=torch.float32, device=clips.device)
        for i in range(n):
            top, left, ch, cw = crop_params(h, w, s, self.scales, self.generator)
            crop = clips[i, :, top : top + ch, left : left + cw, :].permute(0, 3, 1, 2).float()
            out[i] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return out

    def _centre_crop_resize(self, clips: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to int(S * 256 / 224), keep the centre S x S crop."""
        n, t, h, w, c = clips.shape
        s = self.input_size
        new_h, new_w = short_side_size(h, w, eval_resize_size(s))
        frames = _resize_frames(clips.reshape(n * t, h, w, c), new_h, new_w)
        top, left, _, _ = centre_crop_box(new_h, new_w, s)
        out = frames[:, :, top : top + s, left : left + s]
        return out.reshape(n, t, c, s, s).contiguous()


def flip_frames(frames: torch.Tensor, invert: Sequence[int] = ()) -> torch.Tensor:
    """Float frames ``(..., C, H, W)`` in 0..255 units flipped horizontally, channels ``invert``
    made ``255 - v`` (flow's x: a mirrored motion goes the other way; 255 - q is -x exactly for
    :func:`~tsmtrain.data.flow.quantize_flow`'s mapping). Returns a new tensor."""
    out = frames.flip(-1)
    for c in invert:
        out[..., c, :, :] = 255 - out[..., c, :, :]
    return out


# --------------------------------------------------------------------------- test views

TEST_CROPS = (1, 3, 10)
"""The spatial test protocols: 1 centre crop, 3 crops along the long side, 10 crops (5 + flips)."""


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of a frame of ``h x w`` resized so that its shorter side is ``short``;
    the longer side as torchvision's ``Resize(int)`` computes it, ``int(short * long / shorter)``."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def _resize_frames(frames: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """uint8 ``(M, H, W, C)`` -> float32 ``(M, C, new_h, new_w)`` (bilinear, as :class:`VideoTransform`)."""
    x = frames.permute(0, 3, 1, 2).float()
    if (new_h, new_w) != tuple(frames.shape[1:3]):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    return x


def centre_crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """The centre ``size x size`` box of an ``h x w`` frame, ``(top, left, size, size)``, with
    torchvision's ``center_crop`` offsets ``round((h - size) / 2)``, ``round((w - size) / 2)``."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size, size


def three_crop_boxes(h: int, w: int, size: int) -> list[tuple[int, int, int, int]]:
    """Three ``size x size`` boxes along the longer side of an ``h x w`` frame whose shorter side
    is ``size``: at the start, the centre and the end, ``(top, left, size, size)`` each.

    The offsets along the longer side L are ``0, step, 2 * step`` with ``step = (L - size) // 2``,
    as mmaction2's ``ThreeCrop(crop_size=size)`` (``mmaction/datasets/transforms/processing.py``;
    it lists them left, right, middle), so the last box may stop one pixel short of the end. The
    TSM repository's ``GroupFullResSample`` (``ops/transforms.py``, used by ``test_models.py
    --test_crops 3 --full_res``) takes ``0, 2 * q, 4 * q`` with ``q = (L - size) // 4`` instead,
    up to 3 pixels from the centre and the end.

    Raises:
        ValueError: ``size`` is not the shorter side (a square crop of the shorter side is the
            point of the protocol).
    """
    if size != min(h, w):
        raise ValueError(f"three crops take squares of the shorter side: size {size}, frame {h}x{w}")
    step = (max(h, w) - size) // 2
    if w >= h:
        return [(0, i * step, size, size) for i in range(3)]
    return [(i * step, 0, size, size) for i in range(3)]


def ten_crop_boxes(h: int, w: int, size: int) -> list[tuple[int, int, int, int, bool]]:
    """Ten ``size x size`` views of an ``h x w`` frame: the four corners and the centre, each
    also flipped horizontally, as ``(top, left, size, size, flipped)``.

    Offsets are those of the TSM repository's ``GroupOverSample`` (``ops/transforms.py``,
    ``GroupMultiScaleCrop.fill_fix_offset(False, ...)``) and mmaction2's ``TenCrop``: with
    ``ws = (w - size) // 4`` and ``hs = (h - size) // 4``, (left, top) = (0, 0), (4 ws, 0),
    (0, 4 hs), (4 ws, 4 hs), (2 ws, 2 hs); each box is followed by its flip (mmaction2's order;
    TSM's is the same). The corners may stop up to 3 pixels short of the frame's edges, and the
    centre box may differ by up to 2 pixels from :func:`centre_crop_box`.

    Raises:
        ValueError: ``size`` larger than the frame.
    """
    if size > min(h, w):
        raise ValueError(f"crop size {size} larger than the frame {h}x{w}")
    ws, hs = (w - size) // 4, (h - size) // 4
    boxes = []
    for left, top in ((0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)):
        boxes += [(top, left, size, size, False), (top, left, size, size, True)]
    return boxes


def view_boxes(h: int, w: int, input_size: int, crops: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int, bool]]]:
    """The geometry of a test protocol's crops for frames of ``h x w``.

    Every protocol first resizes the shorter side to ``R = eval_resize_size(input_size)`` (256
    for 224, TSM's ``scale_size``), then:

    * ``crops=1``: the centre ``S x S`` box (:func:`centre_crop_box`; exactly the evaluation
      crop of :class:`VideoTransform`, ``train=False``);
    * ``crops=3``: three ``R x R`` boxes along the longer side (:func:`three_crop_boxes`); the
      network sees ``R x R`` views (256 x 256 for 224), as in TSM's ``--full_res`` test and
      mmaction2's ``ThreeCrop(crop_size=256)`` configurations: the network ends in global
      average pooling, so it takes any size;
    * ``crops=10``: four corners and the centre at ``S x S``, and their flips (:func:`ten_crop_boxes`).

    Returns:
        ``((new_h, new_w), boxes)``: the resized frame size and ``(top, left, crop_h, crop_w,
        flipped)`` per crop, in the resized frame.

    Raises:
        ValueError: ``crops`` not in :data:`TEST_CROPS`.
    """
    if crops not in TEST_CROPS:
        raise ValueError(f"crops must be one of {', '.join(map(str, TEST_CROPS))}, got {crops}")
    r = eval_resize_size(input_size)
    new_h, new_w = short_side_size(h, w, r)
    if crops == 1:
        boxes = [(*centre_crop_box(new_h, new_w, input_size), False)]
    elif crops == 3:
        boxes = [(*b, False) for b in three_crop_boxes(new_h, new_w, r)]
    else:
        boxes = ten_crop_boxes(new_h, new_w, input_size)
    return (new_h, new_w), boxes


def view_side(input_size: int, crops: int) -> int:
    """Side in pixels of the views a protocol feeds the network: ``eval_resize_size(S)`` for 3
    crops, ``S`` otherwise."""
    return eval_resize_size(input_size) if crops == 3 else input_size


class TestViews(torch.nn.Module):
    """All test views of a batch of multi-clip videos, normalised, on the clips' device.

    Call with uint8 ``(N, K, T*F, H, W, C)`` (K clips of T segments of F frames per video,
    channels last; F = 1 and C = 3 for RGB); returns float32 ``(N, K * Cr, T, C_in, V, V)``, view
    ``k * Cr + c`` being crop ``c`` of clip ``k`` (Cr = ``crops``, V = :func:`view_side`, C_in the
    modality's channels per segment, :meth:`~tsmtrain.data.modality.Modality.stack`). Geometry:
    :func:`view_boxes`; a flipped view of flow also negates x. With ``crops=1`` the views equal
    :class:`VideoTransform` (``train=False``) of each clip.

    Args:
        input_size: S.
        crops: 1, 3 or 10.
        mean, std: per-channel normalisation, in [0, 1] units; None: the modality's.
        modality: what a segment holds; RGB by default.

    Raises:
        ValueError: ``crops`` not 1, 3 or 10, or input not uint8 ``(N, K, T*F, H, W, C)``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, input_size: int = 224, crops: int = 1, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, modality: Modality = RGB):
        super().__init__()
        if crops not in TEST_CROPS:
            raise ValueError(f"crops must be one of {', '.join(map(str, TEST_CROPS))}, got {crops}")
        self.input_size, self.crops = int(input_size), int(crops)
        self.modality = Modality(modality.name, modality.length, mean or modality.mean, std or modality.std)
        c = self.modality.channels
        self.register_buffer("_mean255", torch.tensor(self.modality.mean, dtype=torch.float32).view(1, 1, c, 1, 1)
                             * 255, persistent=False)
        self.register_buffer("_std255", torch.tensor(self.modality.std, dtype=torch.float32).view(1, 1, c, 1, 1)
                             * 255, persistent=False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, K, T*F, H, W, C)`` -> float32 ``(N, K * Cr, T, C_in, V, V)``."""
        c = self.modality.channels
        if not isinstance(clips, torch.Tensor) or clips.dtype != torch.uint8 or clips.dim() != 6 or clips.shape[-1] != c:
            raise ValueError(f"expected uint8 clips of shape (N, K, T, H, W, {c}), got "
                             + (f"{clips.dtype} {tuple(clips.shape)}" if isinstance(clips, torch.Tensor)
                                else type(clips).__name__))
        n, k, t, h, w, _ = clips.shape
        (new_h, new_w), boxes = view_boxes(h, w, self.input_size, self.crops)
        frames = _resize_frames(clips.reshape(n * k * t, h, w, c), new_h, new_w)  # (N*K*T, C, h', w')
        views = []
        for top, left, ch, cw, flipped in boxes:
            v = frames[:, :, top : top + ch, left : left + cw]
            views.append(flip_frames(v, self.modality.flip_invert) if flipped else v)
        cr, side = len(boxes), boxes[0][2]
        out = torch.stack(views, 1).reshape(n, k, t, cr, c, side, side).permute(0, 1, 3, 2, 4, 5, 6)
        out = out.reshape(n * k * cr, t, c, side, side)
        out = self.modality.stack((out - self._mean255.to(out.device)) / self._std255.to(out.device))
        return out.reshape(n, k * cr, *out.shape[1:])
