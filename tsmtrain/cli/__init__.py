"""The ``tsmtrain`` command. It parses arguments and delegates; the work is in the modules.

* ``tsmtrain run RECIPE [--set k=v] [--np N] [--resume/--no-resume]`` -> :func:`tsmtrain.train.train`
  (through :mod:`tsmtrain.dist.local` when N ranks must be started on this host)
* ``tsmtrain render RECIPE [cluster flags]`` -> :func:`tsmtrain.dist.slurm.render_sbatch`
* ``tsmtrain submit RECIPE [cluster flags] [--dry-run]`` -> :func:`tsmtrain.dist.slurm.submit`
* ``tsmtrain env [RECIPE]`` -> :func:`tsmtrain.dist.base.describe_rank` on every rank, and what
  Horovod was built with
* ``tsmtrain test RECIPE [--checkpoint PATH] [--clips K] [--crops 1|3|10] [--list FILE] [--np N]`` ->
  :func:`tsmtrain.train.test.run_test`
* ``tsmtrain predict RECIPE VIDEO... [--checkpoint PATH] [--top K]`` -> :func:`tsmtrain.train.test.predict_videos`
* ``tsmtrain validate RECIPE`` -> :func:`tsmtrain.recipe.load_recipe`, prints the resolved recipe
* ``tsmtrain model-info RECIPE`` -> :mod:`tsmtrain.models` parameter and multiply-add counts
* ``tsmtrain bench data RECIPE [--workers 1,2,4] [--json F]`` -> :mod:`tsmtrain.data.bench`
* ``tsmtrain prepare RECIPE|--list FILE --root ROOT --out DIR [--shard I/N | --merge]`` ->
  :mod:`tsmtrain.data.prepare` (re-encode the videos for training)
* ``tsmtrain sweep RECIPE --workers 1,2,4 [--strong] [--local/--submit]`` -> :mod:`tsmtrain.scaling.sweep`
* ``tsmtrain report SWEEP_DIR [--predict 256,1536 --network NET.yaml [--data-bench F]]`` ->
  :mod:`tsmtrain.scaling.report`, :mod:`tsmtrain.scaling.model`
* ``tsmtrain bench step RECIPE [--json FILE]`` -> :func:`tsmtrain.train.bench.bench_step`

User mistakes (bad recipe, bad list file, missing launcher, impossible job) print one line per
problem and exit with status 2, never a traceback. A run stopped by SIGUSR2 or SIGTERM after its
checkpoint exits with :data:`tsmtrain.train.EXIT_PREEMPTED` (75).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from .recipe import Recipe, RecipeError, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Large-batch training of Temporal Shift Module video networks.")

SET_HELP = "override a recipe field, e.g. --set optim.base_lr=0.02 (repeatable)"



def _fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def _fail_if_peer_failed(err: Exception) -> None:
    """Exit 1 with one line when ``err`` only says that another rank failed (that rank printed
    the cause); otherwise return, and the caller re-raises (an internal error: traceback, 1)."""
    from .dist import peer_failure

    line = peer_failure(err)
    if line:
        _fail(line, code=1)


def _load(recipe: str, sets: list[str], check_files: bool = True, flags: dict | None = None) -> Recipe:
    try:
        return load_recipe(recipe, sets, check_files=check_files, flags=flags)
    except RecipeError as err:
        _fail([str(p) for p in err.problems])


@app.command()
def run(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="ranks to start on this host (sets dist.np)"),
    resume: Optional[bool] = typer.Option(
        None, "--resume/--no-resume",
        help="default: continue from the run directory's latest checkpoint if there is one; "
             "--resume: there must be one; --no-resume: there must be none"),
) -> None:
    """Train a recipe: on this host, or as one rank of an srun/mpirun job.

    Exits 0 when done, 2 on a user mistake, 75 when SIGUSR2 or SIGTERM stopped it after a checkpoint.
    """
    from .data import DataError, ListFileError
    from .data.prepare import ManifestError
    from .dist import launched_by_launcher
    from .dist.local import EXIT_PREEMPTED, default_launcher
    from .train import TrainingError, train

    sets = list(sets) + ([f"dist.np={np}"] if np is not None else [])
    cfg = _load(recipe, sets)
    if cfg.dist.np > 1 and not launched_by_launcher():
        from .dist.local import launch_local

        args = ["run", recipe, *(a for s in sets for a in ("--set", s))]
        args += [] if resume is None else ["--resume" if resume else "--no-resume"]
        try:
            raise typer.Exit(launch_local(cfg.dist.np, default_launcher(cfg.dist.engine, cfg.dist.launcher), args,
                                          run_dir=cfg.run_dir))
        except FileNotFoundError as err:
            _fail(str(err))
    try:
        result = train(cfg, resume=resume)
    except (TrainingError, ListFileError, ManifestError, DataError) as err:
        _fail(str(err).splitlines())
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as err:
        _fail_if_peer_failed(err)
        raise
    if result.preempted:
        raise typer.Exit(EXIT_PREEMPTED)
    if result.eval and result.rank == 0:
        print(f"final validation top-1: {result.eval['top1']:.2f}% (top-5 {result.eval['top5']:.2f}%, "
              f"{result.eval['clips']} clips, step {result.step})")


def _protocol(clips: int, crops: int):
    from .train.test import Protocol

    try:
        return Protocol(clips, crops)
    except ValueError as err:
        _fail(str(err))


@app.command()
def test(
    recipe: str = typer.Argument(..., help="YAML recipe of the trained run"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="checkpoint file (default: the run "
                                                                      "directory's latest)"),
    clips: int = typer.Option(1, "--clips", help="K: clips per video, spread evenly over it"),
    crops: int = typer.Option(1, "--crops", help="crops per clip: 1 (centre), 3 (along the long side, at the resize "
                                                 "size), 10 (corners, centre and their flips)"),
    list_file: Optional[str] = typer.Option(None, "--list", help="list file of the videos to test (default: "
                                                                 "data.val_list), paths under data.root"),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="ranks to start on this host (sets dist.np)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Test a checkpoint under a view protocol: top-1, top-5 and mean class accuracy; per-class
    table, confusion matrix and predictions in RUN_DIR/test/."""
    from .data import DataError, ListFileError
    from .data.prepare import ManifestError
    from .dist import launched_by_launcher
    from .train import TrainingError

    protocol = _protocol(clips, crops)
    if list_file is not None and not Path(list_file).is_file():
        _fail(f"--list {list_file}: list file not found")
    sets = list(sets) + ([f"dist.np={np}"] if np is not None else [])
    cfg = _load(recipe, sets)
    if cfg.dist.np > 1 and not launched_by_launcher():
        from .dist.local import default_launcher, launch_local

        args = ["test", recipe, *(a for s in sets for a in ("--set", s)), "--clips", str(clips), "--crops", str(crops)]
        args += (["--checkpoint", checkpoint] if checkpoint else []) + (["--list", list_file] if list_file else [])
        try:
            raise typer.Exit(launch_local(cfg.dist.np, default_launcher(cfg.dist.engine, cfg.dist.launcher), args))
        except FileNotFoundError as err:
            _fail(str(err))
    from .train.test import format_report, run_test

    try:
        report = run_test(cfg, protocol, checkpoint=checkpoint, list_file=list_file)
    except (TrainingError, ListFileError, ManifestError, DataError) as err:
        _fail(str(err).splitlines())
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as err:
        _fail_if_peer_failed(err)
        raise
    if report.rank != 0:
        return
    for path, reason in report.unreadable:
        print(f"unreadable: {reason}", file=sys.stderr)
    print(format_report(report, cfg.model.num_classes, cfg.data.input_size))


@app.command()
def predict(
    recipe: str = typer.Argument(..., help="YAML recipe of the trained run"),
    videos: list[str] = typer.Argument(..., help="video files"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="checkpoint file (default: the run "
                                                                      "directory's latest)"),
    top: int = typer.Option(5, "--top", min=1, help="classes to print per video"),
    clips: int = typer.Option(1, "--clips", help="K: clips per video (as tsmtrain test)"),
    crops: int = typer.Option(1, "--crops", help="crops per clip: 1, 3 or 10 (as tsmtrain test)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the top classes, with their averaged softmax scores, of each video file (on the CPU)."""
    from .train import TrainingError
    from .train.test import predict_videos

    protocol = _protocol(clips, crops)
    cfg = _load(recipe, sets, check_files=False)
    if cfg.data.classes is not None and not Path(cfg.data.classes).is_file():
        _fail(f"data.classes = {cfg.data.classes!r}: label map file not found")
    from .data import DataError

    try:
        results, path, names = predict_videos(cfg, videos, protocol, checkpoint=checkpoint, top=top)
    except (TrainingError, DataError) as err:
        _fail(str(err).splitlines())
    print(f"checkpoint {path}, {protocol.describe(cfg.data.input_size)}")
    failed = 0
    for r in results:
        if r["error"] is not None:
            print(f"{r['path']}: unreadable: {r['error']}")
            failed += 1
            continue
        print(f"{r['path']}:")
        for c, score in zip(r["top"], r["scores"]):
            print(f"  {score:7.4f}  {c:>4}  {names[c] if names else ''}".rstrip())
    if failed:
        raise typer.Exit(1)


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="world size for the derived values"),
) -> None:
    """Check a recipe and print it resolved, with derived values (global batch, scaled lr)."""
    cfg = _load(recipe, list(sets) + ([f"dist.np={np}"] if np is not None else []))
    from .optim import linear_scaling

    doc = cfg.model_dump(mode="json")
    scaling = linear_scaling(cfg)
    doc["derived"] = {"world_size": scaling.world_size, "global_batch": scaling.global_batch, "lr": scaling.lr,
                      "run_dir": str(cfg.run_dir)}
    print(yaml.safe_dump(doc, sort_keys=False), end="")


@app.command("model-info")
def model_info(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the network's parameters and multiply-accumulates per clip."""
    from rich.console import Console
    from rich.table import Table

    from .models import count_macs, count_parameters, create_model

    cfg = _load(recipe, sets, check_files=False)
    model = create_model(cfg.model, cfg.data.num_segments)
    params, macs = count_parameters(model), count_macs(model, cfg.data.input_size)
    name = f"{'TSM' if cfg.model.shift else 'TSN'}-{cfg.model.arch}"
    table = Table(title=f"{name}, {cfg.model.num_classes} classes")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("input per clip", f"{cfg.data.num_segments} x 3 x {cfg.data.input_size} x {cfg.data.input_size}")
    table.add_row("parameters", f"{params / 1e6:.2f} M ({params:,})")
    table.add_row("multiply-adds per clip", f"{macs / 1e9:.2f} G")
    table.add_row("multiply-adds per frame", f"{macs / cfg.data.num_segments / 1e9:.3f} G")
    Console().print(table)


# --------------------------------------------------------------------------- benchmarks

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the data path and the training step.")
app.add_typer(bench_app, name="bench")


@bench_app.command("data")
def bench_data(
    recipe: str = typer.Argument(..., help="YAML recipe whose videos to read"),
    workers: str = typer.Option("1,2", "--workers", help="loader worker counts to measure, e.g. 1,2,4"),
    clips: int = typer.Option(64, "--clips", help="clips per measurement (cycles through a shorter list)"),
    rounds: int = typer.Option(3, "--rounds", help="alternating rounds of every measurement; figures are medians"),
    target: Optional[float] = typer.Option(None, "--target", help="clips/s one GPU trains at: print the cores "
                                                                  "per GPU it needs"),
    against: Optional[str] = typer.Option(None, "--against", help="an earlier --json record (e.g. of the source "
                                                                  "videos before tsmtrain prepare): print the ratio"),
    split: str = typer.Option("train", "--split", help="train (random offsets) or val (segment centres)"),
    json_file: Optional[str] = typer.Option(None, "--json", help="write the figures to this JSON file"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Measure clips/s of the recipe's loader per worker next to the raw decoder on the same
    frames, and the batched augmentation on the device."""
    import json

    from rich.console import Console

    from .data import DataError, ListFileError
    from .data.bench import DataBenchError, bench_data as run_bench, load_data_bench
    from .data.prepare import ManifestError
    from .scaling.sweep import parse_workers

    if split not in ("train", "val"):
        _fail(f"--split: {split!r}: use train or val")
    try:
        counts = parse_workers(workers, "--workers")
        baseline = load_data_bench(against) if against else None
    except (ValueError, DataBenchError) as err:
        _fail(str(err))
    cfg = _load(recipe, sets)
    console = Console(stderr=True, highlight=False, soft_wrap=True)

    def show(stage: str, row: dict) -> None:
        if stage == "raw":
            console.print(f"raw decoder, 1 core: {row['clips_per_s']:.2f} clips/s ({row['clips']} clips"
                          + (f", {row['failed']} failed" if row["failed"] else "") + ")")
        elif stage == "loader":
            console.print(f"loader, {row['workers']} worker(s): {row['clips_per_s']:.2f} clips/s, "
                          f"{row['clips_per_s_per_worker']:.2f} per worker, loader/raw {row['ratio_to_raw']:.2f}")
        else:
            console.print(f"augmentation on {row['device']}: {row['clips_per_s']:.1f} clips/s")

    d = cfg.data
    console.print(f"{recipe}: {d.decoder}, {d.num_segments} frames per clip"
                  + (f" at {d.frame_size[0]}x{d.frame_size[1]}" if d.frame_size else " at the stored size")
                  + f", {clips} clips per measurement, {rounds} rounds (medians)")
    try:
        result = run_bench(cfg, recipe, counts, clips=clips, target=target, split=split, rounds=rounds,
                           on_result=show)
    except (DataBenchError, ListFileError, ManifestError, DataError) as err:
        _fail(str(err).splitlines())
    record = result.record()
    for line in result.failed:
        console.print(f"[yellow]unreadable, left out:[/yellow] {line}", markup=True)
    console.print(f"seek modes: " + ", ".join(f"{k} {v}" for k, v in sorted(result.seek_modes.items())))
    console.print(f"clips/s per core: {result.clips_per_s_per_core:.2f}")
    if target:
        console.print(f"cores per GPU at {target:g} clips/s: {result.cores_per_gpu(target):.1f}")
    if baseline is not None:
        ratio = result.clips_per_s_per_core / baseline["clips_per_s_per_core"]
        record["against"] = {"file": against, "clips_per_s_per_core": baseline["clips_per_s_per_core"], "ratio": ratio}
        console.print(f"against {against}: {baseline['clips_per_s_per_core']:.2f} clips/s per core there, "
                      f"ratio {ratio:.2f}x")
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(record, indent=2) + "\n")
        console.print(f"wrote {json_file}")
@bench_app.command("step")
def bench_step(
    recipe: str = typer.Argument(..., help="YAML recipe (its data files need not exist)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_file: Optional[str] = typer.Option(None, "--json", help="also write every measurement to this JSON file"),
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated, e.g. fp32,bf16,"
                                           "fp32+channels_last,fp32+compile (default: all that run on this device)"),
    steps: int = typer.Option(20, "--steps", min=1, help="measured rounds per variant"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed steps per network and variant first"),
    budget: float = typer.Option(300.0, "--budget", min=0, help="seconds per variant after which it stops early "
                                                                "(with at least 3 rounds)"),
) -> None:
    """Time forward+backward+optimizer of the recipe's network as TSM and TSN, in every precision,
    memory format and compile variant that runs here, on a synthetic batch; and the temporal
    shift against a copy of its input."""
    import json

    from .train import TrainingError
    from .train.bench import bench_step as run_bench
    from .train.bench import format_step_report, parse_variants
    from .train.runtime import choose_device

    cfg = _load(recipe, sets, check_files=False)
    try:
        device = choose_device(cfg.train.device, 0)
        chosen = parse_variants(variants, device) if variants is not None else None
    except TrainingError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"--variants: {err}")
    try:
        result = run_bench(cfg, chosen, steps=steps, warmup=warmup, budget_s=budget,
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    except TrainingError as err:
        _fail(str(err).splitlines())
    print(format_step_report(result))
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_file}")


# --------------------------------------------------------------------------- data


@app.command()
def prepare(
    recipe: Optional[str] = typer.Argument(None, help="YAML recipe: prepare its train and validation lists"),
    lists: list[str] = typer.Option([], "--list", help="a list file instead of a recipe (repeatable)"),
    root: Optional[str] = typer.Option(None, "--root", help="with --list: folder the list's paths are relative to"),
    out: str = typer.Option(..., "--out", help="output folder: videos, new list files, manifest.jsonl"),
    short_side: int = typer.Option(256, "--short-side", help="pixels of the shorter displayed side (even)"),
    gop: int = typer.Option(16, "--gop", help="frames between keyframes"),
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
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: prepare every N-th video from the I-th "
                                                              "(I from 0) and write only the shard's journal"),
    merge: bool = typer.Option(False, "--merge", help="write the list files and manifest from the shard journals"),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="with --merge: N (default: found in OUT)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="try again the videos that failed before"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Re-encode every video of a recipe's lists (or of --list files) into OUT for training:
    H.264 yuv420p, short side 256, a keyframe every 16 frames, constant frame rate, upright;
    then write OUT's list files and manifest.jsonl.

    Run it again to continue after a stop: finished videos are skipped. On a cluster, run the
    shards (--shard I/N for I = 0..N-1, a Slurm job array: slurm/prepare.sbatch), then --merge.
    """
    from .data.prepare import (ManifestError, PrepareError, Settings, check_tools, merge as merge_shards,
                               parse_shard, plan_videos, run_shard)

    problems = []
    if (recipe is None) == (not lists):
        problems.append("give a recipe or --list files (with --root), not both" if recipe else
                        "give a recipe, or --list FILE --root ROOT")
    if lists and root is None:
        problems.append("--list: give --root, the folder its paths are relative to")
    if recipe is not None and root is not None:
        problems.append("--root: the recipe's data.root is used; give --root only with --list")
    if shard is not None and merge:
        problems.append("--shard and --merge: run the shards first, then one --merge")
    if shards is not None and not merge:
        problems.append("--shards goes with --merge (a shard is chosen with --shard I/N)")
    settings = Settings(short_side=short_side, gop=gop, fps=fps, crf=crf, preset=preset, fastdecode=fastdecode)
    problems += settings.problems()
    if problems:
        _fail(problems)
    if recipe is not None:
        cfg = _load(recipe, sets)
        root = cfg.data.root
        lists = [cfg.data.train_list] + ([cfg.data.val_list] if cfg.data.val_list else [])
    try:
        where = parse_shard(shard) if shard is not None else (0, 1)
        plan = plan_videos(lists, root, out)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not merge:
            check_tools(decoder)
            s = run_shard(plan, settings, where, jobs, decoder, frame_mappings, retry_failed)
            label = "" if shard is None else f"shard {where[0]}/{where[1]}: "
            rate = (f" in {s.seconds:.1f} s: {s.videos_per_s:.2f} videos/s, "
                    f"{s.source_seconds / s.seconds if s.seconds else 0:.1f} s of video per s") if s.ok + s.failed else ""
            print(f"{label}{s.videos} videos: {s.ok} prepared, {s.failed} failed, {s.done_before} already done"
                  f"{rate}", file=sys.stderr)
            for source, reason in s.failures[:20]:
                print(f"failed: {source}: {reason}", file=sys.stderr)
            if len(s.failures) > 20:
                print(f"failed: ... {len(s.failures) - 20} more (reasons in the manifest)", file=sys.stderr)
        if shard is None:
            result = merge_shards(plan, settings, shards if merge else 1)
            for path, kept, left in result.lists:
                print(f"wrote {path}: {kept} videos" + (f" ({left} left out: failed)" if left else ""))
            print(f"wrote {result.manifest}: {result.ok} ok, {result.failed} failed")
    except (PrepareError, ManifestError) as err:
        _fail(str(err).splitlines())
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        raise typer.Exit(130)


# --------------------------------------------------------------------------- cluster

# the cluster section's keys that are also flags of render and submit (--nodes, --time, ...)
CLUSTER_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "partition", "account",
                 "qos", "constraint", "reservation", "job_name", "launcher", "max_requeues", "signal_seconds", "python")


def _with_cluster_flags(command):
    """Give ``command`` one option per :data:`CLUSTER_FLAGS` key, typed and described by the
    recipe schema (:class:`tsmtrain.recipe.ClusterConfig`); the values it gets arrive as the
    ``cluster`` dict, ``{"cluster.nodes": ("--nodes", 4), ...}``, for only the flags given."""
    import functools
    import inspect

    from .recipe import ClusterConfig

    params = [p for p in inspect.signature(command).parameters.values() if p.name != "cluster"]
    for key in CLUSTER_FLAGS:
        field = ClusterConfig.model_fields[key]
        kind = int if int in (field.annotation, *getattr(field.annotation, "__args__", ())) else str
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                        default=typer.Option(None, help=field.description)))

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {f"cluster.{k}": ("--" + k.replace("_", "-"), kwargs.pop(k)) for k in CLUSTER_FLAGS}
        return command(**kwargs, cluster={k: v for k, v in given.items() if v[1] is not None})

    wrapper.__signature__ = inspect.Signature(params)
    return wrapper


def _job(recipe: str, sets, template, flags: dict, dry_run: bool | None):
    from .dist.slurm import LaunchError, prepare_job, render_sbatch, submit

    # rendering may happen away from the cluster's file system; submitting happens beside it
    cfg = _load(recipe, sets, check_files=dry_run is not None, flags=flags)
    try:
        if dry_run is None:
            return render_sbatch(prepare_job(cfg), template)
        return submit(cfg, template, dry_run=dry_run)
    except LaunchError as err:
        _fail(str(err))


TEMPLATE_HELP = "your own Jinja2 job template (default slurm/job.sbatch.j2)"


@app.command()
@_with_cluster_flags
def render(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    cluster: dict = None,
) -> None:
    """Print the sbatch script for a recipe (cluster flags override the recipe's cluster section)."""
    print(_job(recipe, sets, template, cluster, None), end="")


@app.command()
@_with_cluster_flags
def submit(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="write the script and recipe into the run directory, do not sbatch"),
    cluster: dict = None,
) -> None:
    """Write the job script and resolved recipe into the run directory and submit it with sbatch."""
    result = _job(recipe, sets, template, cluster, dry_run)
    print(f"script: {result.script}\nrecipe: {result.recipe_file}\nlog:    {result.log_pattern}")
    if result.job_id is None:
        print(f"dry run: not submitted; submit with: sbatch {result.script}")
    else:
        print(f"submitted job {result.job_id}; log {result.log_pattern.replace('%j', result.job_id)}")


@app.command()
def env(
    recipe: Optional[str] = typer.Argument(None, help="recipe whose dist.engine to use (default horovod)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print what each rank sees: rank, local rank, world size, host, engine, devices; and what
    Horovod and torch.distributed were built with (NCCL, MPI, Gloo, CUDA).

    Run it the way the job runs ``tsmtrain run``, e.g. ``srun --mpi=pmix tsmtrain env``, or
    ``srun tsmtrain env recipe.yaml`` for a DDP recipe.
    """
    from rich.console import Console
    from rich.table import Table

    from .dist import DistError, create_engine, launched_by_launcher
    from .dist.base import LocalEngine, describe_rank

    cfg = _load(recipe, sets, check_files=False) if recipe else None
    name = cfg.dist.engine if cfg else "horovod"
    launched = launched_by_launcher()
    import torch

    try:
        cuda = cfg is not None and cfg.train.device != "cpu" and torch.cuda.is_available()
        engine = create_engine(name, cfg.dist if cfg else None, cuda=cuda) if launched else LocalEngine()
    except ImportError as err:
        _fail(f"dist.engine: {name}: cannot import it ({err}); run make setup")
    except DistError as err:
        _fail(str(err))
    rows = engine.allgather_object(describe_rank(engine), name="describe_rank")
    if engine.rank == 0:
        table = Table(title=f"{engine.size} rank(s), engine {engine.name}"
                      + ("" if launched else " (not started by srun, mpirun or horovodrun)"))
        for col in ("rank", "local rank", "host", "pid", "devices", "cpus", "launcher variables"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["rank"]), f"{r['local_rank']}/{r['local_size']}", r["host"], str(r["pid"]),
                          ", ".join(r["devices"]), str(r["cpus"]),
                          " ".join(f"{k}={v}" for k, v in r["launcher_env"].items()))
        Console(width=200).print(table)
        for line in _build_lines():
            print(line)


def _build_lines() -> list[str]:
    """What the communication libraries were built with, one line each."""
    import torch
    import torch.distributed as tdist

    def yes(flag) -> str:
        return "yes" if flag else "no"

    lines = []
    try:
        from .dist.horovod import build_info

        info = build_info()
        nccl = info["nccl"]
        lines.append(f"horovod {info['version']}: NCCL {f'yes ({nccl // 10000}.{nccl // 100 % 100}.{nccl % 100})' if nccl else 'no'}, "
                     f"CUDA {yes(info['cuda'])}, MPI {yes(info['mpi'])}, Gloo {yes(info['gloo'])}")
    except ImportError as err:
        lines.append(f"horovod: not installed ({err}); make setup builds it")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if tdist.is_nccl_available() and torch.version.cuda else ""
    lines.append(f"torch {torch.__version__} distributed: NCCL {f'yes ({nccl})' if nccl else 'no'}, "
                 f"CUDA {torch.version.cuda or 'no'}, MPI {yes(tdist.is_mpi_available())}, "
                 f"Gloo {yes(tdist.is_gloo_available())}; GPUs visible: {torch.cuda.device_count()}")
    return lines


# --------------------------------------------------------------------------- scaling


@app.command()
@_with_cluster_flags
def sweep(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    workers: str = typer.Option(..., "--workers", help="worker counts (ranks), e.g. 1,2,4,8"),
    strong: bool = typer.Option(False, "--strong", help="strong scaling: keep the global batch (default: weak "
                                                        "scaling, keep the clips per rank)"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", min=1,
                                               help="with --strong: the global batch (default: the recipe's)"),
    local: bool = typer.Option(True, "--local/--submit", help="run each point here (tsmtrain run --np N), or "
                                                               "submit one Slurm job per point"),
    array: bool = typer.Option(False, "--array", help="with --submit: one job array per node count"),
    steps: int = typer.Option(20, "--steps", help="measured optimizer steps per point"),
    warmup: int = typer.Option(5, "--warmup", help="optimizer steps before measuring"),
    out: Optional[str] = typer.Option(None, "--out", help="sweep directory (default RUN_DIR/sweeps/NAME-weak|strong)"),
    rerun: bool = typer.Option(False, "--rerun", help="measure points again that the sweep directory already has"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds after which a local point is killed"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    cluster: dict = None,
) -> None:
    """Benchmark a recipe at several worker counts (short runs, no evaluation) into a sweep
    directory; run it again to resume or extend it. Then: tsmtrain report SWEEP_DIR."""
    from rich.console import Console

    from .data import DataError, ListFileError
    from .dist.slurm import LaunchError
    from .scaling.records import SweepError
    from .scaling.sweep import parse_workers, plan_sweep, run_sweep

    if array and local:
        _fail("--array: job arrays are for --submit")
    cfg = _load(recipe, sets, flags=cluster)
    console = Console(stderr=True, soft_wrap=True)
    try:
        plan = plan_sweep(cfg, recipe, parse_workers(workers), out, strong=strong, global_batch=global_batch,
                          launch="local" if local else "submit", steps=steps, warmup=warmup, rerun=rerun)
    except (SweepError, ListFileError) as err:
        _fail(str(err))
    console.print(f"sweep {plan.sweep_dir}: {plan.meta['mode']} scaling of {plan.meta['model']}, "
                  f"{warmup} warm-up + {steps} measured steps per point")
    if plan.skipped:
        console.print(f"kept from earlier: workers {', '.join(map(str, plan.skipped))} (--rerun measures them again)")

    def show(r: dict) -> None:
        if r["status"] == "ok":
            console.print(f"workers {r['workers']:>5}: {r['clips_per_s']:.1f} clips/s, {r['step_time_s']:.3f} s/step "
                          f"(global batch {r['global_batch']}) in {r['seconds']:.0f} s")
        elif r["status"] == "submitted":
            console.print(f"workers {r['workers']:>5}: submitted job {r['job_id']}")
        else:
            console.print(f"workers {r['workers']:>5}: [red]failed[/red]: {r['error']}", markup=True, highlight=False)

    try:
        records = run_sweep(plan, launch="local" if local else "submit", array=array, timeout=timeout,
                            template=template, on_point=show)
    except (SweepError, LaunchError) as err:
        _fail(str(err))
    failed = [r for r in records if r["status"] == "failed"]
    console.print(f"records in {plan.sweep_dir / 'points'}; table and plots: tsmtrain report {plan.sweep_dir}")
    if failed:
        raise typer.Exit(1)


@app.command()
def report(
    sweep_dir: str = typer.Argument(..., help="a directory written by tsmtrain sweep"),
    predict: Optional[str] = typer.Option(None, "--predict", help="worker counts to predict, e.g. 256,1536"),
    network: Optional[str] = typer.Option(None, "--network", help="network description (YAML) for --predict, "
                                                                 "e.g. configs/networks/summit.yaml"),
    data_bench: Optional[str] = typer.Option(None, "--data-bench", help="a tsmtrain bench data --json record: its "
                                             "clips/s per core x the network's cores per node is the data ceiling"),
) -> None:
    """Write the sweep's table (Markdown, CSV) and plots into SWEEP_DIR/report and print the table;
    with --predict, add the scaling model's points."""
    from .scaling.records import SweepError
    from .scaling.report import load_sweep, print_report, table_rows, write_report
    from .scaling.sweep import collect, parse_workers

    if (predict is None) != (network is None):
        _fail("--predict and --network go together: the model needs worker counts and a network")
    if data_bench is not None and predict is None:
        _fail("--data-bench goes with --predict and --network: it sets the model's data ceiling")
    try:
        collect(sweep_dir) if (Path(sweep_dir) / "sweep.json").exists() else None
        meta, records = load_sweep(sweep_dir)
        predictions = None
        if predict is not None:
            from dataclasses import asdict

            from .scaling.model import NetworkError, basis_from_sweep, load_network
            from .scaling.model import predict as model_predict

            counts = parse_workers(predict, "--predict")
            try:
                net = load_network(network)
                if data_bench is not None:
                    from .data.bench import DataBenchError, load_data_bench

                    try:
                        rate = load_data_bench(data_bench)["clips_per_s_per_core"]
                    except DataBenchError as err:
                        _fail(str(err))
                    net = net.with_data_ceiling(rate)
                    print(f"model: data ceiling {net.data_clips_per_s_per_node:.0f} clips/s per node = {rate:.2f} "
                          f"clips/s per core ({data_bench}) x {net.cores_per_node - net.ranks_per_node} loader cores",
                          file=sys.stderr)
                basis = basis_from_sweep(meta, records)
            except NetworkError as err:
                _fail(str(err))
            except ValueError as err:
                _fail(f"--predict: {err}")
            predictions = [asdict(p) for p in model_predict(basis, net, counts)]
            for note in basis.notes:
                print(f"model: {note}", file=sys.stderr)
        files = write_report(sweep_dir, predictions)
        from rich.console import Console

        # a pipe or log file gets the whole table rather than 80 squeezed columns
        print_report(meta, table_rows(meta, records, predictions), Console(width=None if sys.stdout.isatty() else 220))
    except SweepError as err:
        _fail(str(err))
    for path in (getattr(files, name) for name in vars(files)):
        print(f"wrote {path}")
