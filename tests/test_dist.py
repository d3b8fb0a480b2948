"""The dist package without starting ranks: where DDP ranks meet (torchrun, srun, mpirun), the
job script's launch line for each engine, recipe and launcher mistakes, SIGTERM in the job
script, SyncBatchNorm on one rank, and what Horovod was built with."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_launch_slurm import header, render, write_recipe
from tsmtrain.dist import DistError, launched_by_launcher
from tsmtrain.dist.ddp import rendezvous
from tsmtrain.dist.local import default_launcher, local_command
from tsmtrain.dist.stop import EXIT_PREEMPTED
from tsmtrain.dist.slurm import default_master_port, expand_nodelist, tasks_on_node
from tsmtrain.dist.syncbn import SyncBatchNorm, convert_sync_batchnorm
from tsmtrain.recipe import DistConfig

REPO = Path(__file__).resolve().parents[1]


def test_slurm_rendering_never_imports_torch(tmp_path):
    path = write_recipe(tmp_path, dist={"engine": "ddp"}, cluster={"nodes": 2, "tasks_per_node": 2})
    code = ("import sys\nfrom tsmtrain.recipe import load_recipe\nfrom tsmtrain.dist.slurm import prepare_job, render_sbatch\n"
            f"text = render_sbatch(prepare_job(load_recipe({str(path)!r}, check_files=False)))\n"
            "assert 'srun' in text\nprint('torch' in sys.modules, 'horovod' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
    ("a[8-10]-ib", ["a8-ib", "a9-ib", "a10-ib"]),
    ("c[098-101]", ["c098", "c099", "c100", "c101"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["a[1-", "a]b", "a[3-1]", "a,,b", "a[x]"])
def test_expand_nodelist_refuses_malformed_lists(text):
    with pytest.raises(ValueError, match="not a Slurm node list"):
        expand_nodelist(text)


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        tasks_on_node("2(x3)", 3)


SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_rendezvous_under_srun_first_host_and_port_from_the_job_id():
    r = rendezvous(None, SRUN)
    assert (r.rank, r.size, r.local_rank, r.local_size, r.source) == (3, 4, 1, 2, "slurm")
    assert (r.addr, r.port) == ("gpu07", 20000 + 123456 % 12000) == ("gpu07", default_master_port(123456))
    # the job script's exports win over the derived values, the recipe over both
    assert rendezvous(None, {**SRUN, "MASTER_ADDR": "h", "MASTER_PORT": "23456"}).port == 23456
    r = rendezvous(DistConfig(master_addr="10.1.2.3", master_port=29999), {**SRUN, "MASTER_ADDR": "h"})
    assert (r.addr, r.port) == ("10.1.2.3", 29999)


def test_rendezvous_under_torchrun_and_mpirun():
    r = rendezvous(DistConfig(master_port=29999), {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2",
                                                   "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1234"})
    assert (r.rank, r.size, r.local_rank, r.source, r.port) == (1, 2, 1, "torchrun", None)  # torchrun's own port
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    with pytest.raises(DistError, match="dist.master_port"):
        rendezvous(None, mpi)  # one host, but no port and no job id
    r = rendezvous(DistConfig(master_port=29500), mpi)
    assert (r.rank, r.size, r.addr, r.port, r.source) == (0, 2, "127.0.0.1", 29500, "mpirun")


@pytest.mark.parametrize("env, key", [
    ({}, "not started by torchrun"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[07-"}, "dist.master_addr"),
    ({**SRUN, "MASTER_PORT": "99999"}, "dist.master_port"),
    ({**SRUN, "SLURM_NTASKS": "four"}, "SLURM_NTASKS"),
])
def test_rendezvous_errors_name_the_key(env, key):
    with pytest.raises(DistError, match=key):
        rendezvous(None, env)


def test_launched_by_torchrun():
    assert launched_by_launcher({"TORCHELASTIC_RUN_ID": "abc"})
    assert launched_by_launcher({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert not launched_by_launcher({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})


def test_local_command_for_each_engine():
    assert default_launcher("ddp", None) == "torchrun" and default_launcher("horovod", None) == "gloo"
    cmd = local_command(3, "torchrun", ["run", "r.yaml"])
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:4] == ["--standalone", "--nproc-per-node=3", "--no-python"]
    assert cmd[4:] == [sys.executable, "-m", "tsmtrain", "run", "r.yaml"]


def ddp_scripts(tmp_path, **dist):
    srun = render(write_recipe(tmp_path, name="a", dist={"engine": "ddp", **dist},
                               cluster={"nodes": 2, "tasks_per_node": 4, "cpus_per_task": 3}))
    mpirun = render(write_recipe(tmp_path, name="b", dist={"engine": "ddp", **dist},
                                 cluster={"nodes": 2, "tasks_per_node": 4, "launcher": "mpirun"}))
    return srun, mpirun


def test_ddp_job_script_launch_lines(tmp_path):
    srun, mpirun = ddp_scripts(tmp_path)
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=3 \\" in srun and "--mpi=" not in srun
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in srun
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))" in srun
    assert "8 rank(s)" in srun and "engine ddp" in srun
    assert "-x MASTER_ADDR -x MASTER_PORT" in mpirun and "export MASTER_PORT=" in mpirun
    horovod = render(write_recipe(tmp_path, name="c", cluster={"nodes": 2, "tasks_per_node": 4}))
    assert "srun --mpi=pmix --kill-on-bad-exit=1" in horovod and "MASTER_ADDR" not in horovod
    assert header(srun) == {**header(horovod), "--job-name": "a", "--output": header(srun)["--output"],
                            "--cpus-per-task": "3"}
    srun, _ = ddp_scripts(tmp_path, master_addr="head-ib0", master_port=29400)
    assert "export MASTER_ADDR=head-ib0\n" in srun and "export MASTER_PORT=29400\n" in srun


def fake_bin(tmp_path, srun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo nodeA; echo nodeB;\n'
                                      'else echo "$@" > "$LOG_FILE"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_FILE": str(tmp_path / "scontrol"),
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[A-B]", "SLURM_JOB_ID": "12345"}


def test_ddp_job_script_exports_the_rendezvous(tmp_path):
    script, _ = ddp_scripts(tmp_path)
    env = fake_bin(tmp_path, 'echo "ranks meet at $MASTER_ADDR:$MASTER_PORT"')
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"ranks meet at nodeA:{default_master_port(12345)}" in done.stdout
    assert "tsmtrain: DDP ranks meet at nodeA:" in done.stdout


def test_sigterm_to_the_job_script_checkpoints_without_requeue(tmp_path):
    # scancel / preemption: the script and the ranks get SIGTERM; the ranks checkpoint and exit 75;
    # the script does not requeue (Slurm requeues a preempted job itself)
    script = render(write_recipe(tmp_path, name="t"))
    env = fake_bin(tmp_path, 'trap "" TERM\nkill -TERM $PPID\nsleep 1\nexit 75')
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == EXIT_PREEMPTED, done.stdout + done.stderr
    assert "SIGTERM: the ranks checkpoint and stop" in done.stdout and "not requeueing" in done.stdout
    assert not (tmp_path / "scontrol").exists()


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tsmtrain", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("sets, key", [
    (["dist.engine=ddp", "dist.launcher=gloo"], "dist.launcher"),
    (["dist.engine=horovod", "dist.launcher=torchrun"], "dist.launcher"),
    (["dist.engine=ddp", "dist.master_port=80"], "dist.master_port"),
    (["dist.engine=ddp", "dist.master_addr=a b"], "dist.master_addr"),
])
def test_recipe_mistakes_are_one_line(tmp_path, sets, key):
    path = write_recipe(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("")
    done = cli("validate", str(path), *(a for s in sets for a in ("--set", s)), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], done.stderr


def test_missing_torchrun_is_one_line(tmp_path, tiny_demo, monkeypatch):
    from typer.testing import CliRunner

    from tests.conftest import tiny_recipe
    from tsmtrain.cli import app

    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "r", dist={"engine": "ddp"})
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "HOROVOD_RANK"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["run", str(recipe), "--np", "2"])
    assert result.exit_code == 2
    assert "error: dist.engine: ddp: torchrun not found" in result.output


def test_sync_batchnorm_on_one_rank_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    synced = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                    reduce=lambda t: t)
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], SyncBatchNorm)
    x = torch.randn(5, 3, 6, 6)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(2):
        ya, yb = plain(xa), synced(xb)
        assert torch.allclose(ya, yb, atol=1e-5)
    (ya * torch.arange(ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.arange(yb.numel()).view_as(yb)).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-3)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    for a, b in zip(plain.parameters(), synced.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-3)
    plain.eval(), synced.eval()
    assert torch.allclose(plain(x), synced(x), atol=1e-5)


def test_env_prints_what_horovod_was_built_with():
    done = cli("env")
    assert done.returncode == 0, done.stderr
    assert "torch " in done.stdout and "distributed: NCCL" in done.stdout and "Gloo yes" in done.stdout
    decoders = [line for line in done.stdout.splitlines() if line.startswith("video decoder ")]
    assert [line.split()[2].rstrip(":") for line in decoders] == ["torchcodec", "decord", "pynvvideocodec"]
    if not torch.cuda.is_available():  # which GPU decoders work here, and why not
        assert all("GPU (NVDEC) no" in line or "not installed" in line for line in decoders)
        assert any("no CUDA device" in line for line in decoders)
    pytest.importorskip("horovod.torch")
    assert "horovod 0.28.1: NCCL " in done.stdout and "MPI yes, Gloo yes" in done.stdout


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="no nvcc: make setup builds Horovod without NCCL")
def test_horovod_was_built_with_nccl_where_nvcc_exists():
    hvd = pytest.importorskip("horovod.torch")
    assert hvd.nccl_built(), "nvcc is here but Horovod was built without NCCL: run make setup"
    assert hvd.cuda_built() and hvd.gloo_built() and hvd.mpi_built()


def test_sweep_keeps_ddp_in_its_own_directory(tmp_path, tiny_demo):
    from tests.conftest import tiny_recipe
    from tsmtrain.recipe import load_recipe
    from tsmtrain.scaling.sweep import _comparable, plan_sweep

    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "r")
    ddp = load_recipe(path, ["dist.engine=ddp"])
    plan = plan_sweep(ddp, str(path), [1, 2], steps=2, warmup=1, videos=24)
    assert plan.sweep_dir == tmp_path / "runs" / "sweeps" / "r-ddp-weak"
    assert {n: r.dist.engine for n, r in plan.recipes.items()} == {1: "ddp", 2: "ddp"}
    horovod = load_recipe(path)
    assert plan_sweep(horovod, str(path), [2], steps=2, warmup=1, videos=24).sweep_dir.name == "r-weak"
    assert _comparable(ddp) != _comparable(horovod)
    # where the ranks meet does not make points incomparable; the launcher does
    assert _comparable(load_recipe(path, ["dist.master_port=29400", "dist.engine=ddp"])) == _comparable(ddp)
    assert _comparable(load_recipe(path, ["dist.launcher=gloo"])) == _comparable(horovod)
    assert _comparable(load_recipe(path, ["dist.launcher=mpi"])) != _comparable(horovod)
