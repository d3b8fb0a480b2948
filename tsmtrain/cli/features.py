"""``tsmtrain extract``: the trained network's features of every video, for training the head alone.

* ``extract RECIPE --out DIR [--clips K] [--crops 1|3|10] [--weights FILE] [--shard-videos N]
  [--dtype float16|float32] [--np N]`` -> :func:`tsmtrain.eval.extract.extract_features`
  (through :func:`tsmtrain.cli.common.relaunch` when N ranks must be started on this host). A rerun
  resumes: complete shards are kept. Train the head on them with ``--set data.features=DIR``.
"""

from __future__ import annotations

from typing import Optional

import typer

from .common import SET_HELP, load, relaunch, set_args, user_errors, with_np
from .testing import CHECKPOINT_HELP, _protocol

__all__ = ["extract"]


def extract(
    recipe: str = typer.Argument(..., help="YAML recipe of the trained run"),
    out: str = typer.Option(..., "--out", help="features folder: DIR/train and DIR/val, shards and index.json"),
    checkpoint: Optional[str] = typer.Option(None, "--weights", "--checkpoint", help=CHECKPOINT_HELP),
    clips: int = typer.Option(1, "--clips", help="K: clips per video whose features are averaged (as tsmtrain test)"),
    crops: int = typer.Option(1, "--crops", help="crops per clip: 1, 3 or 10 (as tsmtrain test)"),
    shard_videos: int = typer.Option(1024, "--shard-videos", min=1, help="videos per shard file"),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32"),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="ranks to start on this host (sets dist.np)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Write one feature vector per video of the training and validation lists (the backbone's
    pooled output, averaged over the views) into sharded arrays with an index; resumable."""
    protocol = _protocol(clips, crops)
    sets = with_np(sets, np)
    cfg = load(recipe, sets)
    relaunch(cfg, ["extract", recipe, *set_args(sets), "--out", out, "--clips", str(clips), "--crops", str(crops),
                   "--shard-videos", str(shard_videos), "--dtype", dtype,
                   *(["--weights", checkpoint] if checkpoint else [])])
    from ..eval.extract import extract_features

    with user_errors():
        report = extract_features(cfg, out, protocol, checkpoint=checkpoint, shard_videos=shard_videos, dtype=dtype)
    if report.rank != 0:
        return
    for split, s in report.splits.items():
        print(f"{split}: {s['videos']} videos, {s['shards']} shards ({s['extracted']} extracted, {s['kept']} kept), "
              f"{s['dim']}-d {dtype}, {s.get('unreadable', 0)} unreadable -> {out}/{split}")
    print(f"extracted in {report.seconds:.1f} s on rank 0 of {cfg.dist.np}")
