"""dist.engine: ddp on this host, with Gloo on the CPU: torchrun starts the ranks.

Two DDP ranks end identical and equal to two Horovod ranks of the same recipe; gradient
accumulation under no_sync() equals one process accumulating the same micro-batches;
synchronized BatchNorm gives the statistics of the global batch (for both engines); a run
stopped by SIGTERM resumes to exactly the weights of an uninterrupted one.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import dist_worker
from tests.conftest import steps_logged, tiny_recipe, venv_env
from tests.test_horovod import recipe as horovod_recipe
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tsmtrain.dist.stop import EXIT_PREEMPTED

pytestmark = [pytest.mark.slow, pytest.mark.horovod]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def torchrun(*args, np=2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={np}", "--no-python", sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=venv_env(), cwd=REPO)


def horovodrun(*args, np=2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=venv_env(), cwd=REPO)


def test_two_ddp_ranks_are_identical_and_equal_horovod(tmp_path, tiny_demo):
    weights = {}
    for engine, start in (("ddp", torchrun), ("horovod", horovodrun)):
        path = horovod_recipe(tmp_path, tiny_demo, engine, engine=engine)  # 24 clips / (2 ranks x 4) = 3 steps
        out = tmp_path / f"weights-{engine}"
        proc = start(REPO / "tests" / "horovod_worker.py", path, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
        assert r0["step"] == r1["step"] == 3
        for name, a in r0["model"].items():
            assert torch.equal(a, r1["model"][name]), (engine, name)
        weights[engine] = r0["model"]
    for name, a in weights["ddp"].items():
        b = weights["horovod"][name]
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, (a - b).abs().max())
        else:
            assert torch.equal(a, b), name
    torch.manual_seed(0)
    from tsmtrain.models import VideoNet

    init = VideoNet("resnet18", 4, 4, shift=True).state_dict()
    assert not torch.allclose(init["fc.weight"], weights["ddp"]["fc.weight"])  # the steps did move them


@pytest.mark.parametrize("fp16", [False, True])
def test_ddp_accumulation_equals_one_process(tmp_path, fp16):
    out = tmp_path / "acc"
    proc = torchrun(REPO / "tests" / "dist_worker.py", "accumulate-fp16" if fp16 else "accumulate", "ddp", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["buckets"] == dist_worker.STEPS  # one bucket per step: the first pass ran under no_sync()
    # one process: the same 4 micro-batches per step, each loss / 4, one step
    model = dist_worker.small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(dist_worker.STEPS):
        for x, y in dist_worker.micro_batches(step):
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
    exact = True
    for name, p in model.named_parameters():
        assert torch.equal(r0[name], r1[name]), name
        # fp16 compression (DDP's fp16_compress_hook) rounds the averaged gradients to 11 bits
        tol = dict(rtol=1e-2, atol=1e-3) if fp16 else dict(rtol=1e-5, atol=1e-6)
        assert torch.allclose(r0[name], p.detach(), **tol), (name, (r0[name] - p).abs().max())
        exact = exact and torch.allclose(r0[name], p.detach(), rtol=1e-6, atol=1e-7)
    assert exact != fp16  # the compression did happen, and only when asked for
    assert not torch.allclose(r0["0.weight"], dist_worker.small_net()[0].weight)


@pytest.mark.parametrize("engine", ["ddp", "horovod"])
def test_sync_batchnorm_uses_the_global_batch(tmp_path, engine):
    out = tmp_path / "syncbn"
    proc = (torchrun if engine == "ddp" else horovodrun)(REPO / "tests" / "dist_worker.py", "syncbn", engine, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["type"] == "SyncBatchNorm"
    # one process, plain BatchNorm, the whole batch of 6
    net = dist_worker.syncbn_net()
    x_all, weights, parts = dist_worker.syncbn_batch()
    x = x_all.clone().requires_grad_(True)
    y = net(x)
    (y * weights).sum().backward()
    bn = net[1].state_dict()
    for r, part in enumerate(parts):
        for key in ("running_mean", "running_var"):
            assert torch.allclose(ranks[r]["bn"][key], bn[key], rtol=1e-5, atol=1e-6), (r, key)
        assert torch.allclose(ranks[r]["y"], y[part].detach(), rtol=1e-4, atol=1e-5), r
        assert torch.allclose(ranks[r]["x_grad"], x.grad[part], rtol=1e-4, atol=1e-5), r
    for name, p in net.named_parameters():  # local gradients add up to the whole batch's
        assert torch.allclose(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, rtol=1e-4, atol=1e-4), name
    # and plain BatchNorm on one rank's rows would not have given these statistics
    alone = dist_worker.syncbn_net()
    alone(x_all[parts[0]])
    assert not torch.allclose(alone[1].running_mean, bn["running_mean"], atol=1e-3)


def _metrics_lr(run_dir: Path) -> dict:
    return {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "lr" in r}


def test_sigterm_stops_ddp_with_a_checkpoint_and_resume_is_exact(tmp_path, tiny_demo):
    def write(name):
        return tiny_recipe(tmp_path / f"{name}.yaml", tiny_demo, name, schedule={"epochs": 2},
                           dist={"engine": "ddp", "np": 2}, train={"seed": 3})

    cmd = [sys.executable, "-m", "tsmtrain", "run"]
    ref = subprocess.run([*cmd, str(write("ref"))], env=venv_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "rank 1 of 2 (ddp)" in ref.stderr and "--nproc-per-node=2" in ref.stderr

    recipe = write("cut")
    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen([*cmd, str(recipe)], env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    while steps_logged(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as kill and scancel would: a stop request, passed on to the ranks
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "stop requested (SIGUSR2)" in out  # tsmtrain run passes a SIGTERM on to the ranks as SIGUSR2
    state = load_checkpoint(latest_checkpoint(run_dir))
    total = 2 * 24 // 4
    assert 3 <= state["step"] < total
    if state["micro"]:
        assert len(state["rank_buffers"]) == 2

    again = subprocess.run([*cmd, str(recipe)], env=venv_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {state['step']}" in again.stderr
    final_ref = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "ref"))
    final_cut = load_checkpoint(latest_checkpoint(run_dir))
    assert final_cut["step"] == final_ref["step"] == total
    for name, a in final_ref["model"].items():
        assert torch.equal(a, final_cut["model"][name]), name
    assert _metrics_lr(run_dir) == _metrics_lr(tmp_path / "runs" / "ref")
