"""Slurm jobs: the sbatch script (``tsmtrain render``, ``tsmtrain submit``), and where DDP ranks
meet under srun.

:func:`render_sbatch` fills a Jinja2 template (``slurm/job.sbatch.j2`` in the repository, or the
user's own) from the recipe's ``cluster`` section: the ``#SBATCH`` header, the set-up lines, the
launch line and the requeue logic. The launch line depends on the engine:

* Horovod: ``srun --mpi=pmix --kill-on-bad-exit=1 python -m tsmtrain run RECIPE`` (the ranks find
  each other through PMIx), or ``mpirun ...`` inside the allocation;
* DDP: ``srun --kill-on-bad-exit=1 python -m tsmtrain run RECIPE`` (no MPI: each rank reads
  ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``), or ``mpirun -x MASTER_ADDR -x
  MASTER_PORT ...``; the script exports ``MASTER_ADDR``, the first host of the allocation, and
  ``MASTER_PORT``, :data:`MASTER_PORT_BASE` + job id mod :data:`MASTER_PORT_SPAN`
  (``dist.master_addr`` / ``dist.master_port`` override both); rank 0 listens there.

Values that reach the shell are quoted with :func:`shlex.quote` (the template's ``q`` filter);
values in ``#SBATCH`` lines (which sbatch, not the shell, reads) are double-quoted when they hold
anything but plain characters (the ``sbatch`` filter). Control characters (line breaks, NUL, ...)
are refused by the recipe schema (:func:`tsmtrain.recipe.schema.control_character`) and again by
the renderer for every value it writes, comments included, so no value can add a line or a
command. :func:`submit` writes the script and the resolved recipe into the run directory and
calls ``sbatch``.

Stopping (the protocol between the script and :mod:`tsmtrain.train`, :mod:`tsmtrain.dist.stop`):
the job asks for ``--signal=USR2@SECONDS`` and ``--requeue``; on SIGUSR2, or SIGTERM (``scancel``, preemption),
the ranks checkpoint and exit with :data:`~tsmtrain.dist.stop.EXIT_PREEMPTED`; after a SIGUSR2
(or a SIGTERM sent to the ranks alone, ``scancel --signal=TERM``) the script runs
``scontrol requeue`` while ``SLURM_RESTART_COUNT`` is under ``cluster.max_requeues``; the requeued
job's ``tsmtrain run`` resumes from the run directory's latest checkpoint. A SIGTERM that reaches
the script itself (``scancel JOB``, preemption) ends the job with the checkpoint written; Slurm
requeues a preempted job by itself (``PreemptMode=REQUEUE``), a cancelled one stays cancelled.

This module imports neither torch nor Horovod.
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

from ..io import write_text
from ..optim import linear_scaling
from pydantic import ValidationError

from ..recipe import Recipe, dump_recipe, with_absolute_paths
from ..recipe.problems import _shown
from ..recipe.schema import control_character
from .stop import EXIT_PREEMPTED, PREEMPTED_FILE

__all__ = ["render_sbatch", "submit", "SubmitResult", "LaunchError", "TEMPLATE_DIR", "job_ranks", "prepare_job",
           "expand_nodelist", "tasks_on_node", "default_master_port", "MASTER_PORT_BASE", "MASTER_PORT_SPAN"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent.parent / "slurm"
"""The repository's ``slurm/`` folder of job templates."""

DEFAULT_TEMPLATE = "job.sbatch.j2"

MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 12000
"""DDP's default rendezvous port under Slurm is ``MASTER_PORT_BASE + job id % MASTER_PORT_SPAN``:
20000..31999, below Linux's ephemeral ports (32768 and up), and different for jobs that share a
node unless their ids are 12000 apart."""


def default_master_port(job_id: int | str) -> int:
    """The rendezvous port of Slurm job ``job_id`` (:data:`MASTER_PORT_BASE` + id mod
    :data:`MASTER_PORT_SPAN`).

    Raises:
        ValueError: ``job_id`` is not a whole number.
    """
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


_NODELIST_ITEM = re.compile(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order, as ``scontrol show hostnames`` prints them:
    ``"gpu[01-03,7],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu7", "login1"]`` (zero padding
    kept). One bracket group per name.

    Raises:
        ValueError: a malformed list (unbalanced brackets, a bad range).
    """
    hosts: list[str] = []
    text = nodelist.strip()
    pos = 0
    while pos < len(text):
        match = _NODELIST_ITEM.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f"not a Slurm node list: {nodelist!r}")
        prefix, ranges, suffix = match.groups()
        if ranges is None:
            if any(b in prefix + suffix for b in "[]"):
                raise ValueError(f"not a Slurm node list: {nodelist!r}")
            hosts.append(prefix + suffix)
        else:
            for part in ranges.split(","):
                lo, sep, hi = part.partition("-")
                if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
                    raise ValueError(f"not a Slurm node list: {nodelist!r} (range {part!r})")
                for i in range(int(lo), int(hi if sep else lo) + 1):
                    hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"not a Slurm node list: {nodelist!r}")
            pos += 1
    return hosts


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """Tasks on node ``node_index`` from Slurm's compressed ``SLURM_TASKS_PER_NODE``
    (``"2(x3),1"`` -> 2, 2, 2, 1).

    Raises:
        ValueError: a malformed value, or fewer nodes than ``node_index + 1``.
    """
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"not a Slurm tasks-per-node value: {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_index < len(counts):
        raise ValueError(f"node {node_index} is not in {tasks_per_node!r}")
    return counts[node_index]


class LaunchError(Exception):
    """A job cannot be rendered or submitted for a reason the user can fix (named in the message)."""


_PLAIN = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]+$")


def _one_line(value: object) -> object:
    """``value`` unchanged when its text holds no control character (the recipe's rule, kept for
    every value a job script gets, whatever filter it went through).

    Raises:
        LaunchError: a line break, NUL or other control character, which would end the line.
    """
    why = control_character(str(value))
    if why:
        raise LaunchError(f"{_shown(str(value))}: {why}")
    return value


def _shell_value(value: object) -> str:
    """A value for a shell line: one word, quoted with :func:`shlex.quote`.

    Raises:
        LaunchError: a control character (:func:`_one_line`).
    """
    return shlex.quote(str(_one_line(value)))


def _sbatch_value(value: object) -> str:
    """A value for an ``#SBATCH`` line: as it is when plain, else in double quotes (sbatch strips
    them). The shell never reads these lines, so shell quoting would be wrong here.

    Raises:
        LaunchError: a control character (:func:`_one_line`), a double quote or a backslash.
    """
    text = str(_one_line(value))
    if _PLAIN.match(text):
        return text
    if '"' in text or "\\" in text:
        raise LaunchError(f"{text!r}: a double quote or backslash cannot be written into an #SBATCH line")
    return f'"{text}"'


def job_ranks(recipe: Recipe) -> int:
    """Ranks in the job: ``cluster.nodes`` x ranks per node."""
    return recipe.cluster.nodes * recipe.cluster.ranks_per_node()


def prepare_job(recipe: Recipe) -> Recipe:
    """The recipe the job runs: absolute paths (the job may start in another directory) and
    ``dist.np`` set to the job's ranks, so that derived values read right. (Cluster values that
    contradict each other or the recipe were already refused by the recipe's validation.)

    Raises:
        LaunchError: a path made absolute is no longer a valid recipe value (the current
            directory holds a control character).
    """
    try:
        job = with_absolute_paths(recipe)
    except ValidationError as err:  # a path made absolute against a current directory with a line break
        e = err.errors()[0]
        raise LaunchError(f"{'.'.join(map(str, e['loc']))} = {_shown(e['input'])} (made absolute): "
                          f"{e['msg'].removeprefix('Value error, ')}") from None
    return job.model_copy(update={"dist": job.dist.model_copy(update={"np": job_ranks(job)})})


def render_sbatch(recipe: Recipe, template: str | os.PathLike | None = None, command: str = "render") -> str:
    """The sbatch script that runs ``recipe`` (already passed through :func:`prepare_job`).

    Args:
        recipe: the job's recipe, with absolute paths.
        template: a Jinja2 template file; default ``slurm/job.sbatch.j2``. It sees ``recipe``,
            ``cluster``, ``run_dir``, ``recipe_file``, ``log_file``, ``python``, ``ranks``,
            ``tasks_per_node``, ``signal_spec``, ``launcher``, ``max_requeues``,
            ``exit_preempted``, ``engine`` (``dist.engine``), ``master_addr`` and ``master_port``
            (``dist.master_addr`` / ``dist.master_port``, none when not set),
            ``master_port_base`` and ``master_port_span``, and the filters ``q`` (shell quoting)
            and ``sbatch``. Every value it writes must be one line (no control character).

    Returns:
        The script text.

    Raises:
        LaunchError: the template cannot be read or rendered, or a value cannot be written (a
            control character anywhere; a double quote or backslash in an ``#SBATCH`` value).
    """
    import jinja2

    path = Path(template) if template is not None else TEMPLATE_DIR / DEFAULT_TEMPLATE
    try:
        source = path.read_text()
    except OSError as err:
        raise LaunchError(f"{path}: cannot read the template ({err.strerror or err})") from None
    # finalize: every {{ value }}, in a comment, a shell line or an #SBATCH line, stays one line
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False, finalize=_one_line)
    env.filters["q"] = _shell_value
    env.filters["sbatch"] = _sbatch_value
    c = recipe.cluster
    run_dir = recipe.run_dir
    ranks, per_node = job_ranks(recipe), c.ranks_per_node()
    scaling = linear_scaling(recipe, ranks)
    gpus = f" x {c.gpus_per_node} GPUs" if c.gpus_per_node else " (CPU only)"
    dist = recipe.dist
    context = dict(
        recipe=recipe, cluster=c, run_dir=str(run_dir), recipe_file=str(run_dir / "recipe.yaml"),
        log_file=str(run_dir).replace("%", "%%") + "/slurm-%j.out", python=c.python or sys.executable,
        ranks=ranks, tasks_per_node=per_node, launcher=c.launcher, max_requeues=c.max_requeues,
        signal_spec=("" if c.launcher == "srun" else "B:") + f"USR2@{c.signal_seconds}",
        signal_seconds=c.signal_seconds, exit_preempted=EXIT_PREEMPTED, preempted_file=PREEMPTED_FILE, job_name=c.job_name or recipe.run.name,
        command=command, template_name=path.name, engine=dist.engine,
        master_addr=dist.master_addr, master_port=dist.master_port, master_port_base=MASTER_PORT_BASE,
        master_port_span=MASTER_PORT_SPAN,
        title=f"tsmtrain job: run {recipe.run.name!r} ({'TSM' if recipe.model.shift else 'TSN'}-{recipe.model.arch})",
        summary=(f"{c.nodes} node(s){gpus}, {per_node} rank(s) per node = {ranks} rank(s); global batch "
                 f"{scaling.global_batch} clips ({recipe.train.batch_size} per rank), lr {scaling.lr:.4g}; "
                 f"engine {dist.engine}"),
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
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file, script = run_dir / "recipe.yaml", run_dir / "job.sbatch"
    write_text(recipe_file, dump_recipe(job))
    write_text(script, text)
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
