"""Figures of ``tsmtrain export`` for the closing note of issue 33: for TSM-ResNet50, TSN-ResNet50,
TSM-ResNet18 and TSM-MobileNetV2 at 8 segments, 224 px, 400 classes (random weights, seed 0),
the size of the ONNX and TorchScript files, the max relative difference of each file's logits to
PyTorch's on one test view of a real clip, and the median time per clip of onnxruntime,
TorchScript and PyTorch eager, each with one thread. All measured in one run; a table is printed.

usage: python scripts/export_figures.py [--clip VIDEO] [--runs 5] [--json FILE]

The clip (default ``../shared/clips/mmaction2_test.mp4``) is decoded and cropped by the test
pipeline of ``configs/tsm_r50_kinetics400.yaml`` (torchcodec, frames resized to 256x340, one
224x224 centre crop of 8 segments), as ``tsmtrain export`` does
(:func:`tsmtrain.eval.export_check.decode_view`).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from tsmtrain.eval.export_check import decode_view, eager_runner, median_ms
from tsmtrain.models import create_model
from tsmtrain.models.export import export_model, load_exported, max_relative_difference
from tsmtrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tsm_r50_kinetics400.yaml"
NETWORKS = [("TSM-ResNet50", "resnet50", True), ("TSN-ResNet50", "resnet50", False),
            ("TSM-ResNet18", "resnet18", True), ("TSM-MobileNetV2", "mobilenet_v2", True)]


def measure(name: str, arch: str, shift: bool, clip: Path, runs: int, folder: Path) -> dict:
    """One network's row: sizes (bytes), differences, times per clip (ms)."""
    recipe = load_recipe(RECIPE, [f"model.arch={arch}", f"model.shift={str(shift).lower()}", "model.num_classes=400"],
                         check_files=False)
    x = decode_view(recipe, clip)  # (1, 8, 3, 224, 224)
    torch.manual_seed(0)
    model = create_model(recipe.model, recipe.data.num_segments).eval()
    eager = eager_runner(model)
    reference = eager(x)
    row = {"network": name, "eager_ms": median_ms(eager, x, runs)}
    for fmt, key in (("onnx", "onnx"), ("torchscript", "ts")):
        path = export_model(model, folder / f"{arch}-{shift}.{fmt}", fmt, tuple(x.shape[1:]))
        run = load_exported(path, fmt, threads=1)
        row[f"{key}_bytes"] = path.stat().st_size
        row[f"{key}_diff"] = max_relative_difference(run(x), reference)
        row[f"{key}_ms"] = median_ms(run, x, runs)
    return row


def table(rows: list[dict]) -> str:
    head = ("network", "ONNX MiB", "TS MiB", "ONNX diff", "TS diff", "onnxruntime ms", "TorchScript ms", "eager ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r["network"], f"{r['onnx_bytes'] / 2**20:.1f}", f"{r['ts_bytes'] / 2**20:.1f}", f"{r['onnx_diff']:.1e}",
                 f"{r['ts_diff']:.1e}", f"{r['onnx_ms']:.0f}", f"{r['ts_ms']:.0f}", f"{r['eager_ms']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=REPO.parent / "shared" / "clips" / "mmaction2_test.mp4")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each, after one warm-up (median)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, arch, shift, args.clip, args.runs, Path(tmp)) for name, arch, shift in NETWORKS]
    print(f"8 segments x 3 x 224 x 224, 400 classes, random weights; clip {args.clip.name}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread each, "
          f"median of {args.runs} runs")
    print(table(rows))
    if args.json:
        from tsmtrain.io import write_json

        write_json(args.json, rows)


if __name__ == "__main__":
    main()
