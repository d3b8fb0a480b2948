"""``tsmtrain doctor [RECIPE] [--json FILE]``: is this node ready, and how fast will it train?

-> :func:`tsmtrain.bench.doctor.run_doctor`; prints its rows as a table and
:func:`~tsmtrain.bench.doctor.verdict_line`, writes :meth:`~tsmtrain.bench.doctor.DoctorResult.record`
with ``--json``, and exits with :attr:`~tsmtrain.bench.doctor.DoctorResult.exit_status` (0: what
the recipe asks for works here; 1: a required check failed; 2: a bad recipe).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .common import SET_HELP, load

__all__ = ["doctor"]

_STYLE = {"ok": "green", "skipped": "yellow", "fail": "bold red"}


def doctor(
    recipe: Optional[str] = typer.Argument(None, help="recipe to check the node for (none: the environment only)"),
    json_file: Optional[str] = typer.Option(None, "--json", help="also write every row and figure to this JSON file"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    clips: int = typer.Option(32, "--clips", min=2, help="clips per data measurement (CPU loader, GPU decoders)"),
    steps: int = typer.Option(5, "--steps", min=1, help="measured rounds per training-step variant"),
) -> None:
    """Check this node: Python, torch, CUDA, driver, GPUs, NCCL, Horovod, MPI, Gloo, GPU decoding;
    with a recipe also its loader's clips/s per core, the step's clips/s per GPU, the NCCL
    allreduce of its gradients, and the loader cores each GPU needs. Exit 0 when what the recipe
    needs works here, 1 when a required check fails."""
    from rich.console import Console
    from rich.table import Table

    from ..bench.doctor import run_doctor, verdict_line

    cfg = load(recipe, sets) if recipe else None
    progress = Console(stderr=True, highlight=False)
    result = run_doctor(cfg, recipe, clips=clips, steps=steps, say=lambda line: progress.print(f"doctor: {line}"))
    table = Table(title=f"tsmtrain doctor on {result.host}" + (f": {recipe}" if recipe else "")
                  + f" ({result.seconds:.0f} s)")
    for column in ("check", "status", "value", "detail"):
        table.add_column(column)
    for row in result.rows:
        status = row.status + (" (required)" if row.required else "")
        table.add_row(row.check, f"[{_STYLE[row.status]}]{status}[/]", row.value, row.detail)
    out = Console(width=200, highlight=False)
    out.print(table)
    out.print(verdict_line(result))
    for row in result.failed:
        print(f"failed: {row.check}: {row.detail or row.value}", file=sys.stderr)
    if json_file:
        result.write(json_file)
        out.print(f"wrote {json_file}")
    raise typer.Exit(result.exit_status)
