"""On the real one-node Slurm cluster of scripts/slurm-local.sh: submit, preempt, requeue, resume.

The cluster is started by .ci/run (and by this module's fixture when it is not up); the tests
are skipped only where Slurm cannot be installed (slurm-local.sh exits 4).
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import steps_logged, tiny_recipe, venv_env
from tests.slurm_jobs import submit, usr2_requeue_and_finish, wait_for, wait_for_steps
from tsmtrain.dist.stop import EXIT_PREEMPTED
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "scripts" / "slurm-local.sh"


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started here if it is not up."""
    if subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0:
        return
    start = subprocess.run(["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True)
    if start.returncode == 4:
        pytest.skip(f"Slurm cannot be installed here: {start.stderr.strip()}")
    assert start.returncode == 0, start.stdout + start.stderr


def write_recipe(tmp_path, root, name, epochs=2, **cluster):
    cluster = {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "time": "10:00", **cluster}
    return tiny_recipe(tmp_path / f"{name}.yaml", root, name, schedule={"epochs": epochs}, train={"seed": 5},
                       cluster=cluster)


def test_two_rank_job_runs_to_completion(cluster, tmp_path, tiny_demo):
    # hostile names reach the real sbatch: a job name with shell syntax, a run directory with
    # spaces and command substitutions (in run.dir: run.name must be a plain name)
    import yaml

    evil = "a b; touch x"
    recipe = write_recipe(tmp_path, tiny_demo, "run", epochs=1, job_name=evil)
    doc = yaml.safe_load(recipe.read_text())
    doc["run"]["dir"] = str(tmp_path / "runs $(touch pwned) `touch pwned2`")
    recipe.write_text(yaml.safe_dump(doc))
    job = submit(recipe)
    run_dir = tmp_path / "runs $(touch pwned) `touch pwned2`" / "run"
    log = run_dir / f"slurm-{job}.out"
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    assert f"JobName={evil} " in shown
    assert wait_for(job, log) in ("COMPLETED", "GONE")
    assert not list(tmp_path.rglob("pwned*")) and not list(tmp_path.rglob("x"))
    text = log.read_text()
    assert "rank 0 of 2 (horovod)" in text and "rank 1 of 2 (horovod)" in text, text
    assert "tsmtrain: run finished" in text
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 24 // 4
    assert steps_logged(run_dir) == 6


def test_usr2_checkpoints_requeues_and_equals_uninterrupted(cluster, tmp_path, tiny_demo):
    ref_job = submit(write_recipe(tmp_path, tiny_demo, "ref"))
    ref_dir = tmp_path / "runs" / "ref"
    assert wait_for(ref_job, ref_dir / f"slurm-{ref_job}.out") in ("COMPLETED", "GONE")

    # rank 0 lingers after its exit, so srun --kill-on-bad-exit kills it once rank 1 has exited 75
    # and srun reports 128 + signal: the job must still see a clean stop (preempted.json)
    lingering = tmp_path / "python-lingering"
    lingering.write_text(f'#!/bin/bash\ntrap "" USR2\n"{sys.executable}" "$@"\nstatus=$?\n'
                         '[ "$SLURM_PROCID" = 0 ] && sleep 5\nexit $status\n')
    lingering.chmod(0o755)
    job = submit(write_recipe(tmp_path, tiny_demo, "cut", python=str(lingering)))
    run_dir = tmp_path / "runs" / "cut"
    text = usr2_requeue_and_finish(job, run_dir)
    assert "after the ranks had checkpointed and stopped; treating it as a stop" in text, text
    assert "requeueing job" in text and "start 2 on" in text, text
    stopped = re.search(r"stopped at step (\d+) of 12", text)
    assert stopped and 3 <= int(stopped.group(1)) < 12, text
    assert "resuming from" in text and "tsmtrain: run finished" in text

    ref, cut = load_checkpoint(latest_checkpoint(ref_dir)), load_checkpoint(latest_checkpoint(run_dir))
    assert cut["step"] == ref["step"] == 12
    for name, a in ref["model"].items():
        assert torch.equal(a, cut["model"][name]), name


def test_requeue_limit_stops_with_a_message(cluster, tmp_path, tiny_demo):
    job = submit(write_recipe(tmp_path, tiny_demo, "limit", epochs=3, max_requeues=0))
    run_dir = tmp_path / "runs" / "limit"
    log = run_dir / f"slurm-{job}.out"
    wait_for_steps(run_dir, log, 2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = wait_for(job, log)
    text = log.read_text()
    assert "requeue limit reached (0 requeues)" in text, text
    assert "requeueing" not in text and state in ("FAILED", "GONE")
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] < 18
    if state == "FAILED":
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
        assert f"ExitCode={EXIT_PREEMPTED}:0" in out


def test_env_shows_each_rank_under_srun(cluster):
    done = subprocess.run(["srun", "--mpi=pmix", "--nodes=1", "--ntasks=2", "--time=5", sys.executable, "-m",
                           "tsmtrain", "env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 rank(s), engine horovod" in done.stdout
    assert "SLURM_PROCID=0" in done.stdout and "SLURM_PROCID=1" in done.stdout
    assert done.stdout.count("PMIX_RANK=") == 2


def test_mpirun_launcher_inside_the_allocation(cluster, tmp_path, tiny_demo):
    job = submit(write_recipe(tmp_path, tiny_demo, "mpi", epochs=1, launcher="mpirun"))
    run_dir = tmp_path / "runs" / "mpi"
    log = run_dir / f"slurm-{job}.out"
    assert wait_for(job, log) in ("COMPLETED", "GONE")
    text = log.read_text()
    assert "rank 0 of 2 (horovod)" in text and "rank 1 of 2 (horovod)" in text, text
    assert "tsmtrain: run finished" in text
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 24 // 4


def test_sweep_as_a_job_array_then_report(cluster, tmp_path, tiny_demo):
    """tsmtrain sweep --submit --array: both points of one node run as tasks of one job array, each
    with its own number of ranks; tsmtrain report collects them once the jobs have ended."""
    import json

    recipe = write_recipe(tmp_path, tiny_demo, "swept")
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "tsmtrain", "sweep", str(recipe), "--workers", "1,2", "--steps", "2",
                           "--warmup", "1", "--submit", "--array", "--out", str(sweep_dir)],
                          capture_output=True, text=True, env=venv_env())
    assert done.returncode == 0, done.stderr
    jobs = re.findall(r"submitted job (\d+)_(\d)", done.stderr)
    assert len(jobs) == 2 and jobs[0][0] == jobs[1][0] and {j[1] for j in jobs} == {"0", "1"}
    deadline = time.time() + 600
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", jobs[0][0]], capture_output=True,
                                                    text=True).stdout.strip():
        time.sleep(3)
    report = subprocess.run([sys.executable, "-m", "tsmtrain", "report", str(sweep_dir)], capture_output=True,
                            text=True, env=venv_env())
    assert report.returncode == 0, report.stderr
    for n in (1, 2):
        record = json.loads((sweep_dir / "points" / f"workers-{n:04d}.json").read_text())
        assert record["status"] == "ok", record["error"]
        assert record["launch"] == "submit" and record["global_batch"] == 2 * n
        log = Path(record["log"]).read_text()
        assert f"rank {n - 1} of {n} (horovod)" in log and f"of {n + 1} (horovod)" not in log
    assert (sweep_dir / "report" / "throughput.png").exists()


def test_prepare_as_a_job_array_then_merge(cluster, tmp_path, tiny_demo):
    """slurm/prepare.sbatch as a 2-task job array (a shard each), then --merge: docs/data.md's
    cluster-scale preparation, end to end."""
    out = tmp_path / "prepared"
    args = ["--list", str(tiny_demo / "train.txt"), "--root", str(tiny_demo), "--out", str(out), "--short-side", "32"]
    done = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--time=10:00",
                           f"--output={tmp_path}/prepare-%A_%a.out", str(REPO / "slurm" / "prepare.sbatch"), "2",
                           *args], capture_output=True, text=True, cwd=REPO,
                          env={**venv_env(), "TSMTRAIN_PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 600
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"array job {job} still queued or running after 600 s")
        time.sleep(1)
    logs = sorted(tmp_path.glob("prepare-*.out"))
    assert len(logs) == 2, logs
    for log in logs:
        assert "tsmtrain prepare: array task" in log.read_text()
    journals = sorted(p.name for p in (out / ".shards").iterdir())
    assert journals == ["manifest-0-of-2.jsonl", "manifest-1-of-2.jsonl"], [log.read_text() for log in logs]
    merge = subprocess.run([sys.executable, "-m", "tsmtrain", "prepare", *args, "--merge"], capture_output=True,
                           text=True, cwd=REPO)
    assert merge.returncode == 0, merge.stderr
    from tsmtrain.data.manifest import read_manifest

    assert len(read_manifest(out)) == 24
    assert len((out / "train.txt").read_text().splitlines()) == 24


def test_ddp_job_on_scancel_term_checkpoints_requeues_and_equals_uninterrupted(cluster, tmp_path, tiny_demo):
    """dist.engine: ddp under srun: the ranks meet at the job script's MASTER_ADDR:MASTER_PORT;
    scancel --signal=TERM (what Slurm's preemption and scancel send the ranks) stops them with a
    checkpoint, the script requeues the job, and the resumed run ends with exactly the weights of
    an uninterrupted one."""
    ref_job = submit(write_recipe(tmp_path, tiny_demo, "ddp-ref"), "--set", "dist.engine=ddp")
    ref_dir = tmp_path / "runs" / "ddp-ref"
    ref_log = ref_dir / f"slurm-{ref_job}.out"
    assert wait_for(ref_job, ref_log) in ("COMPLETED", "GONE")
    text = ref_log.read_text()
    assert "rank 0 of 2 (ddp)" in text and "rank 1 of 2 (ddp)" in text, text
    assert "tsmtrain: DDP ranks meet at " in text and "tsmtrain: run finished" in text

    job = submit(write_recipe(tmp_path, tiny_demo, "ddp-cut"), "--set", "dist.engine=ddp")
    run_dir = tmp_path / "runs" / "ddp-cut"
    log = run_dir / f"slurm-{job}.out"
    deadline = time.monotonic() + 300
    while steps_logged(run_dir) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_logged(run_dir) >= 3, log.read_text() if log.exists() else "no log"
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    state = wait_for(job, log)
    text = log.read_text()
    assert state in ("COMPLETED", "GONE"), f"job {job} ended {state}; log:\n{text}"
    stopped = re.search(r"stop requested \(SIGTERM\): stopped at step (\d+) of 12", text)
    assert stopped and 3 <= int(stopped.group(1)) < 12, text
    assert "requeueing job" in text and "start 2 on" in text, text
    assert "resuming from" in text and "tsmtrain: run finished" in text

    ref, cut = load_checkpoint(latest_checkpoint(ref_dir)), load_checkpoint(latest_checkpoint(run_dir))
    assert cut["step"] == ref["step"] == 12
    for name, a in ref["model"].items():
        assert torch.equal(a, cut["model"][name]), name
