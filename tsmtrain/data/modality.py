"""What one segment of a clip holds, by ``data.modality``: appearance or motion.

* ``rgb``: one RGB frame per segment, 3 channels (TSN, TSM).
* ``flow``: ``L`` consecutive optical-flow fields per segment (``data.flow_length``, default 5),
  stacked as ``2L`` channels ``x1, y1, x2, y2, ...`` (the temporal stream of Simonyan and
  Zisserman 2014, "Two-Stream Convolutional Networks", sec. 3.1; TSN's ``new_length=5``). The
  fields are the quantized flow ``tsmtrain prepare --flow`` stores (:mod:`.flow`: 0..255 for
  ``[-bound, bound]`` pixels), normalised as mmaction2's flow recipes do (``mean=[128, 128],
  std=[128, 128]`` in 0..255 units). A horizontal flip negates x: ``255 - q`` for a quantized x
  (mmaction2's ``Flip`` inverts the x images of a flow stack the same way).
* ``rgb_diff``: the differences of ``L + 1`` consecutive RGB frames per segment, ``3L`` channels
  (TSN's RGB difference, Wang et al. 2016, sec. 3.2), computed on the training device after the
  frames are normalised: difference ``k`` is ``(frame[k+1] - frame[k]) / (255 * std)``.

The loader delivers ``T * F`` stored frames per clip (``F`` = :attr:`Modality.frames_per_segment`),
the augmentation crops, resizes and flips all of them alike (:mod:`.transforms`), and
:meth:`Modality.stack` turns ``(N, T*F, C, S, S)`` into the network's ``(N, T, C_in, S, S)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MODALITIES", "FLOW_MEAN", "FLOW_STD", "Modality", "RGB", "modality_of"]

MODALITIES = ("rgb", "flow", "rgb_diff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_MEAN = (128 / 255, 128 / 255)
"""mmaction2's flow normalisation (``mean=[128, 128]`` in 0..255 units), in 0..1 units."""
FLOW_STD = (128 / 255, 128 / 255)


@dataclass(frozen=True)
class Modality:
    """The input of one segment.

    Args:
        name: ``"rgb"``, ``"flow"`` or ``"rgb_diff"``.
        length: L: flow fields (flow) or frame differences (rgb_diff) per segment; 1 for rgb.
        mean, std: per stored channel, 0..1 units (3 for RGB frames, 2 for flow: x, y); None:
            ImageNet's for RGB frames, :data:`FLOW_MEAN`/:data:`FLOW_STD` for flow.

    Raises:
        ValueError: an unknown name, ``length < 1``, or mean/std of the wrong length or std <= 0.
    """

    name: str = "rgb"
    length: int = 1
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.name not in MODALITIES:
            raise ValueError(f"unknown modality {self.name!r}; choose one of {', '.join(MODALITIES)}")
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.name == "rgb":
            object.__setattr__(self, "length", 1)
        flow = self.name == "flow"
        mean = tuple(self.mean) if self.mean is not None else (FLOW_MEAN if flow else IMAGENET_MEAN)
        std = tuple(self.std) if self.std is not None else (FLOW_STD if flow else IMAGENET_STD)
        if len(mean) != self.channels or len(std) != self.channels or any(s <= 0 for s in std):
            raise ValueError(f"{self.name} needs {self.channels} mean and std values (std > 0), got mean={mean}, "
                             f"std={std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def frames_per_segment(self) -> int:
        """F: stored frames read per segment: 1 (rgb), L flow fields (flow), L + 1 frames (rgb_diff)."""
        return {"rgb": 1, "flow": self.length, "rgb_diff": self.length + 1}[self.name]

    @property
    def channels(self) -> int:
        """C: channels of one stored frame: 2 for a flow field (x, y), 3 for an RGB frame."""
        return 2 if self.name == "flow" else 3

    @property
    def in_channels(self) -> int:
        """C_in: channels of one segment as the network takes it: 3, 2L (flow) or 3L (rgb_diff)."""
        return {"rgb": 3, "flow": 2 * self.length, "rgb_diff": 3 * self.length}[self.name]

    @property
    def flip_invert(self) -> tuple[int, ...]:
        """Stored channels whose values a horizontal flip inverts (``v -> 255 - v``): flow's x."""
        return (0,) if self.name == "flow" else ()

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised frames ``(N, T*F, C, S, S)`` -> the network's input ``(N, T, C_in, S, S)``.

        Raises:
            ValueError: the second dimension is not a multiple of F, or C is not :attr:`channels`.
        """
        n, tf, c, h, w = x.shape
        f = self.frames_per_segment
        if tf % f or c != self.channels:
            raise ValueError(f"{self.name} with length {self.length}: expected (N, T*{f}, {self.channels}, H, W) "
                             f"frames, got {tuple(x.shape)}")
        if self.name == "rgb":
            return x
        x = x.view(n, tf // f, f, c, h, w)
        if self.name == "rgb_diff":
            x = x[:, :, 1:] - x[:, :, :-1]  # (N, T, L, 3, H, W)
        return x.reshape(n, tf // f, self.in_channels, h, w)


RGB = Modality()
"""One RGB frame per segment, ImageNet normalisation."""


def modality_of(data) -> Modality:
    """The :class:`Modality` a recipe's ``data`` section asks for (``modality``, ``flow_length``,
    ``mean``, ``std``)."""
    return Modality(data.modality, data.flow_length, data.mean, data.std)
