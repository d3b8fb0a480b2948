"""The check before the first step (tsmtrain.data.preflight; issue 30, item 3): every list of the
recipe and every file its readers will open (tar shards, the shard index, flow files, features),
in `run` before the network is built and in `validate` (skipped with --no-files); `data.root` at
a `prepare --shards` folder; an unreadable validation video counted as wrong, never replaced."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_video, tiny_recipe
from tsmtrain.cli import app
from tsmtrain.data import VideoRecord
from tsmtrain.data.readers.tar import INDEX, ShardIndex

pytestmark = pytest.mark.video


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def no_step_taken(run_dir: Path) -> bool:
    """Nothing trained: no step line in train.log, no metrics, no checkpoint."""
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    return (" step " not in log and not (run_dir / "metrics.jsonl").exists()
            and not list(run_dir.glob("checkpoint-*.pt")))


def _recipe(path: Path, root: Path, lists: Path, name: str, **sections) -> Path:
    """:func:`tiny_recipe` reading ``root`` (a folder, a shard index or a shards folder) with the
    list files in the folder ``lists``; one epoch, no engine."""
    tiny_recipe(path, root, name, dist={"engine": "none"}, schedule={"epochs": 1, "warmup_epochs": 0}, **sections)
    text = path.read_text().replace(f"{root}/train.txt", f"{lists}/train.txt").replace(f"{root}/val.txt",
                                                                                       f"{lists}/val.txt")
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- tar shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny demo (8 train, 4 validation videos) prepared with --shards, one video per shard
    (--shard-size 1), through the CLI; returns (the output folder, what prepare printed)."""
    from tsmtrain.prep.synthetic import generate_demo_dataset

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    demo = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(demo, num_classes=4, train_per_class=2, val_per_class=1, frames=8, size=32)
    out = tmp_path_factory.mktemp("sharded") / "out"
    done = invoke("prepare", "--list", demo / "train.txt", "--list", demo / "val.txt", "--root", demo, "--out", out,
                  "--shards", "--shard-size", "1", "--short-side", "32", "--jobs", "2")
    assert done.exit_code == 0, done.output
    return out, done.stdout


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def test_a_missing_validation_only_shard_stops_the_run_before_the_first_step(sharded, tmp_path):
    """Before: the run trained its first epoch, then stopped at validation with exit 2 and no
    checkpoint (the epoch lost). Now: one error line naming the shard, before any step."""
    copy = _copy(sharded[0], tmp_path)
    index = ShardIndex.load(copy / INDEX)
    val = {line.split()[0] for line in (copy / "val.txt").read_text().splitlines()}
    shard = next(n for n in range(len(index.shards)) if {r for r, s in index.samples.items() if s.shard == n} <= val)
    held = next(r for r, s in index.samples.items() if s.shard == shard)
    index.shard_path(shard).unlink()
    path = _recipe(tmp_path / "r.yaml", copy / INDEX, copy, "valshard")
    result = invoke("run", path)
    assert result.exit_code == 2, result.output
    (line,) = errors(result)
    assert f"shard {index.shard_path(shard)}: missing" in line and "data.val_list" in line and held in line
    assert "Traceback" not in result.output and no_step_taken(tmp_path / "runs" / "valshard")
    # validate finds it too; --no-files (a recipe for another machine) does not look
    assert invoke("validate", path).exit_code == 2 and f"shard {index.shard_path(shard)}" in invoke("validate", path).stderr
    assert invoke("validate", path, "--no-files").exit_code == 0


def test_validate_refuses_a_broken_shard_index_and_videos_it_does_not_hold(sharded, tmp_path):
    copy = _copy(sharded[0], tmp_path)
    path = _recipe(tmp_path / "r.yaml", copy / INDEX, copy, "broken")
    assert invoke("validate", path).exit_code == 0
    (copy / "val.txt").write_text((copy / "val.txt").read_text() + "videos/val/nowhere.mp4 1\n")
    result = invoke("validate", path)
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    assert "data.val_list: 1 of its 5 videos are in no shard" in errors(result)[0] and "nowhere.mp4" in result.stderr
    doc = json.loads((copy / INDEX).read_text())
    del doc["videos"][next(iter(doc["videos"]))]["crc32"]  # a record without a field
    (copy / INDEX).write_text(json.dumps(doc))
    result = invoke("validate", path)
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    assert "malformed shard index" in errors(result)[0] and str(copy / INDEX) in errors(result)[0]
    assert "Traceback" not in result.output
    assert invoke("validate", path, "--no-files").exit_code == 0


def test_data_root_at_the_shards_folder_reads_its_index(sharded, tmp_path):
    """Before: data.root: OUT passed validate and every video failed with "file not found". Now
    it reads OUT/index.json, as data.root: OUT/index.json does, and prepare says to set it."""
    from tsmtrain.data.transforms import VideoTransform
    from tsmtrain.dist.base import LocalEngine
    from tsmtrain.recipe import load_recipe
    from tsmtrain.eval.evaluate import evaluate

    out, printed = sharded
    assert f"set data.root: {out} in the recipe" in printed
    path = _recipe(tmp_path / "r.yaml", out, out, "folder", train={"stop_after_steps": 1})
    assert invoke("validate", path).exit_code == 0
    result = invoke("run", path)  # the first step
    assert result.exit_code == 0, result.output
    assert "unreadable" not in result.stderr and "file not found" not in result.stderr
    metrics = (tmp_path / "runs" / "folder" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("step") == 1 and "loss" in json.loads(line) for line in metrics)
    recipe = load_recipe(path)  # and the validation videos, from the shards
    from tsmtrain.data import read_list

    records = read_list(recipe.data.val_list, recipe.data.root, 4)
    got = evaluate(_Always(0), records, recipe, LocalEngine(), torch.device("cpu"),
                   VideoTransform(train=False, input_size=32))
    assert (got["clips"], got["skipped_videos"], got["top1"]) == (4, 0, 25.0)


# --------------------------------------------------------------------------- optical flow


@pytest.fixture(scope="module")
def flow_prepared(tmp_path_factory):
    """Three small videos prepared with --flow dis: v0, v1 for training, v2 for validation."""
    pytest.importorskip("cv2")
    src = tmp_path_factory.mktemp("flow_src")
    for i in range(3):
        make_video(src / f"v{i}.mp4", frames=10, size=40)
    (src / "train.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
    (src / "val.txt").write_text("v2.mp4 0\n")
    out = tmp_path_factory.mktemp("flow_out") / "out"
    done = invoke("prepare", "--list", src / "train.txt", "--list", src / "val.txt", "--root", src, "--out", out,
                  "--flow", "dis", "--short-side", "40", "--jobs", "1")
    assert done.exit_code == 0, done.output
    return out


def test_a_deleted_flow_file_stops_the_run_before_training(flow_prepared, tmp_path):
    """Before: the validation video whose .flow.mkv was deleted was skipped and replaced at
    run time (changing top-1). Now: one error line naming the flow file, before any step."""
    copy = _copy(flow_prepared, tmp_path)
    flow = copy / "v2.flow.mkv"
    assert flow.is_file()
    flow.unlink()
    path = _recipe(tmp_path / "r.yaml", copy, copy, "flow", data={"modality": "flow", "flow_length": 2,
                                                                  "short_side": 40, "num_segments": 2},
                   train={"batch_size": 1})
    result = invoke("run", path)
    assert result.exit_code == 2, result.output
    (line,) = errors(result)
    assert f"{flow}: missing, the optical flow of {copy / 'v2.mp4'} (data.val_list)" in line
    assert "Traceback" not in result.output and no_step_taken(tmp_path / "runs" / "flow")
    assert invoke("validate", path).exit_code == 2 and str(flow) in invoke("validate", path).stderr
    assert invoke("validate", path, "--no-files").exit_code == 0


# --------------------------------------------------------------------------- features


def test_validate_refuses_a_missing_validation_features_index(tmp_path):
    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "train" / INDEX).write_text(json.dumps({"num_classes": 4, "multi_label": False, "shards": [],
                                                        "dim": 8}))
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    (tmp_path / "val.txt").write_text("b.mp4 1\n")
    path = _recipe(tmp_path / "r.yaml", tmp_path, tmp_path, "head", data={"features": str(features)})
    result = invoke("validate", path)
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    assert f"{features / 'val' / INDEX}: missing, the features of data.val_list" in errors(result)[0]
    assert invoke("validate", path, "--no-files").exit_code == 0
    (features / "val").mkdir()
    (features / "val" / INDEX).write_text(json.dumps({"shards": ["features-00000.npz"]}))
    result = invoke("validate", path)
    assert result.exit_code == 2 and f"{features / 'val' / 'features-00000.npz'}: missing" in result.stderr


# --------------------------------------------------------------------------- validation counts, never replaces


class _Always(torch.nn.Module):
    """Logits that always rank class ``c`` first."""

    def __init__(self, c: int, k: int = 4):
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k)
        out[:, self.c] = 1.0
        return out


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_unreadable_validation_video_counts_as_wrong_and_is_never_replaced(tiny_demo, tmp_path, batch_size):
    """Before: a 2-video list with one unreadable video evaluated the other one twice (top-1 0% or
    100% instead of 50%). Now: the readable one is evaluated once, the other counts as wrong."""
    from tsmtrain.data.transforms import VideoTransform
    from tsmtrain.dist.base import LocalEngine
    from tsmtrain.recipe import load_recipe
    from tsmtrain.eval.evaluate import evaluate

    good = sorted((tiny_demo / "videos" / "val").glob("0_*.mp4"))[0]  # label 0
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 100)
    records = [VideoRecord(str(good), 0), VideoRecord(str(corrupt), 1)]
    recipe = load_recipe(tiny_recipe(tmp_path / "r.yaml", tiny_demo, "v", train={"batch_size": batch_size}))
    result = evaluate(_Always(0), records, recipe, LocalEngine(), torch.device("cpu"),
                      VideoTransform(train=False, input_size=32))
    assert (result["clips"], result["skipped_videos"]) == (2, 1)
    assert result["top1"] == 50.0 and result["top5"] == 50.0  # the readable one right, the unreadable one wrong


# --------------------------------------------------------------------------- the decoder's package


@pytest.mark.parametrize("decoder, extra", [("torchcodec", "torchcodec"), ("decord", "decord")])
def test_a_decoder_that_is_not_installed_is_one_line_before_training(tiny_demo, tmp_path, monkeypatch, decoder, extra):
    """Before: a pip install without the decoder's extra trained until the loader workers failed,
    with a traceback from a worker. Now: validate and run name data.decoder and the extra."""
    module = {"torchcodec": "torchcodec", "decord": "decord"}[decoder]
    path = _recipe(tmp_path / "r.yaml", tiny_demo, tiny_demo, "nodecoder", data={"decoder": decoder})
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    for command in ("validate", "run"):
        result = invoke(command, path)
        assert result.exit_code == 2, result.output
        (line,) = errors(result)
        assert f"data.decoder: {decoder}: the {module} package is not installed" in line
        assert f"tsmtrain[{extra}]" in line and "Traceback" not in result.output
    assert no_step_taken(tmp_path / "runs" / "nodecoder")
    monkeypatch.undo()
    assert invoke("validate", path).exit_code == 0
