"""The ``tsmtrain`` command. It parses arguments and delegates; the work is in the modules.

* ``tsmtrain run RECIPE [--set k=v] [--np N] [--resume]`` -> :func:`tsmtrain.train.train`
  (through :mod:`tsmtrain.launch` when N ranks must be started on this host)
* ``tsmtrain validate RECIPE`` -> :func:`tsmtrain.recipe.load_recipe`, prints the resolved recipe
* ``tsmtrain model-info RECIPE`` -> :mod:`tsmtrain.model` parameter and multiply-add counts

User mistakes (bad recipe, bad list file, missing launcher) print one line per problem and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
import yaml

from .recipe import Recipe, RecipeError, derived_values, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Large-batch training of Temporal Shift Module video networks.")

SET_HELP = "override a recipe field, e.g. --set optim.base_lr=0.02 (repeatable)"


def _fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def _load(recipe: str, sets: list[str], check_files: bool = True) -> Recipe:
    try:
        return load_recipe(recipe, sets, check_files=check_files)
    except RecipeError as err:
        _fail([str(p) for p in err.problems])


@app.command()
def run(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="ranks to start on this host (sets dist.np)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint of the run directory"),
) -> None:
    """Train a recipe: on this host, or as one rank of an srun/mpirun job."""
    from .data import ListFileError
    from .engine import launched_by_launcher
    from .train import TrainingError, train

    sets = list(sets) + ([f"dist.np={np}"] if np is not None else [])
    cfg = _load(recipe, sets)
    if cfg.dist.np > 1 and not launched_by_launcher():
        from .launch import launch_local

        args = ["run", recipe, *(a for s in sets for a in ("--set", s))] + (["--resume"] if resume else [])
        try:
            raise typer.Exit(launch_local(cfg.dist.np, cfg.dist.launcher, args))
        except FileNotFoundError as err:
            _fail(str(err))
    try:
        result = train(cfg, resume=resume)
    except (TrainingError, ListFileError) as err:
        _fail(str(err).splitlines())
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if result.eval and result.rank == 0:
        print(f"final validation top-1: {result.eval['top1']:.2f}% (top-5 {result.eval['top5']:.2f}%, "
              f"{result.eval['clips']} clips, step {result.step})")


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    np: Optional[int] = typer.Option(None, "--np", min=1, help="world size for the derived values"),
) -> None:
    """Check a recipe and print it resolved, with derived values (global batch, scaled lr)."""
    cfg = _load(recipe, list(sets) + ([f"dist.np={np}"] if np is not None else []))
    doc = cfg.model_dump(mode="json")
    doc["derived"] = derived_values(cfg)
    print(yaml.safe_dump(doc, sort_keys=False), end="")


@app.command("model-info")
def model_info(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the network's parameters and multiply-accumulates per clip."""
    from rich.console import Console
    from rich.table import Table

    from .model import count_macs, count_parameters, create_model

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
