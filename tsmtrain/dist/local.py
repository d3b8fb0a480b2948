"""Starting ranks: on this host (``tsmtrain run --np N``), or as a Slurm job (``tsmtrain render``,
``tsmtrain submit``).

**On this host.** When ``tsmtrain run`` is not already one rank of a job (no horovodrun, mpirun or multi-task
srun around it) and more than one rank is asked for, it re-runs itself under a launcher:

* ``gloo``: ``horovodrun --gloo -np N -H localhost:N python -m tsmtrain run ...``
* ``mpi``: ``mpirun -np N --oversubscribe --bind-to none python -m tsmtrain run ...``

The children see the launcher's environment and join the job (:mod:`tsmtrain.engine`).
On a cluster, srun or mpirun starts the same command and no relaunch happens.

**On a Slurm cluster.** :func:`render_sbatch` fills a Jinja2 template (``slurm/job.sbatch.j2``
in the repository, or the user's own) from the recipe's ``cluster`` section: the ``#SBATCH``
header, the set-up lines, the launch line (``srun --mpi=pmix ... tsmtrain run RECIPE`` or
``mpirun ...``) and the requeue logic. Values that reach the shell are quoted with
:func:`shlex.quote`; values in ``#SBATCH`` lines (which sbatch, not the shell, reads) are
double-quoted when they hold anything but plain characters, and line breaks are refused by the
recipe schema, so no value can add a line or a command. :func:`submit` writes the script and the
resolved recipe into the run directory and calls ``sbatch``.

Preemption and time limits (the protocol between the script and :mod:`tsmtrain.train`):
the job asks for ``--signal=USR2@SECONDS`` and ``--requeue``; the ranks checkpoint and exit with
:data:`tsmtrain.train.EXIT_PREEMPTED`; the script then runs ``scontrol requeue`` while
``SLURM_RESTART_COUNT`` is under ``cluster.max_requeues``; the requeued job's ``tsmtrain run``
resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .recipe import Recipe, derived_values, dump_recipe, with_absolute_paths

__all__ = ["local_command", "launch_local", "LaunchError", "render_sbatch", "submit", "SubmitResult",
           "TEMPLATE_DIR", "job_ranks", "prepare_job", "EXIT_PREEMPTED", "PREEMPTED_FILE", "preempted_status"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
"""The repository's ``slurm/`` folder of job templates."""

DEFAULT_TEMPLATE = "job.sbatch.j2"

EXIT_PREEMPTED = 75
"""Exit status of ``tsmtrain run`` after SIGUSR2 made it write a checkpoint and stop (75 is
``EX_TEMPFAIL``: try again later). The job script requeues itself on it."""

PREEMPTED_FILE = "preempted.json"
"""Written by rank 0 in the run directory once a SIGUSR2 stop's checkpoint is on disk, before any
rank exits. The ranks then exit :data:`EXIT_PREEMPTED`, but the launcher may report another
status: ``srun --kill-on-bad-exit`` (and mpirun) kill the ranks still exiting as soon as the
first one has exited non-zero, and srun then returns 128 + signal. The job script and
:func:`launch_local` read this file instead of trusting the status alone."""


def preempted_status(status: int, run_dir: str | Path, since: float) -> int:
    """The exit status to act on: :data:`EXIT_PREEMPTED` when the launcher returned any non-zero
    ``status`` but ``run_dir/preempted.json`` was written at or after ``since`` (seconds since
    the epoch, the launch time), else ``status`` itself."""
    marker = Path(run_dir) / PREEMPTED_FILE
    try:
        if status != 0 and marker.stat().st_mtime >= since:
            return EXIT_PREEMPTED
    except OSError:
        pass
    return status


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own horovodrun
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install Horovod / OpenMPI (make setup), or use dist.launcher")
    return found


def local_command(np: int, launcher: str, run_args: list[str]) -> list[str]:
    """The command line that starts ``np`` ranks of ``python -m tsmtrain run_args...`` here.

    Raises:
        FileNotFoundError: the launcher program is not installed.
        ValueError: unknown launcher.
    """
    child = [sys.executable, "-m", "tsmtrain", *run_args]
    if launcher == "gloo":
        return [_tool("horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}", *child]
    if launcher == "mpi":
        cmd = [_tool("mpirun"), "-np", str(np), "--oversubscribe", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        return [*cmd, "-x", "PATH", "-x", "PYTHONPATH", *child]
    raise ValueError(f"unknown launcher {launcher!r}; choose gloo or mpi")


def launch_local(np: int, launcher: str, run_args: list[str], run_dir: str | Path | None = None) -> int:
    """Run :func:`local_command` in the foreground; returns its exit status.

    SIGUSR2 sent to this process is passed on to the launcher, so that the ranks checkpoint and
    stop as under Slurm (mpirun passes it on to every rank). When ``run_dir`` is given and the
    ranks stopped that way (:data:`PREEMPTED_FILE`), the status is :data:`EXIT_PREEMPTED` even if
    the launcher killed a rank that was still exiting.
    """
    import signal
    import time

    cmd = local_command(np, launcher, run_args)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    started = time.time() - 1  # file times may be rounded to the second
    child = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: child.send_signal(signal.SIGUSR2))
    try:
        status = child.wait()
        return status if run_dir is None else preempted_status(status, run_dir, started)
    except KeyboardInterrupt:
        child.wait()
        return 130
    finally:
        signal.signal(signal.SIGUSR2, previous)


# --------------------------------------------------------------------------- Slurm


class LaunchError(Exception):
    """A job cannot be rendered or submitted for a reason the user can fix (named in the message)."""


_PLAIN = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]+$")


def _sbatch_value(value: object) -> str:
    """A value for an ``#SBATCH`` line: as it is when plain, else in double quotes (sbatch strips
    them). The shell never reads these lines, so shell quoting would be wrong here."""
    text = str(value)
    if _PLAIN.match(text):
        return text
    if '"' in text or "\\" in text:
        raise LaunchError(f"{text!r}: a double quote or backslash cannot be written into an #SBATCH line")
    return f'"{text}"'


def job_ranks(recipe: Recipe) -> int:
    """Ranks in the job: ``cluster.nodes`` x ranks per node."""
    return recipe.cluster.nodes * recipe.cluster.ranks_per_node()


def _run_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.dir) / recipe.run.name


def prepare_job(recipe: Recipe) -> Recipe:
    """The recipe the job runs: absolute paths (the job may start in another directory) and
    ``dist.np`` set to the job's ranks, so that derived values read right. (Cluster values that
    contradict each other or the recipe were already refused by the recipe's validation.)
    """
    job = with_absolute_paths(recipe)
    return job.model_copy(update={"dist": job.dist.model_copy(update={"np": job_ranks(job)})})


def render_sbatch(recipe: Recipe, template: str | os.PathLike | None = None, command: str = "render") -> str:
    """The sbatch script that runs ``recipe`` (already passed through :func:`prepare_job`).

    Args:
        recipe: the job's recipe, with absolute paths.
        template: a Jinja2 template file; default ``slurm/job.sbatch.j2``. It sees ``recipe``,
            ``cluster``, ``run_dir``, ``recipe_file``, ``log_file``, ``python``, ``ranks``,
            ``tasks_per_node``, ``signal_spec``, ``launcher``, ``max_requeues``,
            ``exit_preempted`` and the filters ``q`` (shell quoting) and ``sbatch``.

    Returns:
        The script text.

    Raises:
        LaunchError: the template cannot be read or rendered, or a value cannot be written.
    """
    import jinja2

    path = Path(template) if template is not None else TEMPLATE_DIR / DEFAULT_TEMPLATE
    try:
        source = path.read_text()
    except OSError as err:
        raise LaunchError(f"{path}: cannot read the template ({err.strerror or err})") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["sbatch"] = _sbatch_value
    c = recipe.cluster
    run_dir = _run_dir(recipe)
    ranks, per_node = job_ranks(recipe), c.ranks_per_node()
    derived = derived_values(recipe, ranks)
    gpus = f" x {c.gpus_per_node} GPUs" if c.gpus_per_node else " (CPU only)"
    context = dict(
        recipe=recipe, cluster=c, run_dir=str(run_dir), recipe_file=str(run_dir / "recipe.yaml"),
        log_file=str(run_dir).replace("%", "%%") + "/slurm-%j.out", python=c.python or sys.executable,
        ranks=ranks, tasks_per_node=per_node, launcher=c.launcher, max_requeues=c.max_requeues,
        signal_spec=("" if c.launcher == "srun" else "B:") + f"USR2@{c.signal_seconds}",
        signal_seconds=c.signal_seconds, exit_preempted=EXIT_PREEMPTED, preempted_file=PREEMPTED_FILE, job_name=c.job_name or recipe.run.name,
        command=command, template_name=path.name,
        title=f"tsmtrain job: run {recipe.run.name!r} ({'TSM' if recipe.model.shift else 'TSN'}-{recipe.model.arch})",
        summary=(f"{c.nodes} node(s){gpus}, {per_node} rank(s) per node = {ranks} rank(s); global batch "
                 f"{derived['global_batch']} clips ({recipe.train.batch_size} per rank), lr {derived['lr']:.4g}"),
    )
    try:
        return env.from_string(source).render(**context)
    except jinja2.TemplateSyntaxError as err:
        raise LaunchError(f"{path}:{err.lineno}: template syntax error: {err.message}") from None
    except jinja2.UndefinedError as err:
        raise LaunchError(f"{path}: {err.message} (available: {', '.join(sorted(context))})") from None


@dataclass
class SubmitResult:
    """What :func:`submit` wrote and what sbatch answered.

    Attributes:
        script: the sbatch script in the run directory.
        recipe_file: the resolved recipe beside it.
        log_pattern: where the job's output goes (``%j`` is the job id).
        job_id: Slurm's job id; ``None`` for a dry run.
    """

    script: Path
    recipe_file: Path
    log_pattern: str
    job_id: str | None


def submit(recipe: Recipe, template: str | os.PathLike | None = None, dry_run: bool = False,
           sbatch: str = "sbatch") -> SubmitResult:
    """Write ``RUN_DIR/job.sbatch`` and ``RUN_DIR/recipe.yaml`` and submit the job with sbatch.

    Everything is checked and rendered before anything is written, so a refused job leaves no
    files behind.

    Raises:
        LaunchError: invalid cluster values, a bad template, sbatch missing or refusing the job
            (its message is included).
    """
    job = prepare_job(recipe)
    text = render_sbatch(job, template, command="submit")
    run_dir = _run_dir(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file, script = run_dir / "recipe.yaml", run_dir / "job.sbatch"
    recipe_file.write_text(dump_recipe(job))
    script.write_text(text)
    script.chmod(0o755)
    log_pattern = str(run_dir / "slurm-%j.out")
    if dry_run:
        return SubmitResult(script, recipe_file, log_pattern, None)
    program = shutil.which(sbatch)
    if program is None:
        raise LaunchError(f"{sbatch} not found: submit from a Slurm login node (or pass --dry-run and "
                          f"submit {script} yourself)")
    done = subprocess.run([program, "--parsable", str(script)], cwd=run_dir, capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    return SubmitResult(script, recipe_file, log_pattern, job_id)
