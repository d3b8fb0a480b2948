"""TSN and TSM video networks on torchvision 2D backbones.

* TSN (Wang et al., "Temporal Segment Networks", ECCV 2016): a 2D backbone runs on each of
  the T segment frames, a new classifier scores each frame, and the scores are averaged over
  the T segments (average consensus).
* TSM (Lin, Gan, Han, ICCV 2019): the same network with a residual temporal shift
  (:mod:`tsmtrain.models.shift`) before the first convolution of every residual block.

Backbones: ResNet-18, ResNet-50 (every BasicBlock/Bottleneck is shifted on its ``conv1``) and
MobileNetV2 (every InvertedResidual block with an identity connection is shifted on its
first layer), as in the official TSM code's ``blockres`` placement.

A motion input (optical flow, RGB difference) has ``in_channels`` other than 3 per segment; the
first convolution then takes them, initialised from an RGB checkpoint by TSN's cross-modality
initialisation (:func:`cross_modality_conv`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from .heads import create_head
from .shift import TemporalShift
from .sub_batch_norm import set_bn_splits
from .weights import load_weights

__all__ = ["VideoNet", "create_model", "count_parameters", "count_macs", "cross_modality_conv", "first_conv"]

BACKBONES = ("resnet18", "resnet50", "mobilenet_v2")


class VideoNet(nn.Module):
    """A 2D backbone applied per frame, dropout, a new classifier, average consensus.

    Args:
        arch: one of ``resnet18``, ``resnet50``, ``mobilenet_v2``.
        num_classes: classifier outputs.
        num_segments: T, the frames per clip (needed by the temporal shift).
        shift: insert the residual temporal shift (TSM); ``False`` gives TSN.
        shift_div: 1/shift_div of the channels shift each way.
        dropout: dropout probability before the classifier.
        pretrained: path of a local weights file to start from, nothing downloaded: a torchvision
            or timm ImageNet backbone, or a whole video network of the TSM repository, mmaction2
            or tsmtrain (:func:`tsmtrain.models.weights.load_weights`; a classifier of another
            class count is left out). With ``in_channels`` other than 3 an RGB first
            convolution is adapted by :func:`cross_modality_conv`'s rule.
        in_channels: C_in, channels per segment: 3 (RGB), 2L (L flow fields), 3L (L RGB
            differences).
        head: ``"linear"``: the classifier scores every segment and the scores are averaged
            (TSN's consensus); ``"moe"``: the segments' features are averaged and YouTube-8M's
            Mixture of Experts (:class:`~tsmtrain.models.heads.MoEHead`) scores them, giving
            log-odds.
        num_mixtures: experts per class of the ``moe`` head.

    Input ``(N, T, C_in, H, W)`` float; output logits ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``arch``, ``in_channels < 1``; in ``forward``, an input whose T or
            C_in differs.
        tsmtrain.models.weights.WeightsError: ``pretrained`` cannot be used: empty, unreadable,
            holding Python objects that could run code (refused unread), not a ``state_dict``, of
            another network, or with a key that fits nothing; one line naming ``model.pretrained``
            and the file (:func:`~tsmtrain.models.weights.load_weights`).

    Attributes:
        weights_report: the :class:`~tsmtrain.models.weights.WeightsReport` of ``pretrained``, or None.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        num_segments: int,
        shift: bool = True,
        shift_div: int = 8,
        dropout: float = 0.5,
        pretrained: str | Path | None = None,
        in_channels: int = 3,
        head: str = "linear",
        num_mixtures: int = 2,
    ):
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(BACKBONES)}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.arch, self.num_segments, self.is_tsm, self.in_channels = arch, num_segments, shift, in_channels
        self.shift_div = shift_div
        backbone = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:  # (from_rgb: no random draw; the loaded RGB kernel's average replaces it below)
            _set_first_conv(backbone, cross_modality_conv(first_conv(backbone), in_channels, pretrained is not None))
        if arch.startswith("resnet"):
            feature_dim = backbone.fc.in_features
            backbone.fc = nn.Identity()
        else:
            feature_dim = backbone.classifier[-1].in_features
            backbone.classifier = nn.Identity()  # its own dropout is replaced by ours
        self.backbone = backbone
        if shift:
            insert_residual_shift(backbone, num_segments, shift_div)
        self.dropout = nn.Dropout(dropout)
        self.head, self.feature_dim, self.num_classes = head, feature_dim, num_classes
        self.fc = create_head(head, feature_dim, num_classes, num_mixtures)  # linear: N(0, 0.001) as TSN/TSM
        self.weights_report = None
        if pretrained is not None:
            self.weights_report = load_weights(self, pretrained, need_classifier=False, label="model.pretrained")

    def set_segments(self, num_segments: int, bn_splits: int = 1) -> None:
        """Take clips of ``num_segments`` segments from now on, with the same weights: T here (the
        check in :meth:`features`) and in every :class:`TemporalShift`, whose shift works for any T;
        and normalise ``bn_splits`` sub-batches of clips separately in every BatchNorm in training
        (:func:`~tsmtrain.models.sub_batch_norm.set_bn_splits`; 1: the whole batch). Multigrid training
        (:mod:`tsmtrain.train.multigrid`) sets each batch's and sets the recipe's T (and 1) back before
        evaluating or saving; everything else runs at the T it was built with.
        """
        self.num_segments = num_segments
        for m in self.modules():
            if isinstance(m, TemporalShift):
                m.num_segments = num_segments
        set_bn_splits(self, bn_splits)

    def forward(self, x: torch.Tensor, classify: bool = True) -> torch.Tensor:
        """Logits ``(N, K)`` of clips ``(N, T, C_in, H, W)``; ``classify=False``: the features
        ``(N, D)`` (:meth:`features`), for a head applied outside (sharded across ranks)."""
        features = self.features(x)
        return self.fc(features) if classify else features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier ``fc`` sees: clips ``(N, T, C_in, H, W)`` -> ``(N, D)``.

        The backbone's pooled output of each segment frame, averaged over the T segments, after
        dropout (identity in eval mode). ``linear``: dropout on each segment's features before
        the average, so ``fc(features(x))`` is TSN's average consensus of per-segment scores
        (the classifier is linear); ``moe``: dropout on the average. ``forward(x)`` is
        ``fc(features(x))``; a head sharded across ranks (:mod:`tsmtrain.dist.head_parallel`)
        takes these features instead.

        Raises:
            ValueError: an input whose T or C_in differs.
        """
        n, t = x.shape[:2]
        if t != self.num_segments or x.shape[2] != self.in_channels:
            raise ValueError(f"expected (N, {self.num_segments}, {self.in_channels}, H, W) clips ({self.num_segments} "
                             f"segments of {self.in_channels} channels), got input of shape {tuple(x.shape)}")
        features = self.backbone(x.flatten(0, 1)).view(n, t, -1)  # (N, T, D)
        if self.head == "linear":
            return self.dropout(features).mean(dim=1)
        return self.dropout(features.mean(dim=1))


def insert_residual_shift(backbone: nn.Module, num_segments: int, shift_div: int) -> int:
    """Wrap the first layer of every residual branch in :class:`TemporalShift`, in place.

    Returns the number of blocks shifted.
    """
    count = 0
    for m in backbone.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            m.conv1 = TemporalShift(m.conv1, num_segments, shift_div)
            count += 1
        elif isinstance(m, InvertedResidual) and m.use_res_connect:
            m.conv[0] = TemporalShift(m.conv[0], num_segments, shift_div)
            count += 1
    return count


def first_conv(backbone: nn.Module) -> nn.Conv2d:
    """The convolution that takes the image: ``conv1`` of a ResNet, ``features[0][0]`` of MobileNetV2."""
    return backbone.conv1 if hasattr(backbone, "conv1") else backbone.features[0][0]


def _set_first_conv(backbone: nn.Module, conv: nn.Conv2d) -> None:
    if hasattr(backbone, "conv1"):
        backbone.conv1 = conv
    else:
        backbone.features[0][0] = conv


def cross_modality_conv(conv: nn.Conv2d, in_channels: int, from_rgb: bool = True) -> nn.Conv2d:
    """A copy of an RGB first convolution that takes ``in_channels`` channels.

    With ``from_rgb`` the RGB kernel ``(O, 3, k, k)`` is averaged over its colour channels and
    repeated ``in_channels`` times: TSN's cross-modality initialisation (Wang et al. 2016,
    "Temporal Segment Networks", sec. 3.2; ``_construct_flow_model`` in its code), so a flow or
    RGB-difference stream starts from ImageNet features. Without it the kernel is drawn afresh as
    torchvision initialises its convolutions (Kaiming normal, fan-out).

    Returns:
        a new :class:`torch.nn.Conv2d` ``(O, in_channels, k, k)`` with the same stride, padding
        and bias.
    """
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        if from_rgb:
            new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def create_model(cfg, num_segments: int, in_channels: int = 3) -> VideoNet:
    """Build the network a recipe's ``model`` section describes (``tsmtrain.recipe.ModelConfig``),
    taking ``in_channels`` per segment (``tsmtrain.data.modality.Modality.in_channels``)."""
    return VideoNet(
        arch=cfg.arch,
        num_classes=cfg.num_classes,
        num_segments=num_segments,
        shift=cfg.shift,
        shift_div=cfg.shift_div,
        dropout=cfg.dropout,
        pretrained=cfg.pretrained,
        in_channels=in_channels,
        head=cfg.head,
        num_mixtures=cfg.num_mixtures,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: VideoNet, input_size: int, batch: int = 1) -> float:
    """Multiply-accumulates for one forward pass of one clip ``(1, T, C_in, S, S)``.

    Counted with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which counts two
    FLOPs per multiply-add of convolutions and matrix products; the temporal shift costs none.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, model.num_segments, model.in_channels, input_size, input_size)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch
