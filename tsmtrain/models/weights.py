"""Load any weights file tsmtrain knows into a :class:`~tsmtrain.models.networks.VideoNet`, and
write a network's weights in another project's format.

:func:`load_weights` is ``model.pretrained`` (fine-tuning: a classifier of another class count
starts fresh), ``tsmtrain test/predict/export --weights`` and ``tsmtrain convert`` (the classifier
must fit). Its rules, which a user can rely on:

* the file is read with ``torch.load(..., weights_only=True)`` (:func:`tsmtrain.tensorfile.read_tensors`):
  tensors and plain values only. A file that names other Python objects is refused with one line
  and never unpickled; the only exception is the bookkeeping mmengine's runner pickles into a
  training checkpoint (:data:`MMENGINE_OBJECTS`), read as inert shells without its code;
* the format is found from the keys (:func:`tsmtrain.models.zoo.detect_format`);
* a network other than the recipe's (another ``arch``, TSN weights into TSM or the reverse,
  another ``shift_div`` or, for TSM, another segment count where the file records them,
  non-local blocks, temporal pooling) is refused with one line naming the difference;
* every key is accounted for: each tensor of the file is loaded or left out for a stated reason
  (only a classifier ever is), and a key that maps to nothing, or a tensor of another shape, is
  an error naming it. Every tensor of the network must come from the file, but for a classifier
  left out and BatchNorm's ``num_batches_tracked`` counters (unused at the default momentum).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import TrainingError
from ..io import write_atomic
from ..tensorfile import CheckpointError, read_tensors
from .zoo import (FORMATS, HEADS, Recorded, alias_their_keys, detect_format, official_file_name, settings_of,
                  strip_wrapper, their_names, unsupported_parts)

__all__ = ["WeightsError", "WeightsReport", "load_weights", "write_weights", "convert_weights", "read_state", "MMENGINE_OBJECTS",
           "FORMAT_NAMES"]

log = logging.getLogger(__name__)

MMENGINE_OBJECTS = ("mmengine.logging.history_buffer.HistoryBuffer",)
"""Classes an mmengine training checkpoint pickles besides tensors and plain values (the loss
history in ``message_hub``); read as :class:`tsmtrain.tensorfile.Inert` shells. (Its other
object, ``MultiStepLR``'s ``collections.Counter`` of milestones, torch's weights-only reader
allows.) A published model-zoo file holds neither."""

FORMAT_NAMES = {"tsmtrain": "tsmtrain", "tsm": "TSM repository (mit-han-lab/temporal-shift-module)",
                "mmaction2": "mmaction2", "torchvision": "torchvision/timm ImageNet backbone"}

_WORDS = {"arch": "model.arch", "shift_div": "model.shift_div", "num_segments": "data.num_segments"}


class WeightsError(TrainingError):
    """A weights file that cannot be used for the recipe's network: one line naming the file and
    why (unreadable, refused, another network, an unmapped or mis-shaped key)."""


@dataclass
class WeightsReport:
    """What :func:`load_weights` did with a file.

    Attributes:
        path: the file.
        format: one of :data:`tsmtrain.models.zoo.FORMATS`.
        recorded: what the file says about its network (:class:`tsmtrain.models.zoo.Recorded`).
        loaded: number of tensors loaded.
        classifier: ``loaded``, ``left out`` or ``none`` (the file has none).
        notes: one line each: what was left out and why, what was adapted.
    """

    path: Path
    format: str
    recorded: Recorded
    loaded: int = 0
    classifier: str = "none"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as the commands print it: the file and its format, then one line per note."""
        r = self.recorded
        what = [r.arch or "arch not recorded"]
        if r.shift is not None:
            what.append(f"TSM, shift_div {r.shift_div or 'not recorded'}" if r.shift else "TSN")
        what.append(f"{r.num_segments} segments" if r.num_segments is not None else "segments not recorded")
        sources = sorted(set(r.sources.values()) - {"keys"})
        said = f" (read from its {' and '.join(sources)})" if sources else ""
        return [f"weights {self.path}: {FORMAT_NAMES[self.format]} format, {', '.join(what)}{said}; "
                f"{self.loaded} tensors loaded", *self.notes]


def read_state(path: str | Path, label: str = "--weights") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Read a weights file of any known format.

    Returns:
        ``(format, container, state)``: the format, the file's top-level dict (``{}`` for a bare
        ``state_dict``), and its ``state_dict`` with DataParallel's ``module.`` removed.

    Raises:
        WeightsError: ``LABEL PATH: why``: missing, empty, truncated, refused (code), not a
            ``state_dict``, or of no format tsmtrain knows (names its first keys).
    """
    path = Path(path)

    def refuse(reason: str) -> WeightsError:
        return WeightsError(f"{label} {path}: {reason}")

    if not path.is_file():
        raise refuse("no such file")
    try:
        container = read_tensors(path, inert=MMENGINE_OBJECTS, numpy_values=True)
    except CheckpointError as err:
        raise refuse(err.reason) from None
    state = container
    if isinstance(container, dict) and isinstance(container.get("state_dict"), dict):
        state = container["state_dict"]
    elif isinstance(container, dict) and isinstance(container.get("model"), dict) and "recipe" in container:
        state = container["model"]  # a tsmtrain checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                            for k, v in state.items()):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict of other values than named tensors"
        raise refuse(f"not a state_dict (it holds a {kind})")
    state = {strip_wrapper(k): v for k, v in state.items()}
    fmt = detect_format(list(state))
    if fmt is None:
        raise refuse(f"not weights of a format tsmtrain reads ({', '.join(FORMATS)}); its first keys: "
                     f"{', '.join(list(state)[:3])}")
    return fmt, container if isinstance(container, dict) and container is not state else {}, state


def _is_shifted(fmt: str, keys: list[str]) -> bool | None:
    """Whether the file's blocks hold the temporal shift (a ``.net`` wrapper inside a block);
    None for a backbone file (the shift has no weights: it fits TSN and TSM alike)."""
    if fmt == "torchvision":
        return None
    return any(".net." in k for k in keys)


def _check_network(model, rec: Recorded, fmt: str, keys: list[str], path: Path, refuse) -> list[str]:
    """Refuse a file of another network than ``model``; return notes on harmless differences."""
    parts = unsupported_parts(fmt, keys, path)
    if parts:
        raise refuse(f"a network with {' and '.join(parts)}, which tsmtrain's networks do not have")
    if rec.shift is not None and rec.shift != model.is_tsm:
        there, here = ("TSM (temporal shift)", "TSN (model.shift: false)") if rec.shift else \
            ("TSN (no temporal shift)", "TSM (model.shift: true)")
        raise refuse(f"{there} weights, the recipe builds {here}")
    ours = {"arch": model.arch, "shift_div": model.shift_div if model.is_tsm else None,
            "num_segments": model.num_segments}
    notes = []
    for name in ("arch", "shift_div", "num_segments"):
        theirs = getattr(rec, name)
        if theirs is None or ours[name] is None or theirs == ours[name]:
            continue
        if name == "num_segments" and not model.is_tsm:  # TSN's weights do not depend on T
            notes.append(f"trained with {theirs} segments ({rec.sources[name]}); TSN tests at any count: "
                         f"data.num_segments = {ours[name]} here")
            continue
        raise refuse(f"{name} {theirs} there ({rec.sources[name]}), {_WORDS[name]} = {ours[name]} here")
    return notes


def load_weights(model: nn.Module, path: str | Path, need_classifier: bool = True,
                 label: str = "--weights") -> WeightsReport:
    """Load a weights file of any format of :data:`tsmtrain.models.zoo.FORMATS` into ``model``
    (a :class:`~tsmtrain.models.networks.VideoNet`), by the rules in this module's docstring.

    Args:
        model: the recipe's network (its ``arch``, ``is_tsm``, ``shift_div``, ``num_segments``,
            ``num_classes``, ``head`` are checked against the file).
        path: the file.
        need_classifier: True (test, predict, export, convert): the file's classifier must fit
            ``model.num_classes``. False (``model.pretrained``, fine-tuning): a classifier of
            another class count, of ImageNet, or none, is left out with one line and the model's
            own (freshly initialised) classifier kept.
        label: how the messages name the setting (``--weights``, ``model.pretrained``).

    Returns:
        A :class:`WeightsReport` (also logged at INFO, one line each).

    Raises:
        WeightsError: one line, ``LABEL PATH: why``.
    """
    path = Path(path)

    def refuse(reason: str) -> WeightsError:
        return WeightsError(f"{label} {path}: {reason}")

    fmt, container, state = read_state(path, label)
    rec = Recorded(fmt)
    rec.set("shift", _is_shifted(fmt, list(state)), "keys")
    settings_of(fmt, container, path, rec)
    report = WeightsReport(path, fmt, rec, notes=_check_network(model, rec, fmt, list(state), path, refuse))
    own = model.state_dict()
    try:
        names = their_names(fmt, list(own), model.arch)
    except ValueError as err:
        raise refuse(str(err)) from None
    mine = {theirs: ours for ours, theirs in names.items()}
    dropped = [k for k in state if fmt == "mmaction2" and k.startswith("data_preprocessor.")]
    if dropped:  # an mmaction2 0.x/early 1.x file: its normalisation, which tsmtrain's data.mean/std do
        state = {k: v for k, v in state.items() if k not in dropped}
        report.notes.append(f"left out {', '.join(dropped)} (the input normalisation: data.mean and data.std here)")
    aliases = alias_their_keys(fmt, list(state))
    head_prefix = HEADS[fmt]
    file_head = {k: v for k, v in state.items() if aliases.get(k, k).startswith(head_prefix)}
    chosen: dict[str, torch.Tensor] = {}
    unmapped = [k for k in state if k not in file_head and aliases.get(k, k) not in mine]
    if unmapped:
        raise refuse(f"{len(unmapped)} key(s) fit no tensor of the recipe's {model.arch} network, e.g. "
                     f"{', '.join(unmapped[:3])}")
    for key, tensor in state.items():
        if key not in file_head:
            chosen[mine[aliases.get(key, key)]] = tensor
    report.notes += _adapt_first_conv(model, own, chosen, refuse)
    report.classifier, note = _classifier(model, fmt, file_head, aliases, mine, chosen, need_classifier, refuse)
    if note:
        report.notes.append(note)
    for key, tensor in chosen.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise refuse(f"{names[key]} is {tuple(tensor.shape)} there, {key} is {tuple(own[key].shape)} in the "
                         f"recipe's network")
    fresh = {k for k in own if k.startswith("fc.")} if report.classifier != "loaded" else set()
    missing = [k for k in own if k not in chosen and k not in fresh]
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in counters]
    if missing:
        raise refuse(f"holds no {', '.join(names.get(k, k) for k in missing[:3])} ({len(missing)} tensor(s) of the "
                     f"recipe's network missing): not weights of this network")
    if counters:
        report.notes.append(f"{len(counters)} BatchNorm num_batches_tracked counter(s) not in the file: left at 0 "
                            f"(unused at the default momentum)")
    model.load_state_dict(chosen, strict=False)
    report.loaded = len(chosen)
    for line in report.lines():
        log.info("%s", line)
    return report


def _adapt_first_conv(model, own: dict, chosen: dict, refuse) -> list[str]:
    """An RGB first convolution ``(O, 3, k, k)`` into a network of ``C_in != 3`` channels per
    segment: TSN's cross-modality initialisation (the kernel averaged over its colours, repeated
    C_in times; :func:`tsmtrain.models.networks.cross_modality_conv`)."""
    key = "backbone.conv1.weight" if "backbone.conv1.weight" in own else "backbone.features.0.0.weight"
    theirs, ours = chosen.get(key), own[key]
    if theirs is None or theirs.dim() != 4 or theirs.shape[1] == ours.shape[1]:
        return []
    if theirs.shape[1] != 3:
        raise refuse(f"its first convolution takes {theirs.shape[1]} channels per segment, the recipe's "
                     f"modality {ours.shape[1]}")
    chosen[key] = theirs.mean(dim=1, keepdim=True).expand(-1, ours.shape[1], -1, -1).contiguous()
    return [f"first convolution: RGB kernel averaged over its colours for {ours.shape[1]} input channels "
            f"(TSN's cross-modality initialisation)"]


def _classifier(model, fmt: str, file_head: dict, aliases: dict, mine: dict, chosen: dict, need: bool,
                refuse) -> tuple[str, str | None]:
    """Put the file's classifier into ``chosen`` when it fits; else leave it out with a note, or
    refuse when ``need``. Returns (``loaded`` | ``left out`` | ``none``, note)."""
    if not file_head:
        if need:
            raise refuse("holds no classifier (a backbone's weights): give it as model.pretrained and train")
        return "none", "no classifier in the file: the new classifier starts fresh"
    weight = next((v for k, v in file_head.items() if aliases.get(k, k).endswith("weight")), None)
    rows = None if weight is None else weight.shape[0]
    if fmt == "torchvision":
        why = f"ImageNet's classifier ({rows} classes)"
    elif model.head != "linear":
        why = f"a linear classifier of {rows} classes, the recipe's head is {model.head}"
    elif rows != model.num_classes:
        why = f"its classifier has {rows} classes, model.num_classes = {model.num_classes}"
    else:
        for k, v in file_head.items():
            chosen[mine[aliases.get(k, k)]] = v
        return "loaded", None
    if need:
        raise refuse(why)
    return "left out", f"classifier left out ({why}); the new classifier starts fresh (fine-tuning)"


def write_weights(model: nn.Module, fmt: str, path: str | Path, recipe: dict | None = None,
                  source: str | None = None) -> list[str]:
    """Write ``model``'s weights (a :class:`~tsmtrain.models.networks.VideoNet`) as format ``fmt``
    writes them, atomically (:func:`tsmtrain.io.write_atomic`).

    * ``tsmtrain``: ``{"model": state_dict, "recipe": recipe, "source": source}``, which
      ``tsmtrain test --checkpoint`` and every ``--weights`` read;
    * ``tsm``: ``{"epoch", "arch", "state_dict", "best_prec1"}`` with ``module.base_model.`` /
      ``module.new_fc.`` keys, as the TSM repository's ``main.py`` saves (``epoch`` 0 and
      ``best_prec1`` 0.0: not known here; no ``optimizer``), for its ``test_models.py`` and
      ``--tune_from``;
    * ``mmaction2``: ``{"meta", "state_dict"}``, as a published mmaction2 model (``meta["cfg"]``
      records ``num_segments``, ``shift_div`` and the depth).

    Returns:
        Notes to print (for ``tsm``, the file name its ``test_models.py`` needs to read the settings).

    Raises:
        ValueError: ``fmt`` is not one that can be written (``torchvision`` holds no video network).
        tsmtrain.io.FileWriteError: the file cannot be written (names it; nothing is left behind).
    """
    if fmt not in FORMATS or fmt == "torchvision":
        raise ValueError(f"cannot write weights as {fmt!r}; choose tsmtrain, tsm or mmaction2")
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    notes = []
    if fmt == "tsmtrain":
        doc = {"model": state, "recipe": recipe or {}, "source": source}
    else:
        names = their_names(fmt, list(state), model.arch)
        if fmt == "tsm":
            doc = {"epoch": 0, "arch": {"mobilenet_v2": "mobilenetv2"}.get(model.arch, model.arch),
                   "state_dict": {f"module.{names[k]}": v for k, v in state.items()}, "best_prec1": 0.0}
            wanted = official_file_name(model.arch, model.is_tsm, model.shift_div, model.num_segments)
            if not path.name.startswith(("TSM_", "TSN_")):
                notes.append(f"the TSM repository's test_models.py reads the settings from the file name: name it "
                             f"like {wanted} (the dataset and epochs as yours)")
        else:
            kind = "MobileNetV2" if model.arch == "mobilenet_v2" else "ResNet"
            depth = "" if model.arch == "mobilenet_v2" else f", depth={model.arch.removeprefix('resnet')}"
            shift = f"TSM, num_segments={model.num_segments}, shift_div={model.shift_div}" if model.is_tsm else ""
            cfg = (f"model = dict(type='Recognizer2D', backbone=dict(type='{kind}{shift[:3]}'{depth}{shift[3:]}), "
                   f"cls_head=dict(type='{'TSMHead' if model.is_tsm else 'TSNHead'}', num_classes={model.num_classes}, "
                   f"num_segments={model.num_segments}))\n")
            doc = {"meta": {"cfg": cfg, "converted_by": "tsmtrain convert", "source": source},
                   "state_dict": {names[k]: v for k, v in state.items()}}
    with write_atomic(path) as part:
        torch.save(doc, part)
    return notes


def convert_weights(model: nn.Module, src: str | Path, fmt: str, out: str | Path,
                    recipe: dict | None = None) -> tuple[WeightsReport, list[str]]:
    """``tsmtrain convert``: load ``src`` (any format) into ``model`` (the recipe's network; the
    classifier must fit) and write it to ``out`` as ``fmt`` (:func:`write_weights`).

    Returns:
        ``(report of the load, notes of the write)``.

    Raises:
        WeightsError: ``src`` cannot be used (one line); ``out`` is ``src``.
        ValueError: ``fmt`` cannot be written.
        tsmtrain.io.FileWriteError: ``out`` cannot be written.
    """
    if Path(out).resolve() == Path(src).resolve():
        raise WeightsError(f"--out {out}: the file to convert; give another path")
    report = load_weights(model, src, need_classifier=True, label="weights")
    notes = write_weights(model, fmt, out, recipe, source=f"{report.format} file {Path(src).name}")
    return report, notes
