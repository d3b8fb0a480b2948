"""``tsmtrain test``, ``tsmtrain predict`` and ``tsmtrain fuse``: a trained checkpoint under a
view protocol, and the late fusion of tested runs.

* ``test RECIPE [--weights FILE] [--clips K] [--crops 1|3|10] [--list FILE] [--np N]`` ->
  :func:`tsmtrain.eval.protocols.run_test` (through :func:`tsmtrain.cli.common.relaunch` when N ranks
  must be started on this host), printed by :func:`tsmtrain.eval.protocols.format_report`
* ``predict RECIPE VIDEO... [--weights FILE] [--top K]`` ->
  :func:`tsmtrain.eval.protocols.predict_videos`; exits 1 when a video is unreadable
* ``fuse RUN... [--weights W,W] [--test-dir NAME] [--json FILE]`` ->
  :func:`tsmtrain.eval.fusion.fuse_runs`, printed by :func:`tsmtrain.eval.fusion.format_fusion`

A multi-label run (``model.loss: sigmoid``) is scored by the per-class sigmoid probabilities
averaged over the views, and reported by mAP, GAP@20 and Hit@1 instead of top-1, top-5 and mean
class accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import SET_HELP, fail, load, relaunch, set_args, user_errors, with_np
from ..errors import UserError

__all__ = ["test", "predict", "fuse", "prediction_lines"]

CHECKPOINT_HELP = ("weights: a tsmtrain checkpoint, or a model-zoo file of the TSM repository or mmaction2 "
                   "(default: the run directory's latest checkpoint; --checkpoint is the old name)")


def _protocol(clips: int, crops: int):
    """The :class:`tsmtrain.eval.protocols.Protocol` of ``--clips`` and ``--crops``; exits 2 on
    one that does not exist."""
    from ..eval.protocols import Protocol

    try:
        return Protocol(clips, crops)
    except ValueError as err:
        fail(str(err))


def test(
    recipe: str = typer.Argument(..., help="YAML recipe of the trained run"),
    checkpoint: Optional[str] = typer.Option(None, "--weights", "--checkpoint", help=CHECKPOINT_HELP),
    clips: int = typer.Option(1, "--clips", help="K: clips per video, spread evenly over it"),
    crops: int = typer.Option(1, "--crops", help="crops per clip: 1 (centre), 3 (along the long side, at the resize "
                                                 "size), 10 (corners, centre and their flips)"),
    list_file: Optional[str] = typer.Option(None, "--list", help="list file of the videos to test (default: "
                                                                 "data.val_list), paths under data.root"),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="ranks to start on this host (sets dist.np)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Test a checkpoint under a view protocol: top-1, top-5 and mean class accuracy (multi-label
    runs: mAP, GAP@20, Hit@1); per-class table, confusion matrix, predictions and every video's
    class scores (for tsmtrain fuse) in RUN_DIR/test/."""
    protocol = _protocol(clips, crops)
    if list_file is not None and not Path(list_file).is_file():
        fail(f"--list {list_file}: list file not found")
    sets = with_np(sets, np)
    cfg = load(recipe, sets)
    relaunch(cfg, ["test", recipe, *set_args(sets), "--clips", str(clips), "--crops", str(crops),
                   *(["--weights", checkpoint] if checkpoint else []),
                   *(["--list", list_file] if list_file else [])])
    from ..eval.protocols import format_report, run_test

    with user_errors():
        report = run_test(cfg, protocol, checkpoint=checkpoint, list_file=list_file)
    if report.rank != 0:
        return
    for _path, reason in report.unreadable:
        print(f"unreadable: {reason}", file=sys.stderr)
    print(format_report(report, cfg.model.num_classes, cfg.data.input_size))


def predict(
    recipe: str = typer.Argument(..., help="YAML recipe of the trained run"),
    videos: list[str] = typer.Argument(..., help="video files"),
    checkpoint: Optional[str] = typer.Option(None, "--weights", "--checkpoint", help=CHECKPOINT_HELP),
    top: int = typer.Option(5, "--top", min=1, help="classes to print per video"),
    clips: int = typer.Option(1, "--clips", help="K: clips per video (as tsmtrain test)"),
    crops: int = typer.Option(1, "--crops", help="crops per clip: 1, 3 or 10 (as tsmtrain test)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the top classes of each video file with their probabilities averaged over the views
    (softmax; sigmoid per class for a multi-label run), on the CPU."""
    from ..eval.protocols import predict_videos

    protocol = _protocol(clips, crops)
    cfg = load(recipe, sets, check_files=False)
    if cfg.data.classes is not None and not Path(cfg.data.classes).is_file():
        fail(f"data.classes = {cfg.data.classes!r}: label map file not found")
    try:
        results, path, names = predict_videos(cfg, videos, protocol, checkpoint=checkpoint, top=top)
    except UserError as err:
        fail(str(err).splitlines())
    kind = "sigmoid probabilities (multi-label)" if cfg.model.loss == "sigmoid" else "softmax scores"
    print(f"checkpoint {path}, {protocol.describe(cfg.data.input_size)}, {kind} averaged over the views")
    for line in prediction_lines(results, names):
        print(line)
    if any(r["error"] is not None for r in results):
        raise typer.Exit(1)


def prediction_lines(results: list[dict], names: list[str] | None) -> list[str]:
    """The lines ``predict`` prints per video of :func:`tsmtrain.eval.protocols.predict_videos`:
    ``PATH: unreadable: REASON``, or ``PATH:`` then one ``SCORE  CLASS  NAME`` line per top class."""
    lines = []
    for r in results:
        if r["error"] is not None:
            lines.append(f"{r['path']}: unreadable: {r['error']}")
            continue
        lines.append(f"{r['path']}:")
        lines += [f"  {score:7.4f}  {c:>4}  {names[c] if names else ''}".rstrip()
                  for c, score in zip(r["top"], r["scores"])]
    return lines


def fuse(
    runs: list[str] = typer.Argument(..., metavar="RUN", help="run directories (each one's latest test) or test folders "
                                               "(RUN_DIR/test/NAME), at least two"),
    weights: Optional[str] = typer.Option(None, "--weights", help="one weight per run, e.g. 1,1.5 (default: 1 each)"),
    test_dir: Optional[str] = typer.Option(None, "--test-dir", help="the test folder to fuse in every run directory, "
                                                                    "e.g. test-2clips-3crops (default: the latest)"),
    json_file: Optional[str] = typer.Option(None, "--json", help="also write the figures to this JSON file"),
) -> None:
    """Late fusion of tested runs (e.g. two streams): the weighted average of their saved per-video
    class scores; top-1, top-5 and mean class accuracy of each run and of the fusion (multi-label
    runs: mAP, GAP@20 and Hit@1 of their sigmoid probabilities)."""
    from ..eval.fusion import format_fusion, fuse_runs, parse_weights
    from ..io import write_json

    try:
        result = fuse_runs(runs, parse_weights(weights, len(runs)) if weights is not None else None, test_dir)
    except UserError as err:
        fail(str(err))
    print(format_fusion(result))
    if json_file:
        try:
            write_json(json_file, result)
        except UserError as err:
            fail(f"--json: {err}")
        print(f"wrote {json_file}")
