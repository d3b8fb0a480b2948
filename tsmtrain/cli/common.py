"""What the ``tsmtrain`` commands share (:mod:`tsmtrain.cli`): the :data:`app`, :func:`fail`,
:func:`load` (a recipe with its ``--set`` overrides; :func:`with_np` turns ``--np`` into
``dist.np``), :func:`relaunch` (``run`` and ``test`` under a launcher on this host),
:func:`set_args` and :func:`user_errors`. The command modules import it, and the package
imports them, so no module imports the package that imports it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn

import typer

from ..recipe import load_recipe
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe

__all__ = ["app", "fail", "load", "with_np", "relaunch", "set_args", "user_errors", "SET_HELP"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Large-batch training of Temporal Shift Module video networks.")

SET_HELP = "override a recipe field, e.g. --set optim.base_lr=0.02 (repeatable)"


def fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    """Print ``error: LINE`` on stderr for each line and exit with ``code`` (2: a user mistake)."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def _fail_if_peer_failed(err: Exception) -> None:
    """Exit 1 with one line when ``err`` only says that another rank failed (that rank printed
    the cause); otherwise return, and the caller re-raises (an internal error: traceback, 1)."""
    from ..dist import peer_failure

    line = peer_failure(err)
    if line:
        fail(line, code=1)


def with_np(sets: list[str], np: int | None) -> list[str]:
    """The ``--set`` overrides with ``--np N`` appended as ``dist.np=N`` (when given)."""
    return list(sets) + ([f"dist.np={np}"] if np is not None else [])


def load(recipe: str, sets: list[str], check_files: bool = True, flags: dict | None = None) -> Recipe:
    """:func:`tsmtrain.recipe.load_recipe` with the ``--set`` overrides (and cluster ``flags``);
    a recipe with problems prints one ``error:`` line each and exits 2."""
    try:
        return load_recipe(recipe, sets, check_files=check_files, flags=flags)
    except UserError as err:
        fail([str(p) for p in err.problems])


def relaunch(cfg: Recipe, args: list[str], run_dir: str | Path | None = None) -> None:
    """Run ``tsmtrain ARGS`` as ``dist.np`` ranks under the recipe's launcher on this host
    (:func:`tsmtrain.dist.local.launch_local`) and exit with its status, when ``dist.np`` > 1 and
    no launcher started this process; otherwise return, and this process does the work.

    ``run_dir``: where the ranks write ``preempted.json`` (the status is then 75 when they were
    stopped after a checkpoint). A launcher that is not installed is one ``error:`` line, exit 2.
    """
    from ..dist import launched_by_launcher

    if cfg.dist.np <= 1 or launched_by_launcher():
        return
    from ..dist.local import default_launcher, launch_local

    try:
        status = launch_local(cfg.dist.np, default_launcher(cfg.dist.engine, cfg.dist.launcher), args,
                              run_dir=run_dir)
    except FileNotFoundError as err:
        fail(str(err))
    raise typer.Exit(status)


def set_args(sets: list[str]) -> list[str]:
    """``--set`` overrides as arguments again: ``["--set", "a=1", "--set", "b=2"]``."""
    return [a for s in sets for a in ("--set", s)]


@contextmanager
def user_errors() -> Iterator[None]:
    """Around the work of ``run`` and ``test``: a user mistake (any
    :class:`~tsmtrain.errors.UserError`) is one ``error:`` line per line of its message (exit 2),
    Ctrl-C exits 130, another rank's failure is one line (exit 1); anything else is an internal
    error and propagates (traceback)."""
    try:
        yield
    except UserError as err:
        fail(str(err).splitlines())
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as err:
        _fail_if_peer_failed(err)
        raise
