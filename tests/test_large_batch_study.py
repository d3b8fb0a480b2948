"""scripts/large_batch_study.py on a tiny setting: its table and plot hold what the runs measured."""

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

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
        "--out", str(out), "--data", str(tmp_path / "data"), "--batches", "1,2", "--methods", "lars-warmup",
        "--epochs", "1", "--clips", "24", "--val-clips", "12", "--parallel", "2",
        "--set", "train.batch_size=2", "--set", "data.num_segments=2", "--set", "train.threads=1",
    ])
    assert [(r.method, r.global_batch) for r in runs] == [("lars-warmup", 2), ("lars-warmup", 4)]
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert [(r["method"], int(r["global_batch"])) for r in rows] == [("lars-warmup", 2), ("lars-warmup", 4)]
    md = (out / "study.md").read_text()
    finals = {}
    for row in rows:
        metrics = out / "runs" / f"lars-warmup-x{row['multiple']}" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        vals = [r["val_top1"] for r in records if "val_top1" in r]
        assert len(vals) == 1  # one epoch, one evaluation
        assert float(row["final_top1"]) == pytest.approx(vals[-1], abs=0.005)
        assert f"{vals[-1]:.1f}%" in md
        finals[int(row["multiple"])] = vals[-1]
        steps = max(r["step"] for r in records)
        assert int(row["steps"]) == steps == 24 // int(row["global_batch"])  # accumulation: fewer, larger steps
    assert float(rows[1]["delta_vs_b0"]) == pytest.approx(finals[2] - finals[1], abs=0.01)
    assert float(rows[1]["lr"]) == pytest.approx(2 * float(rows[0]["lr"]))  # linear scaling rule
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report-only rebuilds the same table from the run directories, training nothing
    table = (out / "study.csv").read_text()
    (out / "study.csv").unlink()
    study_module().main(["--out", str(out), "--batches", "1,2", "--methods", "lars-warmup", "--epochs", "1",
                         "--report-only", "--set", "train.batch_size=2", "--set", "data.num_segments=2"])
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
