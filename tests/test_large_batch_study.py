"""scripts/large_batch_study.py on a tiny setting: its table and plot hold what the runs measured."""

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def study_module():
    spec = importlib.util.spec_from_file_location("large_batch_study", REPO / "scripts" / "large_batch_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_study_writes_table_and_plot(tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    out = tmp_path / "study"
    runs = study_module().main([
        "--out", str(out), "--data", str(tmp_path / "data"), "--batches", "1,2", "--methods", "lars-knobs",
        "--epochs", "1", "--epochs-per-batch", "2:2", "--clips", "24", "--val-clips", "12", "--parallel", "2",
        "--set", "train.batch_size=2", "--set", "data.num_segments=2", "--set", "train.threads=1",
    ])
    assert [(r.method, r.global_batch) for r in runs] == [("lars-knobs", 2), ("lars-knobs", 4)]
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert [(r["method"], int(r["global_batch"]), int(r["epochs"])) for r in rows] == [
        ("lars-knobs", 2, 1), ("lars-knobs", 4, 2)]  # --epochs-per-batch 2:2
    md = (out / "study.md").read_text()
    finals = {}
    for row in rows:
        run_dir = out / "runs" / f"lars-knobs-x{row['multiple']}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val_top1"] for r in records if "val_top1" in r]
        assert len(vals) == int(row["epochs"])  # one evaluation per epoch
        assert float(row["final_top1"]) == pytest.approx(vals[-1], abs=0.005)
        finals[int(row["multiple"])] = vals[-1]
        steps = max(r["step"] for r in records)
        # accumulation: fewer, larger steps per epoch
        assert int(row["steps"]) == steps == 24 // int(row["global_batch"]) * int(row["epochs"])
        assert f"{vals[-1]:.1f}%" in md and f", {steps} steps" in md
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["label_smoothing"] == 0.1
    assert float(rows[1]["delta_vs_b0"]) == pytest.approx(finals[2] - finals[1], abs=0.01)
    assert float(rows[1]["lr"]) == pytest.approx(2 * float(rows[0]["lr"]))  # linear scaling rule
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report-only rebuilds the same table from the run directories, training nothing
    table = (out / "study.csv").read_text()
    (out / "study.csv").unlink()
    study_module().main(["--out", str(out), "--batches", "1,2", "--methods", "lars-knobs", "--epochs", "1",
                         "--epochs-per-batch", "2:2", "--report-only", "--set", "train.batch_size=2",
                         "--set", "data.num_segments=2"])
    assert (out / "study.csv").read_text() == table


def test_bad_options_name_the_option(tmp_path, capsys):
    study = study_module()
    with pytest.raises(SystemExit, match="--methods: unknown adam"):
        study.parse_args(["--methods", "sgd,adam"])
    with pytest.raises(SystemExit, match="--batches: expected"):
        study.parse_args(["--batches", "1,x"])
    with pytest.raises(SystemExit, match="--epochs: must be at least 1"):
        study.parse_args(["--epochs", "0"])


def test_plan_scales_lr_and_sets_accumulation(tmp_path):
    study = study_module()
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,4,16"])
    runs, _, info = study.plan(args)
    recipe = info["recipe"]
    b0 = recipe.train.batch_size
    assert len(runs) == 9
    for r in runs:
        assert r.global_batch == b0 * r.multiple
        assert r.lr == pytest.approx(recipe.optim.base_lr * r.global_batch / recipe.optim.base_batch)
        assert f"dist.backward_passes_per_step={r.multiple}" in r.overrides
        assert (r.warmup_epochs == 0) == (r.method == "sgd")


def test_report_only_names_a_missing_run(tmp_path):
    study = study_module()
    with pytest.raises(SystemExit, match=r"error: sgd-x1: .*metrics.jsonl not found \(not run yet\?\)"):
        study.main(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--methods", "sgd", "--batches", "1",
                    "--report-only"])


def test_plan_takes_epochs_per_batch_and_64x(tmp_path):
    study = study_module()
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,4,16,64",
                             "--methods", "sgd,lars-knobs", "--epochs-per-batch", "1:4,4:15,16:25,64:36"])
    runs, _, info = study.plan(args)
    b0 = info["recipe"].train.batch_size
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted(f"{m}-x{k}" for m in ("sgd", "lars-knobs") for k in (1, 4, 16, 64))
    clips = 1536  # the default --clips, 12 classes
    for k, epochs in {1: 4, 4: 15, 16: 25, 64: 36}.items():
        r = by_name[f"lars-knobs-x{k}"]
        assert r.global_batch == b0 * k and r.epochs == epochs
        assert r.planned_steps == clips // (b0 * k) * epochs
        assert "train.label_smoothing=0.1" in r.overrides and "optim.lars_exclude=norm_and_bias" in r.overrides
    assert by_name["lars-knobs-x16"].planned_steps == 300  # the minimum at 16xB0
    assert by_name["lars-knobs-x64"].planned_steps == 108
    # explicit epochs keep the warmup that the recipe's rule gives the batch
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,16",
                             "--methods", "lars-warmup", "--epochs-per-batch", "16:25",
                             "--set", "schedule.epochs_per_batch_doubling=1",
                             "--set", "schedule.warmup_epochs_per_batch_doubling=0.5"])
    runs, _, _ = study.plan(args)
    assert [(r.multiple, r.epochs, r.warmup_epochs) for r in runs] == [(1, 4, 1.0), (16, 25, 3.0)]


def test_plan_follows_the_recipes_per_doubling_rule(tmp_path):
    study = study_module()
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,4,16,64",
                             "--methods", "sgd,lars-warmup",
                             "--set", "schedule.epochs_per_batch_doubling=2",
                             "--set", "schedule.warmup_epochs_per_batch_doubling=0.5"])
    runs, _, _ = study.plan(args)
    # the study recipe: 4 epochs, 1 of warmup; each doubling adds 2 and 0.5
    got = {(r.method, r.multiple): (r.epochs, r.warmup_epochs) for r in runs}
    assert got == {("lars-warmup", 1): (4, 1.0), ("lars-warmup", 4): (8, 2.0), ("lars-warmup", 16): (12, 3.0),
                   ("lars-warmup", 64): (16, 4.0),
                   ("sgd", 1): (4, 0.0), ("sgd", 4): (8, 0.0), ("sgd", 16): (12, 0.0), ("sgd", 64): (16, 0.0)}


def test_bad_epochs_per_batch_and_too_few_clips_are_one_line(tmp_path):
    study = study_module()
    with pytest.raises(SystemExit, match="--epochs-per-batch: multiple 8 is not in --batches"):
        study.parse_args(["--batches", "1,4", "--epochs-per-batch", "8:3"])
    with pytest.raises(SystemExit, match="--epochs-per-batch: expected MULTIPLE:EPOCHS"):
        study.parse_args(["--batches", "1,4", "--epochs-per-batch", "4=3"])
    with pytest.raises(SystemExit, match="--epochs-per-batch: expected MULTIPLE:EPOCHS"):
        study.parse_args(["--batches", "1,4", "--epochs-per-batch", "4:0"])
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,64",
                             "--methods", "sgd", "--clips", "48"])
    with pytest.raises(SystemExit, match="--clips 48 gives 48 training clips, fewer than one global batch of 512"):
        study.plan(args)
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,64",
                             "--methods", "lars-warmup", "--epochs-per-batch", "64:1",
                             "--set", "schedule.epochs_per_batch_doubling=1",
                             "--set", "schedule.warmup_epochs_per_batch_doubling=0.5"])
    with pytest.raises(SystemExit, match=r"lars-warmup x64: --set: schedule.warmup_epochs = '4.0': longer than "
                                         r"schedule.epochs \(1\)"):
        study.plan(args)


def test_extra_b0_seeds_are_planned_and_their_spread_tabulated(tmp_path):
    study = study_module()
    with pytest.raises(SystemExit, match="--b0-seeds: expected"):
        study.parse_args(["--b0-seeds", "x"])
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--batches", "1,4",
                             "--methods", "lars-knobs", "--b0-seeds", "1,2"])
    runs, _, _ = study.plan(args)
    assert [r.name for r in runs] == ["lars-knobs-x1", "lars-knobs-x4", "lars-knobs-x1-seed1", "lars-knobs-x1-seed2"]
    assert "train.seed=2" in runs[3].overrides and runs[3].multiple == 1
    for r, top1, steps in zip(runs, [70.0, 68.5, 72.0, 69.0], [768, 192, 768, 768]):
        r.top1, r.steps = [50.0, top1], steps
    study.write_markdown(runs, tmp_path / "study.md", 8)
    md = (tmp_path / "study.md").read_text()
    assert "| 70.0%, 768 steps | 68.5% (-1.5), 192 steps |" in md  # the recipe's seed is the reference
    assert "over 3 seeds: 70.0%, 72.0%, 69.0% (range 3.0 points)" in md
    study.write_csv(runs, tmp_path / "study.csv")
    rows = list(csv.DictReader(open(tmp_path / "study.csv")))
    assert [r["seed"] for r in rows] == ["", "", "1", "2"] and rows[2]["delta_vs_b0"] == "+2.00"
    study.plot(runs, tmp_path / "study.png")  # the extra seeds as crosses at B0
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
