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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
        flip: random horizontal flip with probability 0.5 (training only).
        mean, std: per-channel RGB normalisation, in [0, 1] units.
        generator: CPU ``torch.Generator`` for the random parameters; None uses torch's
            global CPU generator (seed it with ``torch.manual_seed``).

    Call with uint8 clips of shape (N, T, H, W, 3) (RGB, channels last, as the decoders
    return them) on any device; returns float32 (N, T, 3, S, S) on the same device.
    """

    def __init__(
        self,
        train: bool,
        input_size: int = 224,
        scales: Sequence[float] = TSM_SCALES,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        _check_scales(scales)
        self.train_mode = bool(train)  # not `training`: nn.Module.train()/eval() must not switch it
        self.input_size = int(input_size)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.generator = generator
        # Normalise in 0..255 units: (x - 255 * mean) / (255 * std) == (x / 255 - mean) / std.
        mean255 = torch.tensor(mean, dtype=torch.float32).view(1, 1, 3, 1, 1) * 255
        std255 = torch.tensor(std, dtype=torch.float32).view(1, 1, 3, 1, 1) * 255
        self.register_buffer("_mean255", mean255, persistent=False)
        self.register_buffer("_std255", std255, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"train={self.train_mode}, input_size={self.input_size}, scales={self.scales}, "
            f"flip={self.flip}"
        )

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, T, H, W, 3) uint8 -> (N, T, 3, S, S) float32, same device."""
        if not isinstance(clips, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor of uint8 clips (N, T, H, W, 3), got {type(clips).__name__}")
        if clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != 3:
            raise ValueError(
                "expected uint8 clips of shape (N, T, H, W, 3) (RGB, channels last), "
                f"got dtype {clips.dtype} and shape {tuple(clips.shape)}"
            )
        n, t, h, w, _ = clips.shape
        if h < 1 or w < 1 or t < 1:
            raise ValueError(f"expected non-empty frames (N, T, H, W, 3), got shape {tuple(clips.shape)}")
        s = self.input_size
        if n == 0:
            return torch.empty((0, t, 3, s, s), dtype=torch.float32, device=clips.device)
        if self.train_mode:
            out = self._random_crop_resize(clips)
            if self.flip:
                flip = torch.rand(n, generator=self.generator) < 0.5
                if flip.any():
                    idx = flip.nonzero().flatten().to(clips.device)
                    out[idx] = out[idx].flip(-1)
        else:
            out = self._centre_crop_resize(clips)
        mean = self._mean255.to(out.device)
        std = self._std255.to(out.device)
        return out.sub_(mean).div_(std)

    def _random_crop_resize(self, clips: torch.Tensor) -> torch.Tensor:
        """Per clip: crop the uint8 frames, convert the crop to float, resize to S x S.

        One ``interpolate`` per clip; on CPU this was faster than doing all clips at once
        with ``torchvision.ops.roi_align`` (which also averages several samples per output
        pixel unless ``sampling_ratio=1``, i.e. a different filter).
        """
        n, t, h, w, _ = clips.shape
        s = self.input_size
        out = torch.empty((n, t, 3, s, s), dtype=torch.float32, device=clips.device)
        for i in range(n):
            top, left, ch, cw = crop_params(h, w, s, self.scales, self.generator)
            crop = clips[i, :, top : top + ch, left : left + cw, :].permute(0, 3, 1, 2).float()
            out[i] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return out

    def _centre_crop_resize(self, clips: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to int(S * 256 / 224), keep the centre S x S crop."""
        n, t, h, w, _ = clips.shape
        s = self.input_size
        short = eval_resize_size(s)
        # Long side as torchvision's Resize(int): int(short * long / shorter).
        if h <= w:
            new_h, new_w = short, int(short * w / h)
        else:
            new_h, new_w = int(short * h / w), short
        frames = clips.reshape(n * t, h, w, 3).permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (h, w):
            frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        # Offsets as torchvision's center_crop.
        top = int(round((new_h - s) / 2.0))
        left = int(round((new_w - s) / 2.0))
        out = frames[:, :, top : top + s, left : left + s]
        return out.reshape(n, t, 3, s, s).contiguous()
