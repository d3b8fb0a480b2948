"""``tsmtrain run``, ``tsmtrain validate`` and ``tsmtrain model-info``.

* ``run RECIPE [--set k=v] [--np N] [--resume/--no-resume]`` -> :func:`tsmtrain.train.train`
  (through :func:`tsmtrain.cli.common.relaunch` when N ranks must be started on this host)
* ``validate RECIPE [--set k=v] [--np N] [--no-files]`` -> :func:`tsmtrain.recipe.load_recipe` and
  the check before training (:func:`tsmtrain.data.preflight.data_problems`), printed resolved with
  the derived values of :func:`tsmtrain.optim.linear_scaling`
* ``model-info RECIPE`` -> :func:`tsmtrain.models.count_parameters`, :func:`tsmtrain.models.count_macs`
"""

from __future__ import annotations

from typing import Optional

import typer

from .common import SET_HELP, fail, load, relaunch, set_args, user_errors, with_np
from ..errors import UserError

__all__ = ["run", "validate", "model_info"]


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
    from ..dist.stop import EXIT_PREEMPTED
    from ..train import train

    sets = with_np(sets, np)
    cfg = load(recipe, sets)
    flag = [] if resume is None else ["--resume" if resume else "--no-resume"]
    relaunch(cfg, ["run", recipe, *set_args(sets), *flag], run_dir=cfg.run_dir)
    with user_errors():
        result = train(cfg, resume=resume)
    if result.preempted:
        raise typer.Exit(EXIT_PREEMPTED)
    if result.eval and result.rank == 0:
        print(f"final validation top-1: {result.eval['top1']:.2f}% (top-5 {result.eval['top5']:.2f}%, "
              f"{result.eval['clips']} clips, step {result.step})")


def validate(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="world size for the derived values"),
    files: bool = typer.Option(
        True, "--files/--no-files",
        help="also check the files on this machine, as run does before its first step: the files the recipe "
             "names, its lists, and what their videos are read from (shard index and shards, flow files, "
             "features); --no-files: a recipe meant for another machine"),
) -> None:
    """Check a recipe and print it resolved, with derived values (global batch, scaled lr)."""
    import yaml

    cfg = load(recipe, with_np(sets, np), check_files=files)
    if files and cfg.data.generate is None:  # a generated dataset is built (and checked) by run
        _check_data(cfg)
    doc = cfg.model_dump(mode="json")
    doc["derived"] = _derived(cfg, files)
    if cfg.multigrid.long_cycle or cfg.multigrid.short_cycle:  # its epochs and steps replace the plain ones
        mg = _multigrid_schedule(cfg)
        doc["derived"].update(epochs=mg["epochs"], steps=mg.get("steps"), steps_per_epoch=None, warmup_steps=None,
                              multigrid=mg)
    print(yaml.safe_dump(doc, sort_keys=False), end="")


def _derived(cfg, files: bool) -> dict:
    """``validate``'s derived values: world size, global batch and scaled lr
    (:func:`tsmtrain.optim.linear_scaling`), run directory, then the epochs and warmup epochs of
    that global batch (:func:`tsmtrain.optim.batch_scaled_schedule`) and, when the training list
    can be read here (``files``), its optimizer steps per epoch, in all and of warmup (else ``None``)."""
    import math

    from ..optim import batch_scaled_schedule, linear_scaling

    scaling = linear_scaling(cfg)
    s = batch_scaled_schedule(cfg, scaling.world_size).schedule
    videos = _train_videos(cfg) if files else None
    per_epoch = None if videos is None else (
        math.ceil(videos / scaling.world_size) // cfg.train.batch_size // cfg.dist.backward_passes_per_step)
    return {"world_size": scaling.world_size, "global_batch": scaling.global_batch, "lr": scaling.lr,
            "run_dir": str(cfg.run_dir), "epochs": s.epochs, "warmup_epochs": s.warmup_epochs,
            "steps_per_epoch": per_epoch, "steps": None if per_epoch is None else per_epoch * s.epochs,
            "warmup_steps": None if per_epoch is None else round(s.warmup_epochs * per_epoch)}


def _train_videos(cfg) -> int | None:
    """Videos in the recipe's training list, or ``None`` when it is not there to read (a dataset
    that ``run`` generates, features) or is malformed (reported by the file check)."""
    from pathlib import Path

    from ..data.lists import read_list

    if cfg.data.features is not None or not Path(cfg.data.train_list).is_file():
        return None
    try:
        return len(read_list(cfg.data.train_list, cfg.data.root, cfg.model.num_classes,
                             multi_label=cfg.model.loss == "sigmoid"))
    except UserError:
        return None


def _multigrid_schedule(cfg) -> dict:
    """``validate``'s multigrid schedule (:meth:`tsmtrain.train.multigrid.MultigridSchedule.rows`)
    for the epochs of the recipe's global batch: the epochs, the steps when the training list can be
    read here, and per stage its epochs, shapes, batches, learning rate and steps; a stage whose
    step needs more clips than a rank has is an ``error:`` line and exit 2."""
    import math

    from ..optim import batch_scaled_schedule, linear_scaling
    from ..train.multigrid import MultigridSchedule

    scaling = linear_scaling(cfg)
    videos = _train_videos(cfg)
    try:
        schedule = MultigridSchedule(batch_scaled_schedule(cfg, scaling.world_size),
                                     None if videos is None else math.ceil(videos / scaling.world_size))
    except UserError as err:
        fail([str(err)])
    out = {"epochs": schedule.epochs}
    if videos is not None:
        out["steps"] = schedule.total_steps
    return {**out, "stages": schedule.rows(scaling.world_size, scaling.lr)}


def _check_data(cfg) -> None:
    """:func:`tsmtrain.data.preflight.data_problems` for ``validate``: one ``error:`` line (a
    malformed list: one per bad line) and exit 2 when a file is missing."""
    from ..data.preflight import data_problems, one_line

    try:
        problems = data_problems(cfg)
    except UserError as err:
        fail(str(err).splitlines())
    if problems:
        fail(one_line(problems))


def model_info(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the network's parameters and multiply-accumulates per clip."""
    from rich.console import Console
    from rich.table import Table

    from ..data.modality import modality_of
    from ..models import count_macs, count_parameters, create_model

    cfg = load(recipe, sets, check_files=False)
    channels = modality_of(cfg.data).in_channels
    # (random weights: a pretrained file changes neither count, and need not exist here)
    model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.data.num_segments, channels)
    params, macs = count_parameters(model), count_macs(model, cfg.data.input_size)
    name = f"{'TSM' if cfg.model.shift else 'TSN'}-{cfg.model.arch}"
    table = Table(title=f"{name}, {cfg.model.num_classes} classes")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("input per clip", f"{cfg.data.num_segments} x {channels} x {cfg.data.input_size} x {cfg.data.input_size}")
    table.add_row("parameters", f"{params / 1e6:.2f} M ({params:,})")
    table.add_row("multiply-adds per clip", f"{macs / 1e9:.2f} G")
    table.add_row("multiply-adds per frame", f"{macs / cfg.data.num_segments / 1e9:.3f} G")
    Console().print(table)
