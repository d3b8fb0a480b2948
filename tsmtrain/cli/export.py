"""``tsmtrain export``: the network as a file that runs without tsmtrain.

* ``export RECIPE [--weights FILE] --format onnx|torchscript --out FILE [--clip VIDEO]`` ->
  :func:`tsmtrain.eval.export_check.export_checked`: writes the file, runs it and PyTorch on one
  test view of a real clip, prints the file's size, their max relative difference and the time
  per clip of each; exits 2 when the difference exceeds
  :data:`tsmtrain.eval.export_check.TOLERANCE`
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import SET_HELP, fail, load, user_errors

__all__ = ["export"]


def _check_out(out: Path) -> None:
    """Exit 2 with one line when ``--out``'s folder is missing, not a folder, or not writable
    (before any work; the write itself is atomic and names its own failures)."""
    folder = out.parent
    if not folder.exists():
        fail(f"--out {out}: the folder {folder} does not exist")
    if not folder.is_dir():
        fail(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--out {out}: the folder {folder} is not writable")
    if out.is_dir():
        fail(f"--out {out}: is a folder; name the file to write")


def export(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    weights: Optional[str] = typer.Option(None, "--weights", help="weights file (default: the run directory's "
                                                                 "latest checkpoint)"),
    fmt: str = typer.Option(..., "--format", help="onnx or torchscript"),
    out: Path = typer.Option(..., "--out", help="the file to write"),
    clip: Optional[str] = typer.Option(None, "--clip", help="the video to check the file on (default: a "
                                                           "short clip packaged with tsmtrain)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Export the network, clips (N, T, C, H, W) to logits (N, K), as ONNX or TorchScript; check the file on a clip."""
    from ..eval.export_check import TOLERANCE, export_checked
    from ..models.export import FORMATS

    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    _check_out(out)
    if weights is not None and not Path(weights).is_file():
        fail(f"--weights {weights}: no such file")
    cfg = load(recipe, sets, check_files=False)
    with user_errors():
        r = export_checked(cfg, weights, fmt, out, clip)
    engine = "onnxruntime" if fmt == "onnx" else "TorchScript"
    print(f"wrote {r.path} ({r.format}, {r.size:,} bytes, {r.size / 2**20:.1f} MiB) from {r.weights}")
    print(f"checked on {r.clip}: max relative difference {r.difference:.2e} (limit {TOLERANCE:.0e})")
    print(f"time per clip, 1 thread: {engine} {r.exported_ms:.1f} ms, PyTorch eager {r.eager_ms:.1f} ms")
    if not r.ok:
        fail(f"{r.path}: its logits differ from PyTorch's by {r.difference:.2e} relative, more than {TOLERANCE:.0e}")
