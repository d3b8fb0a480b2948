"""The ``tsmtrain`` command. It parses arguments and delegates; the work is in the library.

One module per command group; each command parses its options, calls one library function and
prints what it returns:

* :mod:`.training`: ``run`` (:func:`tsmtrain.train.train`), ``validate`` (the resolved recipe),
  ``model-info`` (:mod:`tsmtrain.models` parameter and multiply-add counts)
* :mod:`.testing`: ``test`` (:func:`tsmtrain.train.testing.run_test`), ``predict``
  (:func:`tsmtrain.train.testing.predict_videos`), ``fuse`` (:func:`tsmtrain.train.fusion.fuse_runs`:
  late fusion of tested runs)
* :mod:`.features`: ``extract`` (:func:`tsmtrain.train.extract.extract_features`: features of
  every video for training the head alone, ``data.features``)
* :mod:`.cluster`: ``render`` (:func:`tsmtrain.dist.slurm.render_sbatch`), ``submit``
  (:func:`tsmtrain.dist.slurm.submit`), ``env`` (:func:`tsmtrain.dist.base.describe_rank` on
  every rank), and the cluster flags of ``render``, ``submit`` and ``sweep``
* :mod:`.doctor`: ``doctor`` (:func:`tsmtrain.train.doctor.run_doctor`: a node's readiness
  table and figures)
* :mod:`.data`: ``prepare`` (:mod:`tsmtrain.data.prepare`: re-encode the videos for training)
* :mod:`.benchmarks`: ``bench data`` (:mod:`tsmtrain.data.bench`), ``bench step``
  (:func:`tsmtrain.train.bench.bench_step`)
* :mod:`.scaling`: ``sweep`` (:mod:`tsmtrain.scaling.sweep`), ``report``
  (:mod:`tsmtrain.scaling.report`, :mod:`tsmtrain.scaling.model`)

This module holds the :data:`app` and what the commands share: :func:`fail`, :func:`load` (a
recipe with its ``--set`` overrides; :func:`with_np` turns ``--np`` into ``dist.np``),
:func:`relaunch` (``run`` and ``test`` under a launcher on this host) and :func:`user_errors`.

User mistakes (bad recipe, bad list file, missing launcher, impossible job) print one line per
problem and exit with status 2, never a traceback. A run stopped by SIGUSR2 or SIGTERM after its
checkpoint exits with :data:`tsmtrain.dist.stop.EXIT_PREEMPTED` (75); Ctrl-C exits 130. Nothing
in the library imports this package.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn

import typer

from ..recipe import RecipeError, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe

__all__ = ["app", "bench_app", "fail", "load", "with_np", "relaunch", "user_errors", "SET_HELP"]

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
    except RecipeError as err:
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
    """Around the work of ``run`` and ``test``: a training, list-file, manifest or data error is
    one ``error:`` line per line of its message (exit 2), Ctrl-C exits 130, another rank's failure
    is one line (exit 1); anything else is an internal error and propagates (traceback)."""
    from ..data import DataError, ListFileError
    from ..data.prepare import ManifestError
    from ..train import TrainingError

    try:
        yield
    except (TrainingError, ListFileError, ManifestError, DataError) as err:
        fail(str(err).splitlines())
    except KeyboardInterrupt:
        raise typer.Exit(130)
    except Exception as err:
        _fail_if_peer_failed(err)
        raise


# the command groups use the helpers above, so they are imported once those exist
from . import benchmarks, cluster, data, doctor, features, scaling, testing, training  # noqa: E402

# registered in the order ``tsmtrain --help`` lists them
for _name, _command in (("run", training.run), ("test", testing.test), ("predict", testing.predict),
                        ("fuse", testing.fuse), ("extract", features.extract),
                        ("validate", training.validate), ("model-info", training.model_info),
                        ("prepare", data.prepare), ("render", cluster.render), ("submit", cluster.submit),
                        ("env", cluster.env), ("doctor", doctor.doctor),
                        ("sweep", scaling.sweep), ("report", scaling.report)):
    app.command(_name)(_command)
del _name, _command

bench_app = benchmarks.bench_app
app.add_typer(bench_app, name="bench")
