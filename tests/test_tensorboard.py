"""TensorBoard event files (train.tensorboard): the scalars of metrics.jsonl, read back with
tensorboard's own event reader, on rank 0 only, nothing (and no import) when off."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsmtrain.recipe import load_recipe
from tsmtrain.train import BREAKDOWN, TrainingError, train
from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from tsmtrain.train.metrics_log import MetricsWriter
from tsmtrain.train.tensorboard import TensorBoardSink, check_tensorboard, scalars

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, root, name, **overrides):
    """TSM-ResNet18 at 32x32 on the tiny demo: 6 steps per epoch, 2 epochs, a record per step."""
    doc = {
        "data": {"root": str(root), "train_list": str(root / "train.txt"), "val_list": str(root / "val.txt"),
                 "num_segments": 4, "input_size": 32, "flip": False, "workers": 0},
        "model": {"arch": "resnet18", "num_classes": 4},
        "optim": {"base_lr": 0.1, "base_batch": 4},
        "schedule": {"epochs": 2, "warmup_epochs": 1},
        "dist": {"engine": "none"},
        "train": {"batch_size": 4, "log_every": 1, "threads": 1},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir``'s event files: ``[(step, value), ...]`` as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_from_metrics(records) -> dict[str, dict[int, float]]:
    """The scalars the issue asks for, taken from metrics.jsonl's records (the last per step)."""
    want: dict[str, dict[int, float]] = {}
    for r in records:
        if "loss" in r:
            for key, value in r.items():
                if isinstance(value, (int, float)) and key != "step":
                    want.setdefault(f"train/{key}", {})[r["step"]] = value
            for phase in BREAKDOWN:
                want.setdefault(f"breakdown/{phase}_s", {})[r["step"]] = r["breakdown_s"][phase]
        elif "val_top1" in r:
            for key in ("top1", "top5", "loss", "clips", "skipped_videos"):
                want.setdefault(f"val/{key}", {})[r["step"]] = r[f"val_{key}"]
    return want


def assert_events_match(log_dir, records, evaluated=True):
    got = event_scalars(log_dir)
    want = expected_from_metrics(records)
    for tag in ("train/loss", "train/lr", "train/clips_per_s", "train/data_wait_fraction") + ("val/top1",) * evaluated:
        assert tag in want  # the run logged what the issue names
    assert set(want) <= set(got), set(want) - set(got)
    for tag, by_step in want.items():
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(by_step), tag  # each step once, in order (nothing left from an earlier start)
        for step, value in got[tag]:
            assert value == pytest.approx(by_step[step], rel=1e-6, abs=1e-9), (tag, step)  # float32 in the file


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_demo):
    """One 12-step run with TensorBoard on (the default), a checkpoint at each epoch's end."""
    tmp = tmp_path_factory.mktemp("tb")
    path, recipe = tiny_recipe(tmp, tiny_demo, "tb", **{"train.keep_checkpoints": 3})
    assert recipe.train.tensorboard  # on by default
    result = train(recipe)
    return tmp, path, result


@pytest.mark.slow
def test_event_files_hold_the_scalars_of_metrics_jsonl(full_run):
    tmp, _, result = full_run
    run_dir = tmp / "runs" / "tb"
    assert result.step == 12
    records = metrics(run_dir)
    assert_events_match(run_dir / "tensorboard", records)
    assert len(event_scalars(run_dir / "tensorboard")["val/top1"]) == 2  # one evaluation per epoch


@pytest.mark.slow
def test_resumed_run_continues_the_same_curves(full_run, tiny_demo):
    # a run killed after its epoch-1 checkpoint (step 6) had logged steps 7-12; the new start
    # logs them again into a second event file and TensorBoard shows each step once
    tmp, path, _ = full_run
    copy = tmp / "copy"
    shutil.copytree(tmp / "runs", copy / "runs")
    run_dir = copy / "runs" / "tb"
    latest_checkpoint(run_dir).unlink()
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 6
    result = train(load_recipe(path, [f"run.dir={copy / 'runs'}"]), resume=True)
    assert result.step == 12
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    records = metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # steps 7-12 of the first start dropped
    assert_events_match(run_dir / "tensorboard", records)


@pytest.fixture
def closes(monkeypatch):
    """The log directories of the TensorBoard sinks closed while the test runs."""
    closed, close = [], TensorBoardSink.close

    def spy(self):
        closed.append(self.log_dir)
        close(self)

    monkeypatch.setattr(TensorBoardSink, "close", spy)
    return closed


@pytest.mark.slow
def test_a_failing_run_closes_the_event_file(tmp_path, tiny_demo, monkeypatch, closes):
    import tsmtrain.train.loop as loop

    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate_epoch", fail)
    _, recipe = tiny_recipe(tmp_path, tiny_demo, "fail")
    with pytest.raises(RuntimeError, match="evaluation failed") as failure:
        train(recipe)
    run_dir = tmp_path / "runs" / "fail"
    assert closes == [run_dir / "tensorboard"]
    assert failure.traceback and len(metrics(run_dir)) == 6
    assert_events_match(run_dir / "tensorboard", metrics(run_dir), evaluated=False)


@pytest.mark.slow
def test_a_stopped_run_closes_the_event_file(tmp_path, tiny_demo, stop_requested, closes):
    _, recipe = tiny_recipe(tmp_path, tiny_demo, "stop")
    result = train(recipe)
    assert result.preempted and result.step == 1
    run_dir = tmp_path / "runs" / "stop"
    assert closes == [run_dir / "tensorboard"]
    assert_events_match(run_dir / "tensorboard", metrics(run_dir), evaluated=False)


@pytest.mark.slow
def test_off_writes_nothing_and_imports_nothing_only_rank_0_writes_missing_is_one_line(tmp_path, tiny_demo):
    path, _ = tiny_recipe(tmp_path, tiny_demo, "off")
    code = (
        "import sys\nfrom pathlib import Path\nfrom tsmtrain.recipe import load_recipe\n"
        "from tsmtrain.train import train\nfrom tsmtrain.train.metrics_log import MetricsWriter\n"
        f"train(load_recipe({str(path)!r}, ['train.tensorboard=false', 'train.stop_after_steps=1']))\n"
        f"w = MetricsWriter.for_rank(Path({str(tmp_path / 'rank1')!r}), rank=1, tensorboard=True)\n"
        "w.write(step=1, loss=1.0); w.flush(); w.close()\n"
        "print('tensorboard' in sys.modules, 'torch.utils.tensorboard' in sys.modules)\n"
        # then tensorboard missing, on: `tsmtrain run` says so in one line, exit status 2
        "sys.modules['tensorboard'] = None\nfrom tsmtrain.cli import app\n"
        f"sys.argv = ['tsmtrain', 'run', {str(path)!r}, '--set', 'run.name=missing']\napp()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stdout.split()[-2:] == ["False", "False"]
    run_dir = tmp_path / "runs" / "off"
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "tensorboard").exists()
    assert not (tmp_path / "rank1").exists()  # rank 1 writes neither metrics.jsonl nor events
    assert done.stderr.strip().splitlines()[-1].startswith("error: train.tensorboard: true needs the tensorboard")
    assert "Traceback" not in done.stderr and not (tmp_path / "runs" / "missing").exists()


def test_rank_0_writer_writes_both(tmp_path):
    with MetricsWriter.for_rank(tmp_path, rank=0, tensorboard=True) as w:
        w.write(step=3, epoch=0, loss=1.5, lr=0.01, breakdown_s={"data": 0.25})
        w.write(epoch=0, step=3, val_top1=50.0)
    assert w.tensorboard is None  # closed
    assert len(metrics(tmp_path)) == 2
    got = event_scalars(tmp_path / "tensorboard")
    assert got["train/loss"] == [(3, 1.5)] and got["breakdown/data_s"] == [(3, 0.25)] and got["val/top1"] == [(3, 50.0)]
    assert got["train/lr"] == [(3, pytest.approx(0.01))]


def test_scalars_of_each_kind_of_record():
    train_record = dict(epoch=1, step=7, lr=0.02, loss=0.5, train_top1=75.0, clips_per_s=12.5, skipped_videos=0,
                        breakdown_s={"data": 0.1, "optimizer": 0.2}, loss_scale=65536.0)
    got = dict(scalars(train_record))
    assert "train/step" not in got
    assert got == {"train/epoch": 1, "train/lr": 0.02, "train/loss": 0.5, "train/train_top1": 75.0,
                   "train/clips_per_s": 12.5, "train/skipped_videos": 0, "breakdown/data_s": 0.1,
                   "breakdown/optimizer_s": 0.2, "train/loss_scale": 65536.0}
    val_record = dict(epoch=1, step=12, val_top1=50.0, val_top5=100.0, val_loss=1.2, val_clips=8, val_skipped_videos=1)
    assert dict(scalars(val_record)) == {"val/top1": 50.0, "val/top5": 100.0, "val/loss": 1.2, "val/clips": 8,
                                         "val/skipped_videos": 1}
    bench = dict(step=12, allreduce_benchmark=dict(seconds=0.5, times_s=[0.4, 0.5], repeats=2, bytes=100))
    assert dict(scalars(bench)) == {"allreduce_benchmark/seconds": 0.5, "allreduce_benchmark/repeats": 2,
                                    "allreduce_benchmark/bytes": 100}  # the list stays in metrics.jsonl
    assert scalars(dict(step=1, note="text", flag=True)) == []


def test_missing_tensorboard_names_the_recipe_key(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    check_tensorboard(False)  # off: not looked for
    with pytest.raises(TrainingError, match=r"train\.tensorboard"):
        check_tensorboard(True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(TrainingError, match=r"train\.tensorboard: true needs the tensorboard package"):
        TensorBoardSink(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
