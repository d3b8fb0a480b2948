"""``tsmtrain render``, ``tsmtrain submit`` and ``tsmtrain env``: Slurm jobs and what ranks see.

* ``render RECIPE [cluster flags]`` -> :func:`tsmtrain.dist.slurm.render_sbatch`
* ``submit RECIPE [cluster flags] [--dry-run]`` -> :func:`tsmtrain.dist.slurm.submit`
* ``env [RECIPE]`` -> :func:`tsmtrain.dist.base.describe_rank` on every rank (the engine from
  :func:`tsmtrain.train.setup.choose_engine`), and what Horovod and torch.distributed were
  built with

:func:`with_cluster_flags` gives ``render``, ``submit`` and ``sweep`` one option per key of the
recipe's ``cluster`` section (:data:`CLUSTER_FLAGS`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import typer

from .common import SET_HELP, fail, load
from ..errors import UserError

__all__ = ["render", "submit", "env", "with_cluster_flags", "CLUSTER_FLAGS", "TEMPLATE_HELP"]

CLUSTER_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "partition", "account",
                 "qos", "constraint", "reservation", "job_name", "launcher", "max_requeues", "signal_seconds", "python")
"""The cluster section's keys that are also flags of render, submit and sweep (--nodes, --time, ...)."""

TEMPLATE_HELP = "your own Jinja2 job template (default tsmtrain/dist/templates/job.sbatch.j2)"


def with_cluster_flags(command):
    """Give ``command`` one option per :data:`CLUSTER_FLAGS` key, typed and described by the
    recipe schema (:class:`tsmtrain.recipe.ClusterConfig`); the values it gets arrive as the
    ``cluster`` dict, ``{"cluster.nodes": ("--nodes", 4), ...}``, for only the flags given."""
    from ..recipe import ClusterConfig

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
    """The rendered script (``dry_run`` None) or :func:`tsmtrain.dist.slurm.submit`'s result."""
    from ..dist.slurm import prepare_job, render_sbatch, submit

    # rendering may happen away from the cluster's file system; submitting happens beside it
    cfg = load(recipe, sets, check_files=dry_run is not None, flags=flags)
    try:
        if dry_run is None:
            return render_sbatch(prepare_job(cfg), template)
        return submit(cfg, template, dry_run=dry_run)
    except UserError as err:
        fail(str(err))


@with_cluster_flags
def render(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    cluster: dict = None,
) -> None:
    """Print the sbatch script for a recipe (cluster flags override the recipe's cluster section)."""
    print(_job(recipe, sets, template, cluster, None), end="")


@with_cluster_flags
def submit(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="write the script and recipe into the run directory, do not sbatch"),
    cluster: dict = None,
) -> None:
    """Write the job script and resolved recipe into the run directory and submit it with sbatch."""
    result = _job(recipe, sets, template, cluster, dry_run)
    print(f"script: {result.script}\nrecipe: {result.recipe_file}\nlog:    {result.log_pattern}")
    if result.job_id is None:
        print(f"dry run: not submitted; submit with: sbatch {result.script}")
    else:
        print(f"submitted job {result.job_id}; log {result.log_pattern.replace('%j', result.job_id)}")


def env(
    recipe: Optional[str] = typer.Argument(None, help="recipe whose dist.engine to use (default horovod)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print what each rank sees: rank, local rank, world size, host, engine, devices; what
    Horovod and torch.distributed were built with (NCCL, MPI, Gloo, CUDA); and which video
    decoders are installed and which decode on the GPU (NVDEC).

    Run it the way the job runs ``tsmtrain run``, e.g. ``srun --mpi=pmix tsmtrain env``, or
    ``srun tsmtrain env recipe.yaml`` for a DDP recipe.
    """
    from rich.console import Console
    from rich.table import Table

    from ..dist import launched_by_launcher
    from ..dist.base import describe_builds, describe_rank

    cfg = load(recipe, sets, check_files=False) if recipe else None
    launched = launched_by_launcher()
    engine = _engine(cfg)
    rows = engine.allgather_object(describe_rank(engine), name="describe_rank")
    if engine.rank != 0:
        return
    table = Table(title=f"{engine.size} rank(s), engine {engine.name}"
                  + ("" if launched else " (not started by srun, mpirun or horovodrun)"))
    for col in ("rank", "local rank", "host", "pid", "devices", "cpus", "launcher variables"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["rank"]), f"{r['local_rank']}/{r['local_size']}", r["host"], str(r["pid"]),
                      ", ".join(r["devices"]), str(r["cpus"]),
                      " ".join(f"{k}={v}" for k, v in r["launcher_env"].items()))
    Console(width=200).print(table)
    from ..data.decoding import describe_decoders

    for line in describe_builds() + describe_decoders():
        print(line)


def _engine(cfg):
    """The engine ``env`` describes: the recipe's (:func:`tsmtrain.train.setup.choose_engine`,
    whose errors are one ``error:`` line, exit 2), or without a recipe Horovod's, on the CPU."""
    from ..recipe import DistConfig, Recipe, TrainConfig
    from ..train.setup import choose_engine

    # no recipe: the default dist section (Horovod) and no GPU; nothing else of it is read
    cfg = cfg or Recipe.model_construct(dist=DistConfig(), train=TrainConfig(device="cpu"))
    try:
        return choose_engine(cfg)
    except UserError as err:
        fail(str(err))
