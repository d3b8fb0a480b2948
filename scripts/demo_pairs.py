"""Confusion matrix and within-pair accuracy of a trained demo run.

The demo's classes come in order-only pairs (2k, 2k+1). Within-pair accuracy counts, among the
validation clips whose pair was recognised, those given the right member of the pair: 50% is
chance for a model blind to temporal order (TSN), 100% a model that sees it (TSM).

    python scripts/demo_pairs.py runs/demo [runs/demo-tsn ...]
"""

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tsmtrain.data import read_list
from tsmtrain.dist.base import LocalEngine
from tsmtrain.models import create_model
from tsmtrain.recipe import Recipe
from tsmtrain.train import predict
from tsmtrain.data.transforms import VideoTransform


def confusion(run_dir: Path) -> torch.Tensor:
    """``(K, K)`` counts, rows = true class, columns = predicted, on the run's validation list."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise SystemExit(f"error: no checkpoint in {run_dir}")
    state = load_checkpoint(path)
    recipe = Recipe.model_validate(state["recipe"])
    d, k = recipe.data, recipe.model.num_classes
    model = create_model(recipe.model, d.num_segments)
    model.load_state_dict(state["model"])
    transform = VideoTransform(train=False, input_size=d.input_size, mean=d.mean, std=d.std)
    counts = torch.zeros(k, k, dtype=torch.int64)
    for logits, y, _ in predict(model, read_list(d.val_list, d.root, k), recipe, LocalEngine(), "cpu", transform):
        counts += torch.bincount(y * k + logits.argmax(1), minlength=k * k).view(k, k)
    return counts


def main() -> None:
    console = Console()
    for run in sys.argv[1:]:
        c = confusion(Path(run))
        k = c.shape[0]
        table = Table(title=f"{run}: rows true, columns predicted")
        table.add_column("class")
        for j in range(k):
            table.add_column(str(j), justify="right")
        for i in range(k):
            table.add_row(str(i), *(str(int(v)) for v in c[i]))
        console.print(table)
        top1 = c.diag().sum().item() / c.sum().item()
        same_pair = sum(c[2 * p : 2 * p + 2, 2 * p : 2 * p + 2].sum().item() for p in range(k // 2))
        console.print(f"top-1 {100 * top1:.1f}%   pair recognised {100 * same_pair / c.sum().item():.1f}%   "
                      f"within-pair accuracy {100 * c.diag().sum().item() / max(same_pair, 1):.1f}%")


if __name__ == "__main__":
    main()
