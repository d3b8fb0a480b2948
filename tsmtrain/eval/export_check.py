"""``tsmtrain export``: a recipe's network written as ONNX or TorchScript
(:func:`tsmtrain.models.export.export_model`), then checked by running the file on a real clip
against the PyTorch network, and timed.

The clip is decoded and cropped with the recipe's test-time pipeline, one view (1 clip x 1
centre crop, as ``tsmtrain predict`` with its default protocol), so the check sees the inputs a
deployed model sees.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import VideoRecord, multi_clip_dataset
from ..data.decoding import PROBE_CLIP
from ..data.modality import modality_of
from ..data.transforms import TestViews
from ..errors import UserError
from ..models.export import FORMATS, ExportError, export_model, load_exported, max_relative_difference
from .protocols import load_model

__all__ = ["TOLERANCE", "ExportReport", "export_checked", "decode_view", "median_ms", "eager_runner"]

TOLERANCE = 1e-4  # the largest max relative difference (max_relative_difference) accepted


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checked` wrote and measured.

    Attributes:
        path: the exported file; ``size``: its size in bytes.
        weights: the weights file the network was loaded from.
        clip: the video the check ran on.
        difference: max relative difference of the file's logits to PyTorch's
            (:func:`~tsmtrain.models.export.max_relative_difference`).
        exported_ms, eager_ms: median time per clip in milliseconds of the file (onnxruntime or
            TorchScript) and of PyTorch eager, each with one thread.
    """

    path: Path
    format: str
    size: int
    weights: Path
    clip: Path
    difference: float
    exported_ms: float
    eager_ms: float

    @property
    def ok(self) -> bool:
        """The difference is at most :data:`TOLERANCE`."""
        return self.difference <= TOLERANCE


def decode_view(recipe, clip: str | Path) -> torch.Tensor:
    """One test view of a video: float32 ``(1, T, C_in, S, S)`` (S = ``data.input_size``), decoded
    with the recipe's decoder and modality and cropped and normalised as testing does
    (:class:`~tsmtrain.data.transforms.TestViews`, 1 clip x 1 crop).

    Raises:
        UserError: the file is missing or cannot be decoded (names it and why).
    """
    clip = Path(clip)
    if not clip.is_file():
        raise UserError(f"--clip {clip}: no such file")
    item = multi_clip_dataset(recipe, [VideoRecord(str(clip), 0)], 1, compute_flow=True)[0]
    if item["frames"] is None:
        raise UserError(f"--clip {clip}: cannot decode it: {item['error']}")
    views = TestViews(recipe.data.input_size, 1, modality=modality_of(recipe.data))
    return views(item["frames"][None])[:, 0]  # (1, 1 view, T, C, S, S) -> (1, T, C, S, S)


def median_ms(run, x: torch.Tensor, runs: int = 5) -> float:
    """Median wall time in milliseconds of ``run(x)`` over ``runs`` calls, after one untimed call."""
    run(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def eager_runner(model: torch.nn.Module):
    """PyTorch eager with one thread (restored afterwards), no autograd."""
    def run(x: torch.Tensor) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return model(x)
        finally:
            torch.set_num_threads(before)
    return run


def export_checked(recipe, weights: str | Path | None, fmt: str, out: str | Path, clip: str | Path | None = None,
                   runs: int = 5) -> ExportReport:
    """Export the recipe's network with its weights to ``out``, run the file and PyTorch on one
    view of ``clip`` (default: the packaged probe clip) and time both.

    Args:
        recipe: a loaded recipe (its data files need not exist).
        weights: a weights file; None: the run directory's latest checkpoint
            (:func:`~tsmtrain.eval.protocols.load_model`).
        fmt: ``onnx`` or ``torchscript``.
        runs: timed runs of each (after one warm-up); the median is reported.

    Returns:
        An :class:`ExportReport`; the file is written whatever the difference (``report.ok`` says
        whether it is within :data:`TOLERANCE`).

    Raises:
        ExportError: an unknown format, the optional packages missing, the file not loadable.
        UserError: the weights (as ``load_model``), the clip, or the file cannot be written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    clip = Path(clip) if clip is not None else PROBE_CLIP
    x = decode_view(recipe, clip)
    model, path = load_model(recipe, weights, torch.device("cpu"))
    out = export_model(model, out, fmt, tuple(x.shape[1:]))
    exported, eager = load_exported(out, fmt, threads=1), eager_runner(model)
    difference = max_relative_difference(exported(x), eager(x))
    return ExportReport(out, fmt, out.stat().st_size, path, clip, difference,
                        median_ms(exported, x, runs), median_ms(eager, x, runs))
