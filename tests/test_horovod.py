"""Two Horovod ranks on this host: ring-allreduce keeps the replicas identical."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import venv_env
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tsmtrain.models import VideoNet

pytestmark = [pytest.mark.slow, pytest.mark.horovod]
REPO = Path(__file__).resolve().parents[1]

try:
    import horovod.torch  # noqa: F401
except ImportError:  # pragma: no cover - make setup builds it
    pytest.skip("Horovod is not installed (make setup builds it)", allow_module_level=True)


def recipe(tmp_path, root, name, **extra):
    doc = {
        "data": {"root": str(root), "train_list": str(root / "train.txt"), "val_list": str(root / "val.txt"),
                 "num_segments": 4, "input_size": 32, "flip": False, "workers": 0},
        "model": {"arch": "resnet18", "num_classes": 4},
        "optim": {"name": "sgd", "base_lr": 0.05, "base_batch": 8},
        "schedule": {"epochs": 1, "warmup_epochs": 0.5},
        "dist": {"engine": "horovod", "np": 2, **extra},
        "train": {"batch_size": 4, "log_every": 1, "threads": 1},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path




def test_two_ranks_hold_identical_weights(tmp_path, tiny_demo):
    path = recipe(tmp_path, tiny_demo, "hvd", backward_passes_per_step=2)
    out = tmp_path / "weights"
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           str(REPO / "tests" / "horovod_worker.py"), str(path), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    # 24 clips over 2 ranks x 4 clips x 2 backward passes per step = 1.5 -> 1 step
    assert r0["step"] == r1["step"] == 1
    ref = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "hvd"))["model"]
    for name, a in r0["model"].items():
        assert torch.equal(a, r1["model"][name]), name
        assert torch.equal(a, ref[name]), name
    torch.manual_seed(0)  # the initial weights train() builds with seed 0
    init = VideoNet("resnet18", 4, 4, shift=True).state_dict()
    assert not torch.equal(init["fc.weight"], r0["model"]["fc.weight"])  # the step did move them


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is not installed (make setup installs it)")
def test_cli_np2_with_mpirun(tmp_path, tiny_demo):
    path = recipe(tmp_path, tiny_demo, "mpi", launcher="mpi", fp16_allreduce=True)
    proc = subprocess.run([sys.executable, "-m", "tsmtrain", "run", str(path), "--np", "2"],
                          capture_output=True, text=True, timeout=600, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "mpi"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # 24 clips / (2 ranks x 4)
    assert any("val_top1" in r and r["val_clips"] == 8 for r in records)  # both shards evaluated
    assert "final validation top-1" in proc.stdout and proc.stdout.count("final validation") == 1
    assert latest_checkpoint(run_dir) is not None


def step_worker(tmp_path, mode):
    out = tmp_path / mode
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           str(REPO / "tests" / "horovod_step_worker.py"), mode, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


def test_fp16_step_with_inf_on_one_rank_is_skipped_on_both(tmp_path):
    r0, r1 = step_worker(tmp_path, "fp16-inf")
    # step 1: only rank 1's gradients are infinite, but unscale_ sees the averaged ones: both skip
    assert not r0["moved1"] and not r1["moved1"]
    assert r0["scale1"] == r1["scale1"] == 1.0  # 2.0 halved on both
    assert r0["moved2"] and r1["moved2"] and r0["scale2"] == r1["scale2"] == 1.0
    for name, a in r0["model"].items():
        assert torch.equal(a, r1["model"][name]), name


def test_compiled_model_keeps_horovod_gradient_hooks(tmp_path):
    compiled0, compiled1 = step_worker(tmp_path, "compile")
    eager0, _ = step_worker(tmp_path, "eager")
    # every parameter's allreduce was started by its hook during backward, as in eager mode
    assert compiled0["hooks_fired"] == compiled0["parameters"] == eager0["hooks_fired"]
    for name, a in compiled0["model"].items():
        assert torch.equal(a, compiled1["model"][name]), name  # the replicas agree
        assert torch.equal(a, eager0["model"][name]), name  # and took the eager step


def test_two_rank_run_with_compile(tmp_path, tiny_demo):
    path = recipe(tmp_path, tiny_demo, "compiled")
    doc = yaml.safe_load(path.read_text())
    doc["train"].update(compile=True, stop_after_steps=2)
    doc["data"].pop("val_list")  # evaluation runs uncompiled; nothing to learn from it here
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "tsmtrain", "run", str(path)], capture_output=True, text=True,
                          timeout=900, env=venv_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "compiled"
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    assert "compiled" in (run_dir / "train.log").read_text()
