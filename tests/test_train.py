"""End-to-end runs of the training loop on the tiny embedded dataset (single process)."""

import json

import pytest
import torch
import yaml

from tests.conftest import run_cli
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tsmtrain.dist.stop import PREEMPTED_FILE
from tsmtrain.models import create_model
from tsmtrain.recipe import load_recipe
from tsmtrain.train import TrainingError, train

pytestmark = pytest.mark.slow


def tiny_recipe(tmp_path, root, name, **overrides):
    doc = {
        "data": {"root": str(root), "train_list": str(root / "train.txt"), "val_list": str(root / "val.txt"),
                 "num_segments": 4, "input_size": 32, "flip": False, "workers": 0},
        "model": {"arch": "resnet18", "num_classes": 4, "dropout": 0.5},
        "optim": {"name": "lars", "base_lr": 0.1, "base_batch": 2, "trust_coefficient": 0.01},
        "schedule": {"epochs": 2, "warmup_epochs": 1, "decay": "cosine"},
        "dist": {"engine": "none"},
        "train": {"batch_size": 4, "log_every": 1, "seed": 1},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_demo):
    """The 12-step run of tiny_recipe (2 epochs, LARS, seed 1): its folder and its TrainResult,
    read by the run-directory test and the exact-resume test's reference."""
    tmp = tmp_path_factory.mktemp("full")
    return tmp, train(tiny_recipe(tmp, tiny_demo, "full"))


def test_run_writes_run_directory(full_run):
    tmp_path, result = full_run
    run_dir = tmp_path / "runs" / "full"
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert result.step == 12 and len(steps) == 12  # 24 clips / 4 per step x 2 epochs
    for key in ("epoch", "step", "loss", "lr", "clips_per_s", "data_wait_fraction", "skipped_videos"):
        assert key in steps[0]
    assert 0 <= steps[0]["data_wait_fraction"] <= 1 and steps[0]["clips_per_s"] > 0
    evals = [r for r in read_metrics(run_dir) if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1] and evals[-1]["val_clips"] == 8
    assert result.eval["clips"] == 8 and 0 <= result.eval["top1"] <= 100
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["arch"] == "resnet18"
    assert "validation" in (run_dir / "train.log").read_text()
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == 12 and state["epoch"] == 2
    assert not list(run_dir.glob(".checkpoint-*"))  # no temporary file left behind
    # linear scaling: peak 0.1 * 4 / 2; warmup over the first epoch rises every step from base_lr
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.1 + 0.1 / 6)
    assert max(lrs) == pytest.approx(0.2) and lrs[-1] < 0.02


def test_resume_continues_exactly(tmp_path, tiny_demo, full_run):
    full_dir, full = full_run  # the uninterrupted run of the same recipe
    part = train(tiny_recipe(tmp_path, tiny_demo, "cut", **{"train.stop_after_steps": 3}))
    assert part.step == 3
    state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "cut"))
    assert (state["step"], state["epoch"], state["micro"]) == (3, 0, 3)
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["skip"] == 3 * 4 and state["sampler"]["size"] == 24
    resumed = train(tiny_recipe(tmp_path, tiny_demo, "cut", **{"data.workers": 1}), resume=True)
    assert resumed.step == full.step
    ref = read_metrics(full_dir / "runs" / "full")
    cut = read_metrics(tmp_path / "runs" / "cut")
    ref_steps = {r["step"]: r for r in ref if "loss" in r}
    after = [r for r in cut if "loss" in r][3:]
    assert after[0]["step"] == 4  # step N+1 after N
    for r in after:
        assert r["lr"] == pytest.approx(ref_steps[r["step"]]["lr"], rel=1e-12)
        assert r["loss"] == pytest.approx(ref_steps[r["step"]]["loss"], rel=1e-5)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_bad_videos_are_skipped_and_counted(tmp_path, tiny_demo):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
    lines = tiny_demo.joinpath("train.txt").read_text()
    listing = tmp_path / "train.txt"
    listing.write_text(f"{tmp_path / 'corrupt.mp4'} 0\n{tmp_path / 'absent.mp4'} 1\n" + lines)
    cfg = tiny_recipe(tmp_path, tiny_demo, "bad", **{"data.train_list": str(listing), "schedule.epochs": 1,
                                                      "schedule.warmup_epochs": 0})
    result = train(cfg)
    assert result.step == 26 // 4
    skipped = sum(r["skipped_videos"] for r in read_metrics(tmp_path / "runs" / "bad") if "loss" in r)
    assert skipped >= 2
    log = (tmp_path / "runs" / "bad" / "train.log").read_text()
    assert "corrupt.mp4" in log and "absent.mp4" in log


def test_dataset_smaller_than_a_batch(tmp_path, tiny_demo):
    with pytest.raises(TrainingError, match="no full global batch"):
        train(tiny_recipe(tmp_path, tiny_demo, "big", **{"train.batch_size": 64}))


def test_resume_without_checkpoint(tmp_path, tiny_demo):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_recipe(tmp_path, tiny_demo, "fresh"), resume=True)


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_the_checkpoint(tmp_path, tiny_demo):
    """A learning rate far too high: the loss goes to inf/NaN within a few steps. The run must end
    with exit 2 and one line (the step, the last finite loss, the checkpoint to resume from), not
    train on to the end with a nan loss and exit 0; no checkpoint with NaN weights is written."""
    tiny_recipe(tmp_path, tiny_demo, "diverge")
    recipe = tmp_path / "diverge.yaml"
    proc = run_cli("run", recipe, "--set", "optim.name=sgd", "--set", "optim.base_lr=1e30",
                   "--set", "schedule.warmup_epochs=0", "--set", "model.dropout=0")  # in this process
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "not finite" in line[0] and "last finite loss" in line[0], proc.stderr[-2000:]
    assert "no checkpoint was written yet" in line[0]
    run_dir = tmp_path / "runs" / "diverge"
    assert latest_checkpoint(run_dir) is None
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert all(loss == loss and abs(loss) != float("inf") for loss in losses)  # only finite losses logged


def test_cli_run_reports_malformed_list_with_line(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 0\nb.mp4 zero\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "train_list": str(listing)},
                                      "model": {"num_classes": 2}, "dist": {"engine": "none"},
                                      "run": {"dir": str(tmp_path / "runs")}}))
    proc = run_cli("run", recipe)
    assert proc.returncode == 2, proc.stderr
    assert f"{listing}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_stop_request_checkpoints_after_the_current_step(tmp_path, tiny_demo, stop_requested):
    result = train(tiny_recipe(tmp_path, tiny_demo, "stop"))
    assert result.preempted and result.step == 1
    run_dir = tmp_path / "runs" / "stop"
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert (state["step"], state["epoch"], state["micro"]) == (1, 0, 1)
    marker = json.loads((run_dir / PREEMPTED_FILE).read_text())  # the launcher's proof of a clean stop
    assert marker["step"] == 1 and marker["checkpoint"] == latest_checkpoint(run_dir).name


def test_stop_request_in_the_last_step_lets_the_run_finish(tmp_path, tiny_demo, stop_requested):
    cfg = tiny_recipe(tmp_path, tiny_demo, "last", **{"train.batch_size": 24, "schedule.epochs": 1,
                                                      "schedule.warmup_epochs": 0})
    (tmp_path / "runs" / "last").mkdir(parents=True)
    (tmp_path / "runs" / "last" / PREEMPTED_FILE).write_text("{}\n")  # from an earlier start
    result = train(cfg)
    assert not result.preempted and result.step == 1 and result.eval["clips"] == 8
    assert not (tmp_path / "runs" / "last" / PREEMPTED_FILE).exists()


def test_stop_signal_handler_is_restored(tmp_path, tiny_demo):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    train(tiny_recipe(tmp_path, tiny_demo, "restore", **{"train.stop_after_steps": 1}))
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGTERM"])
def test_sigterm_and_sigusr2_are_stop_requests(name):
    import os
    import signal
    import time

    from tsmtrain.dist.stop import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), getattr(signal, name))
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == name


def test_sync_bn_alone_and_switched_on_resume(tmp_path, tiny_demo):
    # one process: nothing to synchronize; the checkpoint's weights fit either way
    assert train(tiny_recipe(tmp_path, tiny_demo, "sbn", **{"model.sync_bn": True,
                                                           "train.stop_after_steps": 1})).step == 1
    assert train(tiny_recipe(tmp_path, tiny_demo, "sbn", **{"train.stop_after_steps": 2})).step == 2


def test_resume_refuses_another_model_and_no_resume_refuses_checkpoints(tmp_path, tiny_demo):
    train(tiny_recipe(tmp_path, tiny_demo, "same", **{"train.stop_after_steps": 1}))
    with pytest.raises(TrainingError, match=r"another model \(model.shift_div: 8 there, 4 here\)"):
        train(tiny_recipe(tmp_path, tiny_demo, "same", **{"model.shift_div": 4}))
    with pytest.raises(TrainingError, match="already holds checkpoint-00000001.pt"):
        train(tiny_recipe(tmp_path, tiny_demo, "same"), resume=False)
    assert train(tiny_recipe(tmp_path, tiny_demo, "same", **{"train.stop_after_steps": 2})).step == 2  # resumed


def test_step_time_breakdown_adds_up_to_the_step_time(tmp_path, tiny_demo):
    train(tiny_recipe(tmp_path, tiny_demo, "phases", **{"train.log_every": 2, "train.stop_after_steps": 4,
                                                       "train.allreduce_benchmark": 3}))
    records = read_metrics(tmp_path / "runs" / "phases")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4] and all(r["interval_steps"] == 2 for r in steps)
    for r in steps:
        phases = r["breakdown_s"]
        assert set(phases) == {"data", "augment", "forward_backward", "allreduce_wait", "optimizer", "other"}
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(r["step_time_s"], rel=1e-6)
        assert phases["forward_backward"] > phases["optimizer"]  # a ResNet-18 backward beats an SGD update
        assert r["clips_per_s"] == pytest.approx(4 / r["step_time_s"], rel=1e-6)  # 4 clips per step, 1 rank
    bench = [r["allreduce_benchmark"] for r in records if "allreduce_benchmark" in r]
    assert len(bench) == 1 and bench[0]["repeats"] == 3 and len(bench[0]["times_s"]) == 3
    model_params = sum(p.numel() for p in create_model(tiny_recipe(tmp_path, tiny_demo, "x").model, 4).parameters())
    assert bench[0]["parameters"] == model_params and bench[0]["bytes"] == 4 * model_params


def test_breakdown_off_records_no_phases(tmp_path, tiny_demo):
    train(tiny_recipe(tmp_path, tiny_demo, "plain", **{"train.breakdown": "false", "train.stop_after_steps": 2}))
    steps = [r for r in read_metrics(tmp_path / "runs" / "plain") if "loss" in r]
    assert len(steps) == 2 and all("breakdown_s" not in r and r["step_time_s"] > 0 for r in steps)


def test_fp16_resume_is_bitwise_and_keeps_the_scaler(tmp_path, tiny_demo):
    # fp16 on the CPU, tiny (half-precision convolutions are slow without AVX-512): the first steps
    # overflow and are skipped while the scale comes down, so a resume that lost the scaler's state
    # would skip other steps and end elsewhere
    small = {"train.precision": "fp16", "data.input_size": 8, "data.num_segments": 2, "schedule.epochs": 1,
             "schedule.warmup_epochs": 0}
    full = train(tiny_recipe(tmp_path, tiny_demo, "fp16-ref", **small))
    part = train(tiny_recipe(tmp_path, tiny_demo, "fp16-cut", **small, **{"train.stop_after_steps": 3}))
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "fp16-cut"))["scaler"]
    assert part.step == 3 and scaler["scale"] < 65536.0  # steps were skipped
    resumed = train(tiny_recipe(tmp_path, tiny_demo, "fp16-cut", **small), resume=True)
    assert resumed.step == full.step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    records = [r for r in read_metrics(tmp_path / "runs" / "fp16-ref") if "loss" in r]
    assert all(r["loss_scale"] > 0 for r in records)


def test_compile_failure_stops_the_run_before_training(tmp_path, tiny_demo):
    import os
    import subprocess
    import sys

    path = tmp_path / "compile.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(tiny_demo), "train_list": str(tiny_demo / "train.txt"), "num_segments": 4,
                 "input_size": 32, "workers": 0},
        "model": {"arch": "resnet18", "num_classes": 4}, "dist": {"engine": "none"},
        "train": {"batch_size": 4, "compile": True, "threads": 1}, "run": {"name": "c", "dir": str(tmp_path / "runs")}}))
    # no C++ compiler for inductor, and an empty cache so that nothing compiled earlier is reused
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "tsmtrain", "run", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: train.compile: true: torch.compile failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "set train.compile: false" in proc.stderr
    assert not (tmp_path / "runs" / "c" / "metrics.jsonl").exists()  # no step was taken


class _NoBatchNorm(torch.nn.Module):
    """Clips ``(N, T, 3, H, W)`` -> logits ``(N, K)`` from each frame's mean colour: no
    BatchNorm and no dropout, so a batch's gradient does not depend on how it is split."""

    def __init__(self, num_classes, num_segments):
        super().__init__()
        self.fc = torch.nn.Linear(3 * num_segments, num_classes)

    def forward(self, x):
        return self.fc(x.mean((-1, -2)).flatten(1))


def test_accumulation_on_one_process_averages_the_passes(tmp_path, tiny_demo, monkeypatch):
    """dist.engine none, 2 backward passes of 2 clips per step = 1 pass of 4 clips: same lr (linear
    scaling on the global batch), same steps, same weights (the loop averages, not sums)."""
    from tsmtrain.train import factory

    monkeypatch.setattr(factory, "create_model", lambda cfg, t, channels=3: _NoBatchNorm(cfg.num_classes, t))
    common = {"optim.name": "sgd", "data.scales": "[1.0]", "schedule.epochs": 1}
    whole = train(tiny_recipe(tmp_path, tiny_demo, "whole", **common, **{"train.batch_size": 4}))
    split = train(tiny_recipe(tmp_path, tiny_demo, "split", **common, **{"train.batch_size": 2,
                                                                          "dist.backward_passes_per_step": 2}))
    assert whole.step == split.step == 6  # 24 clips / global batch 4
    lrs = [[r["lr"] for r in read_metrics(tmp_path / "runs" / n) if "loss" in r] for n in ("whole", "split")]
    assert lrs[0] == pytest.approx(lrs[1])
    moved = (whole.model.fc.weight - _NoBatchNorm(4, 4).fc.weight).abs().max()
    assert moved > 1e-3
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
