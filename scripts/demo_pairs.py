"""Confusion matrix and within-pair accuracy of tested demo runs, and of their late fusion.

The demo's classes come in order-only pairs (2k, 2k+1). Within-pair accuracy counts, among the
validation clips whose pair was recognised, those given the right member of the pair: 50% is
chance for a model blind to temporal order (TSN on RGB), 100% a model that sees it (TSM, or any
network on motion). It reads the scores that `tsmtrain test` saved (each run's latest test,
RUN/test/*/scores.npz), so test each run first; `--fuse W,W,...` adds the weighted average of
all the runs' scores, as `tsmtrain fuse` computes it.

    tsmtrain test configs/demo.yaml --set run.name=demo
    python scripts/demo_pairs.py runs/demo [runs/demo-tsn ...] [--fuse 1,1.5]
"""

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from tsmtrain.eval.fusion import FusionError, check_same_test, fuse_scores, load_scores, parse_weights


def pair_figures(confusion: np.ndarray) -> tuple[float, float, float]:
    """``(top-1, pair recognised, within-pair accuracy)`` in percent of a ``(K, K)`` confusion
    matrix (rows true, columns predicted)."""
    k = confusion.shape[0]
    total = confusion.sum()
    same_pair = sum(confusion[2 * p:2 * p + 2, 2 * p:2 * p + 2].sum() for p in range(k // 2))
    return (100 * np.trace(confusion) / total, 100 * same_pair / total,
            100 * np.trace(confusion) / max(same_pair, 1))


def confusion(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(K, K)`` counts of ``(V, K)`` scores against ``(V,)`` labels."""
    return np.bincount(labels * k + scores.argmax(1), minlength=k * k).reshape(k, k)


def show(console: Console, name: str, c: np.ndarray) -> None:
    table = Table(title=f"{name}: rows true, columns predicted")
    table.add_column("class")
    for j in range(c.shape[0]):
        table.add_column(str(j), justify="right")
    for i in range(c.shape[0]):
        table.add_row(str(i), *(str(int(v)) for v in c[i]))
    console.print(table)
    top1, pair, within = pair_figures(c)
    console.print(f"{name}: top-1 {top1:.1f}%   pair recognised {pair:.1f}%   within-pair accuracy {within:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="tested run directories (or test folders)")
    parser.add_argument("--fuse", help="also fuse all the runs' scores with these weights, e.g. 1,1.5")
    args = parser.parse_args()
    console = Console()
    try:
        streams = [load_scores(run) for run in args.runs]
        for s in streams:
            show(console, s.run, confusion(s.scores, s.labels, s.num_classes))
        if args.fuse:
            for s in streams[1:]:
                check_same_test(streams[0], s)
            weights = parse_weights(args.fuse, len(streams))
            order = [{p: i for i, p in enumerate(s.paths)} for s in streams]
            shared = [p for p in streams[0].paths if all(p in o for o in order)]
            fused = fuse_scores([s.scores[[o[p] for p in shared]] for s, o in zip(streams, order)], weights)
            labels = streams[0].labels[[order[0][p] for p in shared]]
            show(console, f"fused {args.fuse}", confusion(fused, labels, streams[0].num_classes))
    except FusionError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
