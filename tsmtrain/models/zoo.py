"""Weights files of other projects: their key names, their containers and what they record.

tsmtrain's :class:`~tsmtrain.models.networks.VideoNet` holds the same tensors as the networks of
the model zoos people start from; only the names differ. Four formats besides tsmtrain's own:

* ``tsm``: the TSM authors' code (github.com/mit-han-lab/temporal-shift-module, ``ops/models.py``
  ``TSN``), as its ``main.py`` saves it: ``{"epoch", "arch", "state_dict", "optimizer",
  "best_prec1"}``, the model wrapped in ``DataParallel``, so keys ``module.base_model.*`` (the
  torchvision backbone, its ``fc`` a parameterless Dropout) and ``module.new_fc.*`` (the new
  classifier; with dropout 0 it sits in ``base_model.fc`` instead). The residual shift wraps
  ``conv1`` of each ResNet block as ``.net``, as tsmtrain's does. MobileNetV2 is the repository's
  own (``archs/mobilenet_v2.py``): its blocks are flat ``conv`` Sequentials of 5 or 8 layers,
  mapped here onto torchvision's nested ones, and its shift wraps the expansion convolution alone
  (tsmtrain's wraps the convolution with its BatchNorm and ReLU6: the same function). Its file
  names record the settings (``TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth``),
  which its ``test_models.py`` reads; :func:`settings_from_file_name` reads them the same way.
* ``mmaction2``: mmaction2's ``Recognizer2D`` (``ResNet`` / ``ResNetTSM`` backbone, ``TSNHead`` /
  ``TSMHead``), as mmengine's runner saves it: ``{"meta", "state_dict", "message_hub",
  "optimizer", "param_schedulers"}`` (a published model zoo file keeps ``meta`` and
  ``state_dict``). Convolutions are ``ConvModule`` s (``conv1.conv``, ``conv1.bn``; ``downsample.conv``,
  ``downsample.bn``), the shift wraps ``conv1.conv``, the classifier is ``cls_head.fc_cls``. The
  config text in ``meta["cfg"]`` records ``num_segments`` and ``shift_div``.
* ``torchvision``: an ImageNet ``state_dict`` of the backbone alone (today's ``model.pretrained``);
  timm's ResNet-50 has the same key names and loads as this format. Its classifier is ImageNet's
  and is always left out.
* ``tsmtrain``: a checkpoint of ``tsmtrain run`` or ``tsmtrain convert`` (``{"model": state_dict,
  "recipe": ...}``), or a bare ``VideoNet`` ``state_dict``.

Everything here works on names and plain values; :mod:`tsmtrain.models.weights` reads and writes
the files and loads the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FORMATS", "Recorded", "detect_format", "their_names", "settings_from_file_name",
           "settings_from_mmaction2_name", "settings_of",
           "unsupported_parts", "official_file_name"]

FORMATS = ("tsmtrain", "tsm", "mmaction2", "torchvision")
"""The weights formats tsmtrain reads and (all but ``torchvision``) writes."""

HEADS = {"tsmtrain": "fc.", "tsm": "new_fc.", "mmaction2": "cls_head.fc_cls.", "torchvision": ("fc.", "classifier.")}
"""The classifier's key prefix in each format (after ``module.`` is removed)."""


@dataclass
class Recorded:
    """What a weights file says about the network it holds, and where it says it.

    Attributes:
        format: one of :data:`FORMATS`.
        arch: ``resnet18``, ``resnet50``, ``mobilenet_v2`` or another name the file gives; None
            where it gives none.
        shift: whether its blocks hold the temporal shift (from the keys: always known).
        shift_div, num_segments: as recorded, or None.
        modality: ``RGB``, ``Flow``, ... where the file name says.
        sources: for each of the above that is known, where it was read (``file name``,
            ``meta cfg``, ``its recipe``, ``arch entry``, ``keys``).
    """

    format: str
    arch: str | None = None
    shift: bool | None = None
    shift_div: int | None = None
    num_segments: int | None = None
    modality: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value, source: str) -> None:
        """Record ``name = value`` read from ``source``, unless already known or ``value`` is None."""
        if value is not None and getattr(self, name) is None:
            setattr(self, name, value)
            self.sources[name] = source


def strip_wrapper(key: str) -> str:
    """``key`` without DataParallel's / DDP's ``module.`` prefix."""
    return key[len("module."):] if key.startswith("module.") else key


def detect_format(keys: list[str], container_keys: list[str] = ()) -> str | None:
    """The format of a ``state_dict`` (its keys, ``module.`` removed or not) found in a file whose
    top-level dict has ``container_keys``; None when the keys are of no format tsmtrain knows."""
    keys = [strip_wrapper(k) for k in keys]
    if any(k.startswith("base_model.") for k in keys):
        return "tsm"
    if any(k.startswith("cls_head.") for k in keys) or "backbone.conv1.conv.weight" in keys:
        return "mmaction2"
    if any(k.startswith("backbone.") for k in keys):
        return "tsmtrain"
    if "conv1.weight" in keys or "features.0.0.weight" in keys:
        return "torchvision"
    return None


# ----------------------------------------------------------------------------------------------
# key names: tsmtrain's key -> theirs (one direction; the other is the inverse dictionary)

_MMACTION_RESNET = [
    (re.compile(r"^backbone\.conv1\.(?P<rest>.*)$"), r"backbone.conv1.conv.\g<rest>"),
    (re.compile(r"^backbone\.bn1\.(?P<rest>.*)$"), r"backbone.conv1.bn.\g<rest>"),
    (re.compile(r"^(?P<block>backbone\.layer\d+\.\d+)\.conv(?P<i>\d)\.(?P<rest>.*)$"), r"\g<block>.conv\g<i>.conv.\g<rest>"),
    (re.compile(r"^(?P<block>backbone\.layer\d+\.\d+)\.bn(?P<i>\d)\.(?P<rest>.*)$"), r"\g<block>.conv\g<i>.bn.\g<rest>"),
    (re.compile(r"^(?P<block>backbone\.layer\d+\.\d+)\.downsample\.0\.(?P<rest>.*)$"), r"\g<block>.downsample.conv.\g<rest>"),
    (re.compile(r"^(?P<block>backbone\.layer\d+\.\d+)\.downsample\.1\.(?P<rest>.*)$"), r"\g<block>.downsample.bn.\g<rest>"),
    (re.compile(r"^fc\.(?P<rest>.*)$"), r"cls_head.fc_cls.\g<rest>"),
]

# torchvision's MobileNetV2 block ``conv`` (nested: [ConvBNReLU, ConvBNReLU, Conv2d, BatchNorm2d], or
# [ConvBNReLU, Conv2d, BatchNorm2d] without expansion) -> the TSM repository's flat Sequential of 8 or 5
_MOBILENET_EXPANDED = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7",
                       "0.net.0": "0.net", "0.net.1": "1"}  # shifted: tsmtrain wraps conv+BN, TSM the conv
_MOBILENET_FIRST = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
_MOBILENET_KEY = re.compile(r"^features\.(?P<i>\d+)\.conv\.(?P<layer>\d(?:\.net)?(?:\.\d)?)\.(?P<param>[a-z_]+)$")


def _tsm_mobilenet(key: str) -> str:
    """A torchvision MobileNetV2 backbone key -> the TSM repository's ``archs/mobilenet_v2.py`` key."""
    m = _MOBILENET_KEY.match(key)
    if m is None:  # features.0.* (conv_bn) and features.18.* (conv_1x1_bn) are the same
        return key
    table = _MOBILENET_FIRST if m["i"] == "1" else _MOBILENET_EXPANDED
    return f"features.{m['i']}.conv.{table[m['layer']]}.{m['param']}"


_MMACTION_MOBILENET_BLOCKS = (1, 2, 3, 4, 3, 3, 1)  # blocks of mmaction2's MobileNetV2 layer1..layer7
_MMACTION_MOBILENET_LAYER = {"0.0": "0.conv", "0.1": "0.bn", "1.0": "1.conv", "1.1": "1.bn", "2": "2.conv", "3": "2.bn",
                             "0.net.0": "0.net.conv", "0.net.1": "0.net.bn"}
_MMACTION_MOBILENET_FIRST = {"0.0": "0.conv", "0.1": "0.bn", "1": "1.conv", "2": "1.bn"}


def _mmaction_mobilenet(key: str) -> str:
    """A tsmtrain MobileNetV2 key -> mmaction2's ``MobileNetV2`` / ``MobileNetV2TSM`` key
    (``conv1``, ``layer1..7`` of ConvModule blocks, ``conv2``; its shift wraps the whole
    expansion ConvModule, as tsmtrain's does)."""
    if key.startswith("fc."):
        return "cls_head.fc_cls." + key[3:]
    inner = key[len("backbone.features."):]
    index, rest = inner.split(".", 1)
    index = int(index)
    if index in (0, 18):  # the stem and the last 1x1 convolution: ConvModules
        name = "conv1" if index == 0 else "conv2"
        layer, param = rest.split(".", 1)
        return f"backbone.{name}.{'conv' if layer == '0' else 'bn'}.{param}"
    m = _MOBILENET_KEY.match(f"features.{index}.{rest}")
    block, layer = index - 1, None
    for number, blocks in enumerate(_MMACTION_MOBILENET_BLOCKS, start=1):
        if block < blocks:
            layer = f"layer{number}.{block}"
            break
        block -= blocks
    table = _MMACTION_MOBILENET_FIRST if index == 1 else _MMACTION_MOBILENET_LAYER
    return f"backbone.{layer}.conv.{table[m['layer']]}.{m['param']}"


def their_names(fmt: str, our_keys: list[str], arch: str) -> dict[str, str]:
    """tsmtrain's key -> the key ``fmt`` gives the same tensor (``module.`` not included), for
    every key in ``our_keys`` (a ``VideoNet.state_dict()`` of backbone ``arch``). Keys with no
    counterpart (the classifier of a ``torchvision`` backbone file) are left out.

    Raises:
        ValueError: ``fmt`` unknown.
    """
    if fmt == "tsmtrain":
        return {k: k for k in our_keys}
    if fmt == "torchvision":
        # ImageNet weights fit TSN and TSM alike: the shift has none, it only wraps a layer (``.net``)
        return {k: k[len("backbone."):].replace(".net.", ".") for k in our_keys if k.startswith("backbone.")}
    if fmt == "tsm":
        out = {}
        for k in our_keys:
            if k.startswith("fc."):
                out[k] = "new_fc." + k[3:]
            else:
                inner = k[len("backbone."):]
                out[k] = "base_model." + (_tsm_mobilenet(inner) if arch == "mobilenet_v2" else inner)
        return out
    if fmt == "mmaction2":
        if arch == "mobilenet_v2":
            return {k: _mmaction_mobilenet(k) for k in our_keys}
        out = {}
        for k in our_keys:
            for pattern, replacement in _MMACTION_RESNET:
                if pattern.match(k):
                    out[k] = pattern.sub(replacement, k)
                    break
            else:
                out[k] = k
        return out
    raise ValueError(f"unknown weights format {fmt!r}; choose one of {', '.join(FORMATS)}")


def alias_their_keys(fmt: str, keys: list[str]) -> dict[str, str]:
    """The other names a format gives a tensor -> the name :func:`their_names` uses: the TSM
    repository puts the classifier in ``base_model.fc`` (ResNet) or ``base_model.classifier``
    (MobileNetV2) when trained with dropout 0 (its ``test_models.py`` renames them the same way)."""
    if fmt != "tsm":
        return {}
    out = {}
    for k in keys:
        for prefix in ("base_model.fc.", "base_model.classifier."):
            if k.startswith(prefix):
                out[k] = "new_fc." + k[len(prefix):]
    return out


# ----------------------------------------------------------------------------------------------
# what the files record

_OFFICIAL_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenetv2": "mobilenet_v2",
                   "mobilenet_v2": "mobilenet_v2"}


def settings_from_file_name(path: str | Path, recorded: Recorded) -> None:
    """Read the settings the TSM repository writes into its file names, as its
    ``test_models.py`` does (``TSM_<dataset>_<modality>_<arch>[_shift<div>_<place>]_<consensus>_segment<T>_e<epochs>[_dense][_nl].pth``),
    into ``recorded``. A name of another form records nothing."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 4 or tokens[0] not in ("TSM", "TSN"):
        return
    source = "file name"
    recorded.set("modality", tokens[2] if tokens[2] in ("RGB", "Flow", "RGBDiff") else None, source)
    recorded.set("arch", _OFFICIAL_ARCHS.get(tokens[3], tokens[3]), source)
    for token in tokens[4:]:
        if m := re.fullmatch(r"shift(\d+)", token):
            recorded.set("shift_div", int(m[1]), source)
        elif m := re.fullmatch(r"segment(\d+)", token):
            recorded.set("num_segments", int(m[1]), source)


_MMACTION_ARCHS = {"r18": "resnet18", "r50": "resnet50", "mobilenetv2": "mobilenet_v2"}


def settings_from_mmaction2_name(path: str | Path, recorded: Recorded) -> None:
    """Read what mmaction2's model-zoo file names record, into ``recorded``: the backbone and the
    sampling ``clip_len x frame_interval x num_clips`` (``tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb_20220831-64d69186.pth``,
    0.x: ``tsm_r50_1x1x8_50e_kinetics400_rgb_20200607-af7fb746.pth``; with ``clip_len`` 1,
    ``num_clips`` is the segment count)."""
    stem = Path(path).stem
    if not re.match(r"(tsm|tsn)[_-]", stem):
        return
    parts = re.split(r"[_-]", stem)
    recorded.set("arch", next((_MMACTION_ARCHS[t] for t in parts if t in _MMACTION_ARCHS), None), "file name")
    sampling = next((m for t in parts if (m := re.fullmatch(r"1x\d+x(\d+)", t))), None)
    recorded.set("num_segments", int(sampling[1]) if sampling else None, "file name")


def settings_of(fmt: str, container: dict, path: str | Path, recorded: Recorded) -> None:
    """Fill ``recorded`` from what a file of format ``fmt`` records besides its keys: the TSM
    repository's ``arch`` entry and file name, mmaction2's ``meta["cfg"]`` text (``num_segments=8``,
    ``shift_div=8``; 0.x files have none) and file name, a tsmtrain checkpoint's recipe."""
    if fmt == "tsm":
        arch = container.get("arch")
        recorded.set("arch", _OFFICIAL_ARCHS.get(arch, arch) if isinstance(arch, str) else None, "arch entry")
        settings_from_file_name(path, recorded)
    elif fmt == "mmaction2":
        meta = container.get("meta")
        cfg = meta.get("cfg") if isinstance(meta, dict) else None
        if isinstance(cfg, str):
            for name in ("num_segments", "shift_div"):
                values = {int(v) for v in re.findall(rf"\b{name}\s*[=:]\s*(\d+)", cfg)}
                if len(values) == 1:
                    recorded.set(name, values.pop(), "meta cfg")
            depth = re.search(r"\bdepth\s*[=:]\s*(\d+)", cfg)
            mobile = re.search(r"type\s*[=:]\s*['\"]MobileNetV2", cfg)
            recorded.set("arch", f"resnet{depth[1]}" if depth else "mobilenet_v2" if mobile else None, "meta cfg")
        settings_from_mmaction2_name(path, recorded)
    elif fmt == "tsmtrain":
        recipe = container.get("recipe")
        if isinstance(recipe, dict):
            model, data = recipe.get("model") or {}, recipe.get("data") or {}
            recorded.set("arch", model.get("arch"), "its recipe")
            recorded.set("shift_div", model.get("shift_div") if model.get("shift") else None, "its recipe")
            recorded.set("num_segments", data.get("num_segments"), "its recipe")


def unsupported_parts(fmt: str, keys: list[str], path: str | Path) -> list[str]:
    """Parts of the network in the file that tsmtrain's networks do not have, each as a few
    words: non-local blocks, temporal pooling, the in-place (``block``) shift, a consensus other
    than the average; empty when there are none."""
    found = []
    stem = Path(path).stem
    tokens = stem.split("_")
    if any(".nl." in k or "non_local" in k for k in keys) or "nl" in tokens:
        found.append("non-local blocks")
    if any(re.search(r"\blayer\d\.net\.", k) for k in keys) or "tpool" in tokens:
        found.append("temporal pooling (tpool)")
    if any(re.search(r"\blayer\d+\.\d+\.net\.", k) for k in keys) or "block" in tokens:
        found.append("the in-place shift of whole blocks (shift place 'block'; tsmtrain shifts 'blockres')")
    if fmt == "tsm" and tokens[:1] in (["TSM"], ["TSN"]) and len(tokens) > 5:
        consensus = next((t for t in tokens[4:] if t in ("avg", "identity", "max", "rnn", "TRN", "TRNmultiscale")), None)
        if consensus not in (None, "avg"):
            found.append(f"{consensus} consensus (tsmtrain averages the segments' scores)")
    return found


def official_file_name(arch: str, shift: bool, shift_div: int, num_segments: int, dataset: str = "kinetics",
                       modality: str = "RGB", epochs: int = 50) -> str:
    """The file name the TSM repository's ``test_models.py`` reads the settings from
    (``TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth``)."""
    theirs = {"mobilenet_v2": "mobilenetv2"}.get(arch, arch)
    shift_part = f"shift{shift_div}_blockres_" if shift else ""
    return f"TSM_{dataset}_{modality}_{theirs}_{shift_part}avg_segment{num_segments}_e{epochs}.pth"
