"""Slurm job scripts: rendering, quoting, refusal of bad values, and the script's requeue logic
run under bash with stand-ins for srun and scontrol (no cluster needed here; the real cluster
tests are in test_slurm_cluster.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsmtrain.dist.stop import EXIT_PREEMPTED, PREEMPTED_FILE, preempted_status
from tsmtrain.dist import slurm
from tsmtrain.dist.slurm import ArrayJob, LaunchError, prepare_job, render_sbatch, sbatch_script
from tsmtrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path, name="job", cluster=None, **sections):
    doc = {
        "data": {"root": "data", "train_list": "data/train.txt", "num_segments": 8},
        "model": {"arch": "resnet50", "num_classes": 400},
        "train": {"batch_size": 8},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
        "cluster": cluster or {},
    }
    doc.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def render(path, sets=()):
    return render_sbatch(prepare_job(load_recipe(path, list(sets), check_files=False)))


def header(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tsmtrain", *args], capture_output=True, text=True, cwd=cwd)


def test_one_node_cpu_job(tmp_path):
    script = render(write_recipe(tmp_path, cluster={"nodes": 1, "tasks_per_node": 2, "time": "30:00"}))
    h = header(script)
    assert h["--job-name"] == "job" and h["--nodes"] == "1" and h["--ntasks-per-node"] == "2"
    assert h["--time"] == "30:00" and h["--signal"] == "USR2@120" and "--requeue" in h
    assert h["--open-mode"] == "append"
    assert h["--output"] == f"{tmp_path}/runs/job/slurm-%j.out"
    assert "--gpus-per-node" not in h and "--cpus-per-task" not in h and "--partition" not in h
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert f"RECIPE={tmp_path}/runs/job/recipe.yaml" in lines
    assert f"PYTHON={sys.executable}" in lines
    assert "srun --mpi=pmix --kill-on-bad-exit=1 \\" in lines
    assert '    "$PYTHON" -m tsmtrain run "$RECIPE" &' in lines
    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in lines and "MAX_REQUEUES=3" in lines
    assert 'scontrol requeue "$SLURM_JOB_ID" && exit 0' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_256_nodes_of_6_gpus(tmp_path):
    cluster = {"nodes": 256, "gpus_per_node": 6, "cpus_per_task": 7, "mem": "0", "time": "1-00:00:00",
               "partition": "batch", "account": "csc123", "qos": "normal", "constraint": "volta",
               "reservation": "kinetics", "sbatch": ["--exclusive"], "setup": ["module load cuda/10.1"],
               "env": {"NCCL_DEBUG": "INFO", "HOROVOD_FUSION_THRESHOLD": "67108864"}, "max_requeues": 5,
               "signal_seconds": 300}
    script = render(write_recipe(tmp_path, cluster=cluster))
    h = header(script)
    assert (h["--nodes"], h["--ntasks-per-node"], h["--gpus-per-node"], h["--cpus-per-task"]) == ("256", "6", "6", "7")
    assert (h["--mem"], h["--time"], h["--partition"], h["--account"]) == ("0", "1-00:00:00", "batch", "csc123")
    assert (h["--qos"], h["--constraint"], h["--reservation"]) == ("normal", "volta", "kinetics")
    assert h["--signal"] == "USR2@300" and "--exclusive" in h
    assert "1536 rank(s); global batch 12288 clips (8 per rank)" in script
    lines = script.splitlines()
    assert "module load cuda/10.1" in lines
    assert "export NCCL_DEBUG=INFO" in lines and "export HOROVOD_FUSION_THRESHOLD=67108864" in lines
    assert "srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=7 \\" in lines
    assert "MAX_REQUEUES=5" in lines
    # the set-up comes before the launch, the header before everything else
    assert lines.index("module load cuda/10.1") < next(i for i, line in enumerate(lines) if line.startswith("srun"))
    last_header = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(not line.startswith("#SBATCH") for line in lines[last_header + 1:])
    assert all(line.startswith("#") for line in lines[:last_header + 1])


def test_mpirun_job(tmp_path):
    script = render(write_recipe(tmp_path, cluster={"nodes": 2, "tasks_per_node": 4, "launcher": "mpirun",
                                                    "env": {"OMP_NUM_THREADS": "4"}}))
    h = header(script)
    assert h["--signal"] == "B:USR2@120"  # the batch shell gets it and passes it to mpirun
    lines = script.splitlines()
    assert 'mpirun -np "$SLURM_NTASKS" --map-by ppr:4:node --bind-to none \\' in lines
    assert "    -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS \\" in lines
    assert "srun" not in "\n".join(line for line in lines if not line.startswith("#"))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_hostile_names_are_quoted(tmp_path):
    evil = "a b; rm -rf x"
    runs = tmp_path / "my runs $(touch pwned)" / "run `touch pwned3`"  # run.name must be a plain name
    path = write_recipe(tmp_path, name="r", cluster={"job_name": evil, "env": {"NOTE": "it's $(touch pwned2)"}},
                        run={"name": "run", "dir": str(runs)})
    script = render(path)
    h = header(script)
    assert h["--job-name"] == f'"{evil}"'
    run_dir = runs / "run"
    assert h["--output"] == f'"{run_dir}/slurm-%j.out"'
    # run the script's shell part with stand-ins that record what they were given
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\necho "$NOTE" >> "$ARGS_FILE"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[-3:-1] == ["run", str(run_dir / "recipe.yaml")]
    assert args[-1] == "it's $(touch pwned2)"
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "x").exists()


def run_job_script(tmp_path, script, srun_body, **slurm_env):
    """Run a rendered job script under bash with a stand-in srun (``srun_body``, bash) and a
    stand-in scontrol that writes its arguments to ``tmp_path/scontrol``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "$@" > "$LOG_FILE"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_FILE": str(tmp_path / "scontrol"),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", **slurm_env}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("restarts, requeued", [(0, True), (2, True), (3, False)])
def test_requeue_logic(tmp_path, restarts, requeued):
    script = render(write_recipe(tmp_path, cluster={"max_requeues": 3}))
    done = run_job_script(tmp_path, script, f"exit {EXIT_PREEMPTED}", SLURM_JOB_ID="42",
                          SLURM_RESTART_COUNT=str(restarts))
    if requeued:
        assert done.returncode == 0
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "42"]
        assert f"requeue {restarts + 1} of 3" in done.stdout
    else:
        assert done.returncode == EXIT_PREEMPTED
        assert not (tmp_path / "scontrol").exists()
        assert "requeue limit reached (3 requeues)" in done.stderr


def test_failed_run_is_not_requeued(tmp_path):
    script = render(write_recipe(tmp_path))
    done = run_job_script(tmp_path, script, "exit 1", SLURM_JOB_ID="1")
    assert done.returncode == 1 and "failed with exit status 1" in done.stderr
    assert not (tmp_path / "scontrol").exists()


@pytest.mark.parametrize("writes_marker, requeued", [(True, True), (False, False)])
def test_stop_marker_overrides_a_killed_rank_status(tmp_path, writes_marker, requeued):
    # srun --kill-on-bad-exit kills a rank still exiting after the first one exited 75; srun then
    # returns 128 + signal. Rank 0's preempted.json (written after the checkpoint) decides; a
    # stale one from an earlier start is removed before the launch and does not count.
    script = render(write_recipe(tmp_path))
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / PREEMPTED_FILE).write_text("{}\n")  # left by an earlier start
    write = f'echo "{{}}" > "{run_dir / PREEMPTED_FILE}"\n' if writes_marker else ""
    done = run_job_script(tmp_path, script, f"{write}exit 143", SLURM_JOB_ID="9")
    if requeued:
        assert done.returncode == 0, done.stderr
        assert "launcher exited 143 after the ranks had checkpointed" in done.stdout
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "9"]
    else:
        assert done.returncode == 143 and "failed with exit status 143" in done.stderr
        assert not (tmp_path / "scontrol").exists()


def test_preempted_status_reads_the_marker(tmp_path):
    import time

    assert preempted_status(143, tmp_path, 0) == 143  # no marker
    (tmp_path / PREEMPTED_FILE).write_text("{}\n")
    assert preempted_status(143, tmp_path, 0) == EXIT_PREEMPTED
    assert preempted_status(0, tmp_path, 0) == 0  # a clean exit stays clean
    assert preempted_status(143, tmp_path, time.time() + 60) == 143  # older than this launch


@pytest.mark.parametrize("flags, culprit", [
    (["--time", "90min"], "cluster.time"),
    (["--time", "1:2:3:4"], "cluster.time"),
    (["--nodes", "0"], "cluster.nodes"),
    (["--nodes", "-4"], "cluster.nodes"),
    (["--gpus-per-node", "-1"], "cluster.gpus_per_node"),
    (["--nodes", "0", "--gpus-per-node", "4"], "cluster.nodes"),
    (["--tasks-per-node", "0"], "cluster.tasks_per_node"),
    (["--mem", "12 GB"], "cluster.mem"),
    (["--max-requeues", "-1"], "cluster.max_requeues"),
    (["--gpus-per-node", "4", "--tasks-per-node", "8"], "cluster.tasks_per_node"),
    (["--launcher", "aprun"], "cluster.launcher"),
    (["--job-name", "two\nlines"], "cluster.job_name"),
    (["--job-name", 'say "hi"'], "double quote"),
    (["--signal-seconds", "7200", "--time", "60"], "cluster.signal_seconds"),
])
def test_invalid_values_refused_before_anything_is_written(tmp_path, flags, culprit):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("a.mp4 0\n")
    path = write_recipe(tmp_path)
    for command in (["render"], ["submit", "--dry-run"]):
        done = cli(*command, str(path), *flags, cwd=tmp_path)
        assert done.returncode == 2, (command, flags, done.stdout, done.stderr)
        assert culprit in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "runs").exists()


def test_flag_errors_name_the_flag(tmp_path):
    done = cli("render", str(write_recipe(tmp_path)), "--nodes", "0")
    assert done.returncode == 2 and done.stderr.startswith("error: --nodes: cluster.nodes = 0")


@pytest.mark.parametrize("limit", ["30", "30:00", "1:30:00", "01:30:00", "2-0", "2-12:00", "2-12:00:00", "UNLIMITED"])
def test_time_limits_slurm_accepts(tmp_path, limit):
    # unquoted in YAML: 1:30:00 must not become the base-60 number 5400
    path = tmp_path / "t.yaml"
    path.write_text(f"data: {{train_list: t.txt}}\ncluster:\n  time: {limit}\n")
    assert load_recipe(path, check_files=False).cluster.time == limit


def test_submit_dry_run_writes_script_and_resolved_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("a.mp4 0\n")
    path = write_recipe(tmp_path, run={"name": "dry", "dir": "runs"})
    done = cli("submit", str(path), "--dry-run", "--nodes", "2", "--tasks-per-node", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "dry"
    script = (run_dir / "job.sbatch").read_text()
    assert header(script)["--nodes"] == "2" and os.access(run_dir / "job.sbatch", os.X_OK)
    saved = load_recipe(run_dir / "recipe.yaml", check_files=False)
    assert saved.data.train_list == str(tmp_path / "data" / "train.txt")  # absolute: the job may start elsewhere
    assert saved.run.dir == str(tmp_path / "runs") and saved.dist.np == 6 and saved.cluster.nodes == 2
    assert "dry run" in done.stdout and str(run_dir / "slurm-%j.out") in done.stdout


def test_submit_without_sbatch_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("a.mp4 0\n")
    path = write_recipe(tmp_path)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, "-m", "tsmtrain", "submit", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2 and "sbatch not found" in done.stderr


def test_sbatch_is_run_in_one_place_and_its_refusal_is_one_line(tmp_path, monkeypatch):
    """sbatch_script (submit's and the sweep's array's): the job id from --parsable, sbatch's last
    error line when it refuses, and a kill with the seconds named when it does not answer."""
    callers = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tsmtrain").rglob("*.py")
                     if '"--parsable"' in p.read_text())
    assert callers == ["tsmtrain/dist/slurm.py"], callers
    stub = tmp_path / "sbatch"
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    stub.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"; echo "123;cluster"\n')
    stub.chmod(0o755)
    assert sbatch_script(script, sbatch=str(stub)) == "123"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(script)]
    stub.write_text('#!/bin/sh\necho "sbatch: error: first" >&2\n'
                    'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\nexit 1\n')
    with pytest.raises(LaunchError) as err:
        sbatch_script(script, sbatch=str(stub))
    assert str(err.value) == f"sbatch refused {script}: sbatch: error: Batch job submission failed: " \
                             "Invalid partition name specified"
    stub.write_text("#!/bin/sh\nexec sleep 60\n")
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 1)
    with pytest.raises(LaunchError, match=f"^{script} not submitted: sbatch ran past its 1 s timeout"):
        sbatch_script(script, sbatch=str(stub))


def test_own_template_and_template_errors(tmp_path):
    path = write_recipe(tmp_path)
    own = tmp_path / "own.j2"
    own.write_text("#!/bin/bash\n#SBATCH --nodes={{ cluster.nodes }}\n{{ python | q }} -m tsmtrain run {{ recipe_file | q }}\n")
    done = cli("render", str(path), "--template", str(own), "--nodes", "3")
    assert done.returncode == 0 and done.stdout.splitlines()[1] == "#SBATCH --nodes=3"
    own.write_text("{{ no_such_value }}\n")
    done = cli("render", str(path), "--template", str(own))
    assert done.returncode == 2 and "no_such_value" in done.stderr and "Traceback" not in done.stderr
    done = cli("render", str(path), "--template", str(tmp_path / "absent.j2"))
    assert done.returncode == 2 and "absent.j2" in done.stderr


def test_the_template_renders_a_job_array(tmp_path):
    """`array` (tsmtrain sweep --array): the same template writes the array's --array, --job-name
    and --output and otherwise the allocation's #SBATCH lines unchanged; task i runs point i's job
    script with its ranks. A template that ignores `array` is refused, not submitted as one job."""
    path = write_recipe(tmp_path, cluster={"nodes": 1, "tasks_per_node": 4, "time": "30:00", "partition": "p",
                                           "sbatch": ["--exclusive"]})
    job = prepare_job(load_recipe(path, check_files=False))
    runs = [tmp_path / "runs" / "w1", tmp_path / "runs" / "w 4"]
    array = ArrayJob("job-sweep", f"{tmp_path}/runs/array-%A_%a.out", [str(r) for r in runs], [1, 4], [1, 4])
    script, single = render_sbatch(job, command="sweep", array=array), render_sbatch(job)
    h = header(script)
    assert (h["--array"], h["--job-name"], h["--output"]) == ("0-1", "job-sweep", f"{tmp_path}/runs/array-%A_%a.out")
    assert {k: v for k, v in h.items() if k not in ("--array", "--job-name", "--output")} == \
        {k: v for k, v in header(single).items() if k not in ("--job-name", "--output")}
    assert "srun" not in script and "scontrol" not in script  # the tasks' own scripts launch and requeue
    for run_dir in runs:  # each task's job script, a stand-in that says what it sees
        run_dir.mkdir(parents=True)
        (run_dir / "job.sbatch").write_text('echo "$(basename "$PWD") $SLURM_NTASKS $SLURM_NTASKS_PER_NODE"\n')
    for task, ranks in ((0, 1), (1, 4)):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77", "SLURM_NTASKS": "4"}
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (runs[task] / f"slurm-77_{task}.out").read_text() == f"{tmp_path.name} {ranks} {ranks}\n"
    own = tmp_path / "own.j2"
    own.write_text("#!/bin/bash\n#SBATCH --nodes={{ cluster.nodes }}\n")
    with pytest.raises(LaunchError, match="own.j2: writes no '#SBATCH --array=' line"):
        render_sbatch(job, own, command="sweep", array=array)


def test_kinetics_recipe_renders_the_summit_layout():
    done = cli("render", str(REPO / "configs" / "tsm_r50_kinetics400.yaml"), cwd=REPO)
    assert done.returncode == 0, done.stderr
    h = header(done.stdout)
    assert (h["--nodes"], h["--gpus-per-node"], h["--ntasks-per-node"]) == ("256", "6", "6")
    assert "global batch 12288 clips" in done.stdout


def test_env_outside_a_job():
    done = cli("env")
    assert done.returncode == 0, done.stderr
    assert "1 rank(s), engine none (not started by srun, mpirun or horovodrun)" in done.stdout
