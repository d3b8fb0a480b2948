"""Scaling sweeps: one recipe run as short benchmarks at several worker counts.

``tsmtrain sweep recipe.yaml --workers 1,2,4`` runs, for each worker count N, the recipe for a
fixed number of optimizer steps after a warm-up, without evaluation, and keeps one record per
point in a sweep directory::

    SWEEP_DIR/sweep.json                  what was swept (recipe, mode, steps, batch)
    SWEEP_DIR/points/workers-0004.json    one record per point (:mod:`tsmtrain.scaling.records`)
    SWEEP_DIR/runs/workers-0004/          the point's run directory (recipe.yaml, metrics.jsonl,
                                          train.log, point.log or slurm-JOBID.out)

*Weak scaling* (default) keeps the clips per rank of the recipe, so the global batch grows with
N and the learning rate follows the linear scaling rule (Goyal et al. 2017); *strong scaling*
(``strong=True``) keeps the global batch and divides it among the ranks. A point runs here
(``launch="local"``: ``tsmtrain run --np N``) or as a Slurm job (``launch="submit"``: the job
script of :mod:`tsmtrain.dist.slurm`, one job per point, or one job array per node count). Running
the sweep again with the same directory skips the points already measured, retries failed
ones, collects finished jobs, and adds new worker counts: a sweep can be resumed and extended.
A point that fails is recorded with its reason, never dropped. The table, plots and the
scaling model are in :mod:`tsmtrain.scaling.report` and :mod:`tsmtrain.scaling.model`.

Importing this module loads neither torch nor the training code: what only running a point needs
(the dataset, the launchers) is imported inside the functions that run one, so ``tsmtrain report``
(which settles submitted points with :func:`collect`) stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from ..child import STDOUT, ChildError, ChildTimeout, run, start
from ..io import write_json, write_text
from ..optim import linear_scaling
from ..recipe import Recipe, dump_recipe
from .records import BREAKDOWN, SweepError, new_record, point_files, point_path, read_json, read_meta, read_record

__all__ = ["SweepPlan", "plan_sweep", "run_sweep", "collect", "measure_point", "parse_workers", "benchmark_recipe",
           "ALLREDUCE_REPEATS"]

ALLREDUCE_REPEATS = 5
"""Standalone gradient allreduces timed at the end of each benchmark run (``train.allreduce_benchmark``)."""


def parse_workers(text: str, option: str = "--workers") -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, duplicates removed); errors name ``option``.

    Raises:
        SweepError: an empty list, or an item that is not a positive integer.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SweepError(f"{option}: give worker counts such as 1,2,4,8")
    workers = set()
    for item in items:
        if not item.isdigit() or int(item) < 1:
            raise SweepError(f"{option}: {item!r} is not a positive whole number of workers")
        workers.add(int(item))
    return sorted(workers)


def _run_dir(sweep_dir: Path, workers: int) -> Path:
    return sweep_dir / "runs" / f"workers-{workers:04d}"


@dataclass
class SweepPlan:
    """What one ``tsmtrain sweep`` call will do.

    Attributes:
        sweep_dir: the sweep directory.
        meta: the contents of ``sweep.json``.
        recipes: the benchmark recipe of each worker count to run now.
        skipped: worker counts already measured (or still queued) and kept.
    """

    sweep_dir: Path
    meta: dict
    recipes: dict[int, Recipe]
    skipped: list[int]


def _comparable(recipe: Recipe) -> str:
    """A digest of what makes two sweeps' points comparable (data, model, optimizer, dist except
    np, clips per rank): extending a sweep with another recipe is refused."""
    from ..dist.local import default_launcher

    doc = recipe.model_dump(mode="json")
    for key in ("np", "master_addr", "master_port"):  # where ranks meet changes nothing measured
        doc["dist"].pop(key)
    doc["dist"]["launcher"] = default_launcher(recipe.dist.engine, recipe.dist.launcher)
    if not doc["model"]["sync_bn"]:  # keys added later at their defaults: earlier sweeps stay comparable
        doc["model"].pop("sync_bn")
    for key in ("exclude_from_decay", "lars_exclude"):
        if doc["optim"][key] == "norm_and_bias":
            doc["optim"].pop(key)
    keep = {k: doc[k] for k in ("data", "model", "optim", "dist")}
    keep["batch_size"] = doc["train"]["batch_size"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _steps_per_epoch(recipe: Recipe, workers: int, videos: int) -> int:
    return math.ceil(videos / workers) // recipe.train.batch_size // recipe.dist.backward_passes_per_step


def benchmark_recipe(recipe: Recipe, workers: int, batch_size: int, steps: int, warmup: int, run_dir: Path,
                     launch: str, nodes: int, ranks_per_node: int, videos: int) -> Recipe:
    """The recipe of one sweep point: ``workers`` ranks of ``batch_size`` clips, stopping after
    ``warmup + steps`` optimizer steps, no evaluation, one metrics record at the end of the
    warm-up (``log_every`` divides both counts), the step-time breakdown on and
    :data:`ALLREDUCE_REPEATS` standalone allreduces at the end. The schedule gets enough epochs
    for those steps (with checkpoints only at the stop); its learning rate follows the linear
    scaling rule for the point's global batch. ``videos``: the training list's length.

    Raises:
        SweepError: the values do not make a valid recipe (the message names the point).
    """
    doc = recipe.model_dump(mode="json")
    per_epoch = max(1, _steps_per_epoch(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"batch_size": batch_size})}), workers, videos))
    epochs = max(doc["schedule"]["epochs"], math.ceil((warmup + steps) / per_epoch))
    doc["schedule"]["epochs"] = epochs
    doc["data"]["val_list"] = None
    doc["dist"]["np"] = workers
    if workers > 1 and doc["dist"]["engine"] == "none":
        doc["dist"]["engine"] = "horovod"
    doc["train"].update(batch_size=batch_size, stop_after_steps=warmup + steps,
                        log_every=math.gcd(warmup, steps) if warmup else steps, breakdown=True,
                        allreduce_benchmark=ALLREDUCE_REPEATS, checkpoint_every=epochs, keep_checkpoints=1)
    doc["run"].update(dir=str(run_dir.parent), name=run_dir.name)
    if launch == "submit":
        doc["cluster"].update(nodes=nodes, tasks_per_node=ranks_per_node,
                              job_name=f"{doc['cluster']['job_name'] or recipe.run.name}-sweep-{workers}")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SweepError(f"workers {workers}: the benchmark recipe is not valid: {problems}") from None


def plan_sweep(recipe: Recipe, recipe_file: str, workers: list[int], sweep_dir: str | os.PathLike | None = None,
               strong: bool = False, global_batch: int | None = None, launch: str = "local", steps: int = 20,
               warmup: int = 5, rerun: bool = False, *, videos: int) -> SweepPlan:
    """Check a sweep request against the recipe and an existing sweep directory.

    Args:
        recipe: the validated recipe; a dataset it generates (``data.generate``) must be built
            already (:func:`tsmtrain.prep.datasets.prepare_sweep_data`), once, before the points
            share it.
        recipe_file: its path (recorded in ``sweep.json``).
        workers: worker counts (ranks).
        sweep_dir: default ``RUN.DIR/sweeps/RUN.NAME-weak`` (or ``-strong``; ``RUN.NAME-ddp-weak``
            for ``dist.engine: ddp``).
        strong: keep the global batch (default: ``train.batch_size`` x ``dist.np`` x
            ``backward_passes_per_step`` of the recipe, or ``global_batch``) instead of the
            batch per rank.
        launch: ``"local"`` or ``"submit"``.
        steps: measured optimizer steps per point, after ``warmup`` steps.
        rerun: measure again points already measured.
        videos: the number of videos in the recipe's training list (for the epochs each point
            needs).

    Raises:
        SweepError: bad counts, a global batch that the ranks cannot share evenly, more
            ranks than one node holds that do not fill whole nodes (submit), or a sweep
            directory made for another recipe, mode or step count (the key is named).
    """
    if steps < 1 or warmup < 0:
        raise SweepError(f"--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup})")
    if global_batch is not None and not strong:
        raise SweepError("--global-batch is for strong scaling: add --strong")
    mode = "strong" if strong else "weak"
    bpps = recipe.dist.backward_passes_per_step
    if strong:
        global_batch = global_batch or recipe.train.batch_size * recipe.dist.np * bpps
    engine = "" if recipe.dist.engine in ("horovod", "none") else f"-{recipe.dist.engine}"
    sweep_dir = (Path(sweep_dir) if sweep_dir
                 else Path(recipe.run.dir) / "sweeps" / f"{recipe.run.name}{engine}-{mode}")
    meta = dict(recipe=str(Path(recipe_file).resolve()), mode=mode, steps=steps, warmup_steps=warmup,
                batch_per_rank=None if strong else recipe.train.batch_size,
                global_batch=global_batch if strong else None,
                model=f"{'TSM' if recipe.model.shift else 'TSN'}-{recipe.model.arch}",
                num_segments=recipe.data.num_segments, input_size=recipe.data.input_size,
                digest=_comparable(recipe), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta_file = sweep_dir / "sweep.json"
    if meta_file.exists():
        old = read_json(meta_file, "; remove it or choose another --out")
        for key, what in (("mode", "mode"), ("steps", "--steps"), ("warmup_steps", "--warmup"),
                          ("batch_per_rank", "train.batch_size"), ("global_batch", "--global-batch"),
                          ("digest", "recipe (data, model, optim, dist or batch)")):
            if old.get(key) != meta[key]:
                raise SweepError(f"{meta_file}: this sweep was made with {key} = {old.get(key)!r}, this call "
                                 f"gives {meta[key]!r} ({what}); use the same settings or another --out")
        meta["created"] = old.get("created", meta["created"])
        collect(sweep_dir)  # jobs of an earlier --submit that have ended count as measured or failed now
    per_node = recipe.cluster.ranks_per_node()
    recipes, skipped = {}, []
    for n in workers:
        path = point_path(sweep_dir, n)
        record = read_record(path) if path.exists() else None
        if record and not rerun and record["status"] in ("ok", "submitted"):
            skipped.append(n)
            continue
        if strong:
            if global_batch % (n * bpps):
                raise SweepError(f"--workers {n}: a global batch of {global_batch} clips does not divide among "
                                 f"{n} ranks x {bpps} backward passes; choose counts that divide it")
            batch = global_batch // (n * bpps)
        else:
            batch = recipe.train.batch_size
        if launch == "submit":
            if n > per_node and n % per_node:
                raise SweepError(f"--workers {n}: more ranks than one node's {per_node} (cluster.tasks_per_node / "
                                 f"gpus_per_node) must fill whole nodes")
            nodes, rpn = max(1, n // per_node), min(n, per_node)
        else:
            nodes, rpn = 1, n
        recipes[n] = benchmark_recipe(recipe, n, batch, steps, warmup, _run_dir(sweep_dir, n), launch, nodes, rpn,
                                      videos)
    return SweepPlan(sweep_dir, meta, recipes, skipped)


def _base_record(recipe: Recipe, launch: str) -> dict:
    n = recipe.dist.np
    scaling = linear_scaling(recipe, n)
    per_node = recipe.cluster.ranks_per_node() if launch == "submit" else n
    record = new_record()
    record.update(workers=n, launch=launch, nodes=max(1, n // per_node) if launch == "submit" else 1,
                  ranks_per_node=min(n, per_node), global_batch=scaling.global_batch,
                  batch_per_rank=recipe.train.batch_size, lr=scaling.lr,
                  warmup_steps=None, steps=None, run_dir=str(recipe.run_dir))
    return record


def measure_point(run_dir: str | os.PathLike, warmup: int, steps: int) -> dict:
    """The measured fields of a point from its ``metrics.jsonl``.

    Only the logging intervals after the first ``warmup`` optimizer steps count. Throughput is
    the clips of those intervals over their mean wall time across ranks; the breakdown is the
    mean over ranks of each phase per step (:data:`tsmtrain.scaling.records.BREAKDOWN`).

    Returns:
        ``step_time_s`` (seconds per optimizer step), ``clips_per_s``, ``clips_per_s_per_rank``,
        ``breakdown_s`` (seconds per step by phase), ``allreduce_s`` (median seconds of a
        standalone gradient allreduce), ``gradient_bytes``, ``parameters``.

    Raises:
        SweepError: the file is missing or holds fewer measured steps than ``steps``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SweepError(f"{path}: missing (the run wrote no metrics)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    intervals = [r for r in records if "loss" in r and r["step"] - r["interval_steps"] >= warmup]
    bench = [r["allreduce_benchmark"] for r in records if "allreduce_benchmark" in r]
    measured = sum(r["interval_steps"] for r in intervals)
    if measured < steps or not bench:
        raise SweepError(f"{path}: {measured} of {steps} measured steps"
                         + ("" if bench else ", no allreduce benchmark") + ": the run did not finish")
    seconds = sum(r["step_time_s"] * r["interval_steps"] for r in intervals)
    clips = sum(r["clips_per_s"] * r["step_time_s"] * r["interval_steps"] for r in intervals)
    per_rank = sum(r["clips_per_s_per_rank"] * r["step_time_s"] * r["interval_steps"] for r in intervals)
    breakdown = {k: sum(r["breakdown_s"][k] * r["interval_steps"] for r in intervals) / measured for k in BREAKDOWN}
    return dict(step_time_s=seconds / measured, clips_per_s=clips / seconds,
                clips_per_s_per_rank=per_rank / seconds, breakdown_s=breakdown,
                allreduce_s=bench[-1]["seconds"], gradient_bytes=bench[-1]["bytes"], parameters=bench[-1]["parameters"])


_RANK_PREFIX = re.compile(r"^(\[\d+\]<std(?:out|err)>:|\[\d+,\d+\]<std(?:out|err)>:)\s*")  # horovodrun, mpirun --tag-output


def _log_tail(path: Path, lines: int = 40) -> str:
    """The most telling line of a failed point's log: its last ``error:`` line, else the last
    line with an exception name, else the last line."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines * 10:]
    except OSError:
        return f"no log at {path}"
    text = [_RANK_PREFIX.sub("", t).strip() for t in text if t.strip()]
    for want in ("error:", "Error", "Exception"):
        hits = [t for t in text if want in t]
        if hits:
            return hits[-1][:300]
    return (text[-1] if text else "empty log")[:300]


def _finish(record: dict, sweep_dir: Path, meta: dict, status: int | None, log: Path) -> dict:
    record["log"] = str(log)
    try:
        record.update(measure_point(record["run_dir"], meta["warmup_steps"], meta["steps"]), status="ok", error=None)
        if status not in (0, None):
            record.update(status="failed", error=f"exit status {status} after measuring: {_log_tail(log)}")
    except SweepError as err:
        reason = f"exit status {status}: {_log_tail(log)}" if status not in (0, None) else str(err)
        record.update(status="failed", error=reason)
    write_json(point_path(sweep_dir, record["workers"]), record)
    return record


def _run_local(recipe: Recipe, sweep_dir: Path, meta: dict, timeout: float | None) -> dict:
    n = recipe.dist.np
    run_dir = _run_dir(sweep_dir, n)
    shutil.rmtree(run_dir, ignore_errors=True)  # a point starts afresh (an earlier try may have left a checkpoint)
    run_dir.mkdir(parents=True)
    recipe_file = run_dir.parent / f"workers-{n:04d}.yaml"
    write_text(recipe_file, dump_recipe(recipe))
    record = _base_record(recipe, "local")
    record.update(warmup_steps=meta["warmup_steps"], steps=meta["steps"])
    log = run_dir / "point.log"
    cmd = [sys.executable, "-m", "tsmtrain", "run", str(recipe_file), "--no-resume"]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("+ " + shlex.join(cmd) + "\n")
        out.flush()
        # its own session, killed as a group at the timeout; if the sweep dies, SIGTERM: the run's stop
        # request, which `tsmtrain run --np N` passes on to its ranks (SIGKILL would orphan them)
        child = start(cmd, stdout=out, stderr=STDOUT, start_new_session=True, death_signal=signal.SIGTERM)
        try:
            status = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.wait()
            out.write(f"\ntsmtrain sweep: error: the point ran past --timeout {timeout:g} s and was killed\n")
            status = -9
        except KeyboardInterrupt:
            os.killpg(child.pid, 2)
            child.wait()
            raise
    record["seconds"] = time.perf_counter() - t0
    return _finish(record, sweep_dir, meta, status, log)


SQUEUE_TIMEOUT_S = 60
"""Seconds squeue may take to answer before it is killed (the point then stays ``submitted``)."""


def _job_state(job_id: str) -> str | None:
    """Slurm's state of a job still known to squeue (PENDING, RUNNING, ...; ``UNKNOWN`` when
    squeue did not answer in :data:`SQUEUE_TIMEOUT_S`), else ``None``."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        done = run([squeue, "-h", "-j", job_id, "-o", "%T"], timeout=SQUEUE_TIMEOUT_S, check=False)
    except ChildTimeout:  # a busy controller: the job may well be queued, so it stays submitted
        return "UNKNOWN"
    except ChildError:
        return None
    state = done.stdout.strip().splitlines()
    return state[0] if done.returncode == 0 and state else None


def collect(sweep_dir: str | os.PathLike) -> list[dict]:
    """Settle the submitted points of a sweep: a job that finished its steps becomes ``ok``, a
    job that squeue no longer knows without having finished becomes ``failed`` (with the last
    telling line of its log); queued or running ones stay ``submitted``.

    Returns:
        The records that changed.

    Raises:
        SweepError: ``sweep.json`` or a point record cannot be read or lacks a key
            (:func:`tsmtrain.scaling.records.read_meta`, :func:`~tsmtrain.scaling.records.read_record`).
    """
    sweep_dir = Path(sweep_dir)
    meta = read_meta(sweep_dir / "sweep.json")
    changed = []
    for path in point_files(sweep_dir):
        record = read_record(path)
        if record["status"] != "submitted":
            continue
        run_dir = Path(record["run_dir"])
        logs = sorted(run_dir.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
        log = logs[-1] if logs else Path(record["log"] or run_dir / "slurm.out")
        try:
            record.update(measure_point(run_dir, meta["warmup_steps"], meta["steps"]), status="ok", error=None)
        except SweepError as err:
            if _job_state(record["job_id"]) is not None:
                continue
            record.update(status="failed", error=f"job {record['job_id']} ended: {_log_tail(log) if logs else err}")
        record["log"] = str(log)
        write_json(path, record)
        changed.append(record)
    return changed


def _submit_points(recipes: dict[int, Recipe], sweep_dir: Path, meta: dict, array: bool, template,
                   sbatch: str = "sbatch") -> list[dict]:
    from ..dist.slurm import ArrayJob, LaunchError, prepare_job, render_sbatch, sbatch_script, submit

    records = []
    groups: dict[int, list[int]] = {}
    for n, recipe in recipes.items():
        groups.setdefault(recipe.cluster.nodes, []).append(n)
    for nodes, points in groups.items():
        use_array = array and len(points) > 1
        for n in points:
            run_dir = _run_dir(sweep_dir, n)
            shutil.rmtree(run_dir, ignore_errors=True)
            record = _base_record(recipes[n], "submit")
            record.update(warmup_steps=meta["warmup_steps"], steps=meta["steps"])
            t0 = time.perf_counter()
            try:
                result = submit(recipes[n], template, dry_run=use_array, sbatch=sbatch)
            except LaunchError as err:
                record.update(status="failed", error=str(err), seconds=time.perf_counter() - t0)
                write_json(point_path(sweep_dir, n), record)
                records.append(record)
                continue
            record.update(status="submitted", job_id=result.job_id, log=result.log_pattern,
                          seconds=time.perf_counter() - t0)
            records.append(record)
        if use_array:  # the template renders the array: the widest point's allocation, task i runs point i
            array_job = ArrayJob(
                # the recipe file's name and --out are not recipe values: they go through the same filters
                job_name=f"{Path(meta['recipe']).stem}-sweep",
                log_file=str(sweep_dir / "runs").replace("%", "%%") + "/array-%A_%a.out",
                run_dirs=[str(_run_dir(sweep_dir, n)) for n in points], ranks=list(points),
                ranks_per_node=[recipes[n].cluster.ranks_per_node() for n in points])
            script = sweep_dir / f"array-{nodes:04d}-nodes.sbatch"
            write_text(script, render_sbatch(prepare_job(recipes[max(points)]), template, command="sweep",
                                            array=array_job))
            array_records = [r for r in records if r["workers"] in points and r["status"] == "submitted"]
            try:
                array_id = sbatch_script(script, sbatch=sbatch)
            except LaunchError as err:
                for r in array_records:
                    r.update(status="failed", error=str(err))
            else:
                for r in array_records:
                    r.update(job_id=f"{array_id}_{points.index(r['workers'])}")
        for r in records:
            if r["workers"] in points:
                write_json(point_path(sweep_dir, r["workers"]), r)
    return records


def run_sweep(plan: SweepPlan, launch: str = "local", array: bool = False, timeout: float | None = None,
              template: str | os.PathLike | None = None,
              on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or submit) the planned points one after the other and write their records.

    Args:
        plan: from :func:`plan_sweep`.
        launch: ``"local"`` (``tsmtrain run --np N`` on this host, one point at a time) or
            ``"submit"`` (sbatch, one job per point; with ``array`` one job array per node count).
        timeout: seconds after which a local point is killed and recorded as failed.
        template: a job template for ``submit`` (default ``tsmtrain/dist/templates/job.sbatch.j2``).
        on_point: called with each record as it is written.

    Returns:
        The new records, in worker order.
    """
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.sweep_dir / "sweep.json", plan.meta)
    if launch == "submit":
        records = _submit_points(plan.recipes, plan.sweep_dir, plan.meta, array, template)
        for r in records:
            if on_point:
                on_point(r)
        return records
    records = []
    for n in sorted(plan.recipes):
        record = _run_local(plan.recipes[n], plan.sweep_dir, plan.meta, timeout)
        records.append(record)
        if on_point:
            on_point(record)
    return records
