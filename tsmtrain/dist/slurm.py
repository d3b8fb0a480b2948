"""Slurm jobs: the sbatch script (``tsmtrain render``, ``tsmtrain submit``), and where DDP ranks
meet under srun.

:func:`render_sbatch` fills a Jinja2 template (``tsmtrain/dist/templates/job.sbatch.j2``, package
data, or the user's own) from the recipe's ``cluster`` section: the ``#SBATCH`` header, the set-up lines, the
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
calls ``sbatch`` (:func:`sbatch_script`, the one place that does, through :func:`tsmtrain.child.run`).
With an :class:`ArrayJob` the same template renders a job array (``tsmtrain sweep --array``).

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
import sys
from dataclasses import dataclass
from pathlib import Path

from ..child import ChildError, run
from ..io import write_text
from ..optim import linear_scaling
from pydantic import ValidationError

from ..recipe import Recipe, dump_recipe, with_absolute_paths
from ..recipe.problems import _shown
from ..recipe.schema import control_character
from .stop import EXIT_PREEMPTED, PREEMPTED_FILE
from ..errors import UserError

__all__ = ["render_sbatch", "submit", "sbatch_script", "ArrayJob", "SubmitResult", "LaunchError", "TEMPLATE_DIR", "job_ranks", "prepare_job",
           "expand_nodelist", "tasks_on_node", "default_master_port", "MASTER_PORT_BASE", "MASTER_PORT_SPAN"]

TEMPLATE_DIR = Path(__file__).with_name("templates")
"""The package's folder of job templates (``tsmtrain/dist/templates``, package data: installed with
the package, so ``render`` and ``submit`` work from a wheel as from a checkout)."""

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


class LaunchError(UserError):
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


@dataclass
class ArrayJob:
    """A job array whose task ``i`` runs the job script ``run_dirs[i]/job.sbatch`` (written by
    :func:`submit` with ``dry_run``; its ``#SBATCH`` lines are comments to bash) with ``ranks[i]``
    ranks, ``ranks_per_node[i]`` per node, inside the allocation of the widest job, the one
    :func:`render_sbatch` is given (``tsmtrain sweep --submit --array``: one array per node count).

    Attributes:
        job_name: the array's ``--job-name``; ``log_file``: its ``--output`` (sbatch's patterns:
            ``%A`` the array's id, ``%a`` the task's; a literal ``%`` written ``%%``).
        run_dirs, ranks, ranks_per_node: one entry per task.
    """

    job_name: str
    log_file: str
    run_dirs: list[str]
    ranks: list[int]
    ranks_per_node: list[int]

    @property
    def spec(self) -> str:
        """The ``--array`` value: ``0-N`` for N + 1 tasks."""
        return f"0-{len(self.run_dirs) - 1}"


def render_sbatch(recipe: Recipe, template: str | os.PathLike | None = None, command: str = "render",
                  array: ArrayJob | None = None) -> str:
    """The sbatch script that runs ``recipe`` (already passed through :func:`prepare_job`).

    Args:
        recipe: the job's recipe, with absolute paths.
        template: a Jinja2 template file; default :data:`TEMPLATE_DIR` ``/job.sbatch.j2``. It sees ``recipe``,
            ``cluster``, ``run_dir``, ``recipe_file``, ``log_file``, ``python``, ``ranks``,
            ``tasks_per_node``, ``signal_spec``, ``launcher``, ``max_requeues``,
            ``exit_preempted``, ``engine`` (``dist.engine``), ``master_addr`` and ``master_port``
            (``dist.master_addr`` / ``dist.master_port``, none when not set),
            ``master_port_base`` and ``master_port_span``, ``array`` (below), and the filters ``q``
            (shell quoting) and ``sbatch``. Every value it writes must be one line (no control character).
        command: the tsmtrain command named in the script's comments.
        array: render a job array instead (:class:`ArrayJob`; the template's ``array``, ``None``
            otherwise): the header asks for ``recipe``'s allocation, with the array's
            ``--array``, ``--job-name`` and ``--output``; the body runs task i's job script.

    Returns:
        The script text.

    Raises:
        LaunchError: the template cannot be read or rendered, or a value cannot be written (a
            control character anywhere; a double quote or backslash in an ``#SBATCH`` value), or
            with ``array``, the template writes no ``#SBATCH --array`` line (it ignores ``array``).
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
        command=command, template_name=path.name, engine=dist.engine, array=array,
        master_addr=dist.master_addr, master_port=dist.master_port, master_port_base=MASTER_PORT_BASE,
        master_port_span=MASTER_PORT_SPAN,
        title=f"tsmtrain job: run {recipe.run.name!r} ({'TSM' if recipe.model.shift else 'TSN'}-{recipe.model.arch})",
        summary=(f"{c.nodes} node(s){gpus}, {per_node} rank(s) per node = {ranks} rank(s); global batch "
                 f"{scaling.global_batch} clips ({recipe.train.batch_size} per rank), lr {scaling.lr:.4g}; "
                 f"engine {dist.engine}"),
    )
    try:
        text = env.from_string(source).render(**context)
    except jinja2.TemplateSyntaxError as err:
        raise LaunchError(f"{path}:{err.lineno}: template syntax error: {err.message}") from None
    except jinja2.UndefinedError as err:
        raise LaunchError(f"{path}: {err.message} (available: {', '.join(sorted(context))})") from None
    if array is not None and not any(line.startswith("#SBATCH --array=") for line in text.splitlines()):
        raise LaunchError(f"{path}: writes no '#SBATCH --array=' line for a job array: the template must "
                          f"render its `array` parameter (see {DEFAULT_TEMPLATE})")
    return text


SBATCH_TIMEOUT_S = 120
"""Seconds sbatch may take to answer (a busy controller) before it is killed and the submission
counts as refused."""


def sbatch_script(script: str | os.PathLike, cwd: str | os.PathLike | None = None, sbatch: str = "sbatch") -> str:
    """Submit ``script`` with ``sbatch --parsable`` (run from ``cwd``; ``None``: the current
    folder): the one place tsmtrain calls sbatch, through :func:`tsmtrain.child.run`.

    Returns:
        The job id (an array's id for a job array).

    Raises:
        LaunchError: ``sbatch`` is not found (a login node has it), refuses the script (its last
            error line), or does not answer within :data:`SBATCH_TIMEOUT_S`.
    """
    program = shutil.which(sbatch)
    if program is None:
        raise LaunchError(f"{sbatch} not found: submit from a Slurm login node (or submit {script} yourself "
                          f"with sbatch)")
    try:
        done = run([program, "--parsable", str(script)], cwd=cwd, timeout=SBATCH_TIMEOUT_S)
    except ChildError as err:
        if err.returncode is None:  # killed at the timeout, or not started
            raise LaunchError(f"{script} not submitted: {err}") from None
        raise LaunchError(f"sbatch refused {script}: {err.last_line}") from None
    return done.stdout.strip().split(";")[0]


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
    return SubmitResult(script, recipe_file, log_pattern, sbatch_script(script, cwd=run_dir, sbatch=sbatch))
