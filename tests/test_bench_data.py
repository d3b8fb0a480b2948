"""tsmtrain bench data: the figures are measured on the recipe's own videos and written as the
JSON record that tsmtrain report --data-bench reads."""

import json
import subprocess
import sys

import pytest

from tests.conftest import tiny_recipe
from tsmtrain.bench.data import CLIPS_PER_S_PER_CORE, DataBenchError, bench_data, load_data_bench
from tsmtrain.recipe import load_recipe

pytestmark = pytest.mark.video


def test_bench_data_measures_raw_loader_and_augmentation(tmp_path, tiny_demo):
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "bench"))
    stages = []
    result = bench_data(recipe, "r.yaml", workers=[1, 2], clips=12, target=100.0, rounds=2,
                        on_result=lambda stage, row: stages.append(stage))
    assert stages == ["raw", "loader", "loader", "augment"]
    assert result.clips == 12 and result.videos == 24 and not result.failed
    assert result.raw_clips_per_s > 0 and result.augment_clips_per_s > 0
    assert [row["workers"] for row in result.loader] == [1, 2]
    for row in result.loader:
        assert row["clips"] == 12  # the measured pass reads every clip once
        assert row["clips_per_s_per_worker"] == pytest.approx(row["clips_per_s"] / row["workers"])
        assert row["ratio_to_raw"] == pytest.approx(row["clips_per_s_per_worker"] / result.raw_clips_per_s)
        assert len(row["rounds"]) == 2 and min(row["rounds"]) <= row["clips_per_s"] <= max(row["rounds"])
    assert len(result.raw_rounds) == 2 and result.raw_clips_per_s == pytest.approx(sum(result.raw_rounds) / 2)
    assert result.seek_modes == {"exact": 12}  # not prepared: exact seeking
    record = result.record()
    assert record[CLIPS_PER_S_PER_CORE] == max(row["clips_per_s_per_worker"] for row in result.loader)
    assert record["cores_per_gpu"] == pytest.approx(100.0 / record[CLIPS_PER_S_PER_CORE])
    assert record["frames_per_clip"] == 4 and record["decoder"] == "torchcodec"
    assert record["versions"]["torch"] and record["host"]["cores"] >= 1
    json.dumps(record)  # serialisable as it is


def test_bench_data_leaves_unreadable_videos_out_and_names_them(tmp_path, tiny_demo):
    train = (tiny_demo / "train.txt").read_text().splitlines()
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(train[:3] + [f"{tmp_path / 'broken.mp4'} 0"]) + "\n")
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "bench", data={"train_list": str(lst)}))
    result = bench_data(recipe, workers=[1], clips=8, rounds=2)
    assert result.clips == 6  # 8 clips cycle over 4 videos: the broken one twice
    assert len(result.failed) == 1 and "broken.mp4" in result.failed[0]


def test_bench_data_refuses_bad_arguments(tmp_path, tiny_demo):
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "bench"))
    with pytest.raises(DataBenchError, match="at least 1"):
        bench_data(recipe, workers=[0])
    with pytest.raises(DataBenchError, match="at least 2 clips"):
        bench_data(recipe, clips=1)
    with pytest.raises(DataBenchError, match="at least 1 round"):
        bench_data(recipe, rounds=0)
    gpu = load_recipe(tiny_recipe(tmp_path / "g.yaml", tiny_demo, "bench",
                                  data={"decoder": "pynvvideocodec", "decode_device": "cuda"}))
    with pytest.raises(DataBenchError, match="GPU only.*--set data.decoder=torchcodec"):
        bench_data(gpu)
    nothing = tmp_path / "nothing.txt"
    nothing.write_text(f"{tmp_path / 'missing.mp4'} 0\n")
    bad = load_recipe(tiny_recipe(tmp_path / "b.yaml", tiny_demo, "bench", data={"train_list": str(nothing)}))
    with pytest.raises(DataBenchError, match="fewer than 2"):
        bench_data(bad, workers=[1], clips=4)


def test_load_data_bench_errors_name_the_file(tmp_path):
    with pytest.raises(DataBenchError, match="missing.json.*cannot read"):
        load_data_bench(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n oops")
    with pytest.raises(DataBenchError, match="bad.json:2: not JSON"):
        load_data_bench(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"clips_per_s": 3}))
    with pytest.raises(DataBenchError, match="other.json.*clips_per_s_per_core"):
        load_data_bench(other)


@pytest.mark.slow
def test_cli_bench_data_json_feeds_report_data_ceiling(tmp_path, tiny_demo):
    from tests.test_report import make_sweep, point

    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "bench")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "tsmtrain", "bench", "data", str(recipe), "--workers", "1",
                          "--clips", "6", "--rounds", "1", "--target", "50", "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "loader/raw" in run.stderr and "cores per GPU at 50 clips/s" in run.stderr
    record = load_data_bench(out)
    again = subprocess.run([sys.executable, "-m", "tsmtrain", "bench", "data", str(recipe), "--workers", "1",
                            "--clips", "6", "--rounds", "1", "--against", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"against {out}" in again.stderr and "x" in again.stderr.split("ratio")[-1]

    # the record's rate per core x (42 - 6) loader cores of a Summit node is the model's data ceiling
    sweep = make_sweep(tmp_path / "sweep", [point(1), point(2)])
    report = subprocess.run([sys.executable, "-m", "tsmtrain", "report", str(sweep), "--predict", "1536",
                             "--network", "configs/networks/summit.yaml", "--data-bench", str(out)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    ceiling = record[CLIPS_PER_S_PER_CORE] * 36
    assert f"data ceiling {ceiling:.0f} clips/s per node" in report.stderr
    # a bad record or a missing --predict is a user mistake: exit 2, one line, no traceback
    bad = subprocess.run([sys.executable, "-m", "tsmtrain", "report", str(sweep), "--predict", "1536", "--network",
                          "configs/networks/summit.yaml", "--data-bench", str(tmp_path / "nope.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr
    alone = subprocess.run([sys.executable, "-m", "tsmtrain", "report", str(sweep), "--data-bench", str(out)],
                           capture_output=True, text=True)
    assert alone.returncode == 2 and "--data-bench goes with --predict" in alone.stderr
