"""``tsmtrain prepare``: re-encode a recipe's (or list files') videos for training.

``prepare RECIPE|--list FILE --root ROOT --out DIR [--shard I/N | --merge]`` ->
:func:`tsmtrain.prep.encode.check_options`, :func:`~tsmtrain.prep.encode.run_task` and
:func:`~tsmtrain.prep.encode.merge`, printed by :func:`~tsmtrain.prep.encode.summary_lines` and
:func:`~tsmtrain.prep.encode.merge_lines`. Ctrl-C exits 130 (run it again to continue).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .common import SET_HELP, fail, load
from .plan import plan_command
from ..errors import UserError

__all__ = ["prepare"]


def prepare(
    recipe: Optional[str] = typer.Argument(None, help="YAML recipe: prepare its train and validation lists"),
    lists: list[str] = typer.Option([], "--list", help="a list file instead of a recipe (repeatable)"),
    root: Optional[str] = typer.Option(None, "--root", help="with --list: folder the list's paths are relative to"),
    out: str = typer.Option(..., "--out", help="output folder: videos, new list files, manifest.jsonl"),
    short_side: list[int] = typer.Option([256], "--short-side", help="pixels of the shorter displayed side (even; "
                                                                     "with --plan repeatable, e.g. 256 and 128)"),
    gop: Optional[int] = typer.Option(None, "--gop", help="frames between keyframes (default: 4, or the GOP of "
                                                           "the videos already in OUT)"),
    fps: Optional[str] = typer.Option(None, "--fps", help="output frame rate, e.g. 25 or 30000/1001 "
                                                          "(default: each source's own average rate)"),
    crf: int = typer.Option(23, "--crf", help="x264 constant rate factor (quality; lower is larger)"),
    preset: str = typer.Option("fast", "--preset", help="x264 preset (ultrafast ... veryslow)"),
    fastdecode: bool = typer.Option(True, "--fastdecode/--no-fastdecode",
                                    help="x264 -tune fastdecode and no B-frames: about 2x faster decoding, "
                                         "about 12% larger files"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="ffmpeg processes at once (default: the cores "
                                                                    "this process may use)"),
    decoder: str = typer.Option("torchcodec", "--decoder", help="decoder that verifies each output "
                                                                "(torchcodec or decord)"),
    frame_mappings: bool = typer.Option(True, "--frame-mappings/--no-frame-mappings",
                                        help="write OUTPUT.frames.json frame tables (torchcodec custom_frame_mappings)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: array task I of N: prepare every N-th video "
                                                              "from the I-th (I from 0), write only its journal"),
    merge: bool = typer.Option(False, "--merge", help="write the list files and manifest (and the shard index) "
                                                      "from the tasks' journals"),
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, help="with --merge: N, the array tasks to merge "
                                                                     "(default: found in OUT)"),
    shards: bool = typer.Option(False, "--shards", help="pack the videos into indexed tar shards (OUT/shards/, "
                                                        "OUT/index.json) instead of one file per video"),
    shard_size: str = typer.Option("1GiB", "--shard-size", help="with --shards: bytes per shard, e.g. 1GiB, 512MiB"),
    flow: Optional[str] = typer.Option(None, "--flow", help="also store each video's optical flow beside it "
                                                            "(NAME.flow.mkv): tvl1, dis or farneback"),
    flow_preset: str = typer.Option("medium", "--flow-preset", help="with --flow dis: ultrafast, fast or medium"),
    flow_bound: float = typer.Option(20.0, "--flow-bound", help="with --flow: pixels; flow is clipped to +-this, "
                                                                "then quantized to 0..255"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="try again the videos that failed before"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    plan: bool = typer.Option(False, "--plan", help="encode nothing for training: measure trial encodings (--gops "
                                                    "at each --short-side) of a sample in OUT/.plan/ and name the "
                                                    "smallest that feeds --target with --cores-per-gpu"),
    target: Optional[float] = typer.Option(None, "--target", help="with --plan: clips/s one GPU trains at"),
    cores_per_gpu: Optional[float] = typer.Option(None, "--cores-per-gpu", help="with --plan: CPU cores per GPU "
                                                                                "for decoding"),
    gops: Optional[str] = typer.Option(None, "--gops", help="with --plan: GOPs to try (default 1,2,4,8,16)"),
    sample: Optional[int] = typer.Option(None, "--sample", help="with --plan: videos sampled, spread over the "
                                                                "lists (default 12)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="with --plan: alternating rounds; figures are "
                                                                "medians (default 3)"),
    json_file: Optional[str] = typer.Option(None, "--json", help="with --plan: write every figure to this file"),
) -> None:
    """Re-encode every video of a recipe's lists (or of --list files) into OUT for training:
    H.264 yuv420p, short side 256, a keyframe every 4 frames, constant frame rate, upright;
    then write OUT's list files and manifest.jsonl.

    With --shards, the videos go into tar files of about --shard-size (WebDataset layout) and
    OUT/index.json, which a recipe reads with data.root: OUT/index.json.
    With --flow, each video's optical flow is stored beside it (lossless FFV1, NAME.flow.mkv).

    Run it again to continue after a stop: finished videos are skipped. On a cluster, run the
    array tasks (--shard I/N for I = 0..N-1, a Slurm job array: slurm/prepare.sbatch), then --merge.
    """
    if plan or any(v is not None for v in (target, cores_per_gpu, gops, sample, rounds, json_file)):
        return plan_command(plan, recipe, lists, root, out, short_side, gops, target, cores_per_gpu, sample, rounds,
                            json_file, dict(fps=fps, crf=crf, preset=preset, fastdecode=fastdecode), jobs, decoder,
                            frame_mappings, retry_failed, shard, merge, tasks, shards, sets)
    from ..prep.encode import Settings, check_options, parse_task, make_worklist
    from ..prep.tar_writer import parse_size

    settings = Settings(short_side=short_side[-1], gop=_gop(gop, out), fps=fps, crf=crf, preset=preset, fastdecode=fastdecode,
                        flow=flow, flow_preset=flow_preset, flow_bound=flow_bound)
    try:
        check_options(recipe, lists, root, shard, merge, tasks, settings, shards)
        size = parse_size(shard_size) if shards else None
    except UserError as err:
        fail(err.problems)
    if recipe is not None:
        d = load(recipe, sets).data
        root, lists = d.root, [d.train_list] + ([d.val_list] if d.val_list else [])
    try:
        plan = make_worklist(lists, root, out)
        _say([f"warning: {warning}" for warning in plan.warnings])
        _encode_and_merge(plan, settings, task=parse_task(shard) if shard is not None else None, merge=merge,
                          tasks=tasks, shard_size=size, jobs=jobs, decoder=decoder, frame_mappings=frame_mappings,
                          retry_failed=retry_failed)
    except UserError as err:
        fail(str(err).splitlines())
    except KeyboardInterrupt:
        _say(["interrupted: run the same command again to continue"])
        raise typer.Exit(130)


def _encode_and_merge(plan, settings, task: tuple[int, int] | None, merge: bool, tasks: int | None,
                      shard_size: int | None, jobs: int | None, decoder: str, frame_mappings: bool,
                      retry_failed: bool) -> None:
    """Encode array task ``task`` (all videos when None) unless ``merge``, as files or, with a
    ``shard_size``, into tar shards; then, unless it was one task of several, merge."""
    from ..prep import tar_writer as packing
    from ..prep.encode import check_tools, merge as merge_files, merge_lines, run_task, summary_lines

    if not merge:
        check_tools(decoder)
        if shard_size is not None:
            done = packing.pack_task(plan, settings, task or (0, 1), shard_size, jobs, decoder, retry_failed)
            _say(summary_lines(done.encoding, one_of_several=task is not None) + packing.pack_lines(done))
        else:
            summary = run_task(plan, settings, task or (0, 1), jobs, decoder, frame_mappings, retry_failed)
            _say(summary_lines(summary, one_of_several=task is not None))
    if task is None:
        count = tasks if merge else 1
        result = (packing.merge_tar_shards(plan, settings, shard_size, count) if shard_size is not None
                  else merge_files(plan, settings, count))
        for line in merge_lines(result):
            print(line)
        if shard_size is not None:  # the index: what a recipe's data.root names
            print(f"to train from these shards, set data.root: {result.manifest.parent} in the recipe (its "
                  f"{result.manifest.name} is read), with the list files above")


def _gop(given: int | None, out: str) -> int:
    """``--gop``, or the GOP of the videos already in ``out`` (said in a note), or the default:
    :func:`tsmtrain.prep.encode.choose_gop`."""
    from ..prep.encode import choose_gop

    gop, note = choose_gop(given, out)
    _say([f"note: {note}"] if note else [])
    return gop


def _say(lines: list[str]) -> None:
    """Print ``lines`` on stderr (progress, warnings and summaries; stdout gets what was written)."""
    for line in lines:
        print(line, file=sys.stderr)
