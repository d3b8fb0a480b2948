"""A network as a file that runs without tsmtrain: ONNX (onnxruntime, or any ONNX runtime) or
TorchScript (``torch.jit.load``), from clips ``(N, T, C, H, W)`` float32 to logits ``(N, K)``,
the batch size N free.

The temporal shift is recorded as its pure-PyTorch form (a zero frame padded before and after
each clip, slices, one concatenation: :func:`tsmtrain.models.shift.temporal_shift` takes it
while tracing or exporting), so the file holds standard operators only, never tsmtrain's native
operator.

**ONNX exporter: ``torch.onnx.export(..., dynamo=True)``** (torch.export, then onnxscript's
translation and graph optimisation). Both exporters give a file that onnxruntime runs with a
free batch dimension and within 1e-6 relative of PyTorch (measured on TSM-ResNet18); the dynamo
one is taken because its graph holds only the network's operators (Conv, Relu, MaxPool, Add,
Pad, Slice, Concat, Reshape, ReduceMean, Gemm: no Shape/Gather/Cast arithmetic on the batch
size), and the TorchScript-based one is deprecated in torch 2.9+. It costs a few seconds more
per export (6.5 s against 1.6 s for TSM-ResNet18 on one CPU core).

The optional packages (``onnx``, ``onnxscript`` for export, ``onnxruntime`` to run) are the
``export`` extra: ``pip install tsmtrain[export]``; ``make setup`` installs them.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..io import write_atomic

__all__ = ["FORMATS", "ExportError", "export_model", "run_exported", "max_relative_difference"]

FORMATS = ("onnx", "torchscript")
_INSTALL = "pip install tsmtrain[export] (or make setup)"


class ExportError(UserError):
    """A network cannot be exported, or an exported file cannot be run: an unknown format, a
    missing optional package (the message says how to install it), a file that is not an export
    of this kind; one line naming the culprit."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


def _import(name: str, what: str):
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"{what} needs the Python package {name}, which is not installed: {_INSTALL}") from None


def export_model(model: torch.nn.Module, path: str | os.PathLike, fmt: str, clip_shape: tuple[int, int, int, int]) -> Path:
    """Write ``model`` (put in eval mode) as an ONNX or TorchScript file, atomically.

    Args:
        model: a :class:`~tsmtrain.models.VideoNet` (or any module from clips to logits) on the CPU.
        path: the file to write (its folder is created; an old file is replaced only once the
            new one is whole, :func:`tsmtrain.io.write_atomic`).
        fmt: ``onnx`` (input ``clips``, output ``logits``, opset chosen by torch, dimension 0 of
            both named ``N`` and free) or ``torchscript`` (``torch.jit.trace``; the batch size is
            free too, as every size in the network comes from the input's shape).
        clip_shape: ``(T, C, H, W)`` of one clip; the traced example is 2 such clips.

    Returns:
        ``path`` as a Path.

    Raises:
        ExportError: an unknown ``fmt``, or the ONNX packages are not installed.
        FileWriteError: the file cannot be written (names it and why).
    """
    _check_format(fmt)
    path = Path(path)
    model = model.eval()
    example = torch.zeros(2, *clip_shape)
    with torch.no_grad():
        if fmt == "torchscript":
            with _quiet_jit():
                traced = torch.jit.trace(model, (example,), check_trace=False)
            with write_atomic(path) as part:
                traced.save(str(part))
            return path
        _import("onnx", "ONNX export")
        _import("onnxscript", "ONNX export")
        with write_atomic(path) as part, contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            torch.onnx.export(model, (example,), str(part), dynamo=True, input_names=["clips"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                              external_data=False, verbose=False)
    return path


@contextlib.contextmanager
def _quiet_jit():
    """Without torch.jit's deprecation notices (torch 2.9+) and its TracerWarning on the network's
    input check (T and C are the same for every clip, so the trace is right to keep it constant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def run_exported(path: str | os.PathLike, fmt: str, clips: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """Logits ``(N, K)`` float32 of ``clips`` ``(N, T, C, H, W)`` float32 from an exported file.

    Args:
        path: a file written by :func:`export_model`.
        fmt: its format: ``onnx`` runs it with onnxruntime's CPU provider, ``torchscript`` with
            ``torch.jit.load`` on the CPU.
        threads: intra-op threads (onnxruntime's ``intra_op_num_threads``; torch's
            ``set_num_threads`` for TorchScript, restored afterwards).

    Raises:
        ExportError: an unknown ``fmt``, onnxruntime not installed, or the file cannot be loaded
            as that format (names the file and the reason's first line).
    """
    _check_format(fmt)
    return load_exported(path, fmt, threads)(clips)


def load_exported(path: str | os.PathLike, fmt: str, threads: int = 1):
    """The file loaded once, as a function ``f(clips) -> logits`` (what :func:`run_exported` calls),
    for timing repeated runs. Raises as :func:`run_exported`."""
    _check_format(fmt)
    try:
        if fmt == "onnx":
            ort = _import("onnxruntime", "running an ONNX file")
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda clips: torch.from_numpy(session.run(None, {name: clips.detach().float().numpy()})[0])
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
    except ExportError:
        raise
    except Exception as exc:  # a missing or foreign file: onnxruntime and torch raise their own types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{path}: cannot load it as {fmt}: {reason}") from None

    def run(clips: torch.Tensor) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return module(clips.float())
        finally:
            torch.set_num_threads(before)

    return run


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b|.max() / |b|.max()``: the largest absolute difference between ``a`` (e.g. an
    exported file's logits) and the reference ``b`` (PyTorch's), relative to the largest
    magnitude in ``b``; 0.0 when both are all zeros, ``inf`` when only ``b`` is.

    Raises:
        ValueError: the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    diff, scale = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / scale
