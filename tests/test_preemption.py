"""Stop on SIGUSR2 and resume, without Slurm: two ranks under mpirun on this host.

The ranks agree to stop through an allreduce, rank 0 writes a mid-epoch checkpoint with every
rank's BatchNorm statistics, the run exits with EXIT_PREEMPTED, and running the same command
again continues to exactly the weights of a run that was never interrupted.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tests.conftest import run_child, steps_logged, tiny_recipe, venv_env
from tsmtrain.dist.stop import EXIT_PREEMPTED

pytestmark = [pytest.mark.slow, pytest.mark.horovod]

try:
    import horovod.torch  # noqa: F401
except ImportError:  # pragma: no cover - make setup builds it
    pytest.skip("Horovod is not installed (make setup builds it)", allow_module_level=True)


def write_recipe(tmp_path, root, name):
    return tiny_recipe(tmp_path / f"{name}.yaml", root, name, schedule={"epochs": 2},
                       dist={"np": 2, "launcher": "mpi"}, train={"seed": 3})


def run(recipe, **kw):
    return run_child([sys.executable, "-m", "tsmtrain", "run", str(recipe)], timeout=600, env=venv_env(), **kw)


def test_sigusr2_checkpoints_and_resume_equals_uninterrupted(tmp_path, tiny_demo):
    ref = run(write_recipe(tmp_path, tiny_demo, "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    recipe = write_recipe(tmp_path, tiny_demo, "cut")
    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "tsmtrain", "run", str(recipe)], env=venv_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while steps_logged(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "stop requested" in out
    state = load_checkpoint(latest_checkpoint(run_dir))
    total = 2 * 24 // 4
    assert 3 <= state["step"] < total
    if state["micro"]:  # stopped mid-epoch: both ranks' BatchNorm statistics are kept
        assert len(state["rank_buffers"]) == 2
        assert any(not torch.equal(a, state["rank_buffers"][1][k]) for k, a in state["rank_buffers"][0].items())

    again = run(recipe)  # resumes by itself
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {state['step']}" in again.stderr
    final_ref = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "ref"))
    final_cut = load_checkpoint(latest_checkpoint(run_dir))
    assert final_cut["step"] == final_ref["step"] == total
    for name, a in final_ref["model"].items():
        assert torch.equal(a, final_cut["model"][name]), name
    ref_lr = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "runs/ref/metrics.jsonl").read_text().splitlines()) if "lr" in r}
    cut_lr = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert cut_lr == ref_lr
