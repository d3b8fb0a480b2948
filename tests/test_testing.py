"""tsmtrain test / predict: multi-clip offsets, test crops, view averaging, sharding over ranks,
label maps, and prediction on demo clips."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_recipe, venv_env
from tsmtrain.data import read_list
from tsmtrain.data.sampling import multi_clip_indices, segment_indices
from tsmtrain.data.transforms import TestViews, VideoTransform, view_boxes, view_side
from tsmtrain.models import create_model
from tsmtrain.recipe.label_map import ClassNamesError, read_class_names
from tsmtrain.recipe import RecipeError, load_recipe
from tsmtrain.train.checkpoint import save_checkpoint
from tsmtrain.eval.evaluate import predict as eval_predict
from tsmtrain.errors import TrainingError
from tsmtrain.eval.protocols import (Protocol, average_view_scores, gather_results, load_model, predict_videos,
                                     run_test, score_part, summarise)
from tsmtrain.dist.base import LocalEngine

NAMES = ["left to right", "right to left", "growing", "shrinking"]


# --------------------------------------------------------------------------- multi-clip offsets

def test_multi_clip_offsets_hand_computed():
    # F=30, T=3: segments of 10 frames; K=2: 1/4 and 3/4 into each segment
    assert multi_clip_indices(30, 3, 2).tolist() == [[2, 12, 22], [7, 17, 27]]
    # F=5, T=4, K=2: seg 1.25; offsets 0.3125 and 0.9375 after starts 0, 1.25, 2.5, 3.75
    assert multi_clip_indices(5, 4, 2).tolist() == [[0, 1, 2, 4], [0, 2, 3, 4]]
    # F=7, T=3, K=3: seg 7/3; offsets seg/6, seg/2, 5 seg/6
    assert multi_clip_indices(7, 3, 3).tolist() == [[0, 2, 5], [1, 3, 5], [1, 4, 6]]
    # K=1 is the segment centre: floor(seg * (t + 1/2)); F=16, T=8 -> 1, 3, ..., 15
    assert multi_clip_indices(16, 8, 1).tolist() == [[1, 3, 5, 7, 9, 11, 13, 15]]
    # a video shorter than T: indices repeat and stay in range
    assert multi_clip_indices(2, 4, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="num_clips"):
        multi_clip_indices(10, 4, 0)


def test_one_clip_is_the_validation_sampling():
    for frames in range(1, 120):
        for segments in (1, 3, 8, 16):
            assert np.array_equal(multi_clip_indices(frames, segments, 1)[0], segment_indices(frames, segments, False))


# --------------------------------------------------------------------------- crops

def test_crop_boxes_hand_computed():
    # 240x320 (landscape), input 224: shorter side to 256 -> 256x341
    size, boxes = view_boxes(240, 320, 224, 1)
    assert size == (256, 341) and boxes == [(16, 58, 224, 224, False)]  # round(16.0), round(58.5) = 58
    size, boxes = view_boxes(240, 320, 224, 3)  # 256x256 squares: step (341 - 256) // 2 = 42
    assert boxes == [(0, 0, 256, 256, False), (0, 42, 256, 256, False), (0, 84, 256, 256, False)]
    size, boxes = view_boxes(240, 320, 224, 10)  # ws = (341 - 224) // 4 = 29, hs = (256 - 224) // 4 = 8
    corners = [(0, 0), (0, 116), (32, 0), (32, 116), (16, 58)]
    assert boxes == [(top, left, 224, 224, f) for top, left in corners for f in (False, True)]
    # portrait 320x240: the three squares run down the long side
    size, boxes = view_boxes(320, 240, 224, 3)
    assert size == (341, 256) and [b[:2] for b in boxes] == [(0, 0), (42, 0), (84, 0)]
    assert view_side(224, 3) == 256 and view_side(224, 10) == 224 and view_side(64, 3) == 73
    with pytest.raises(ValueError, match="1, 3, 10"):
        view_boxes(240, 320, 224, 5)


def test_views_are_those_crops_of_the_pixels():
    # frames of 36x48 at input 32 need no resize (shorter side already int(32 * 256 / 224) = 36);
    # mean 0, std 1/255 leave the pixel values as they are
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 2, 3, 36, 48, 3), dtype=torch.uint8, generator=g)  # N=2, K=2, T=3
    ident = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    frames = x.permute(0, 1, 2, 5, 3, 4).float()  # (N, K, T, 3, H, W)
    ten = TestViews(32, 10, **ident)(x)
    assert ten.shape == (2, 20, 3, 3, 32, 32)
    # view k * 10 + c: clip 1, crop 3 is the flip of the upper-right box, left 4 * ((48 - 32) // 4) = 16
    assert torch.allclose(ten[1, 13], frames[1, 1, :, :, 0:32, 16:48].flip(-1))
    assert torch.allclose(ten[0, 8], frames[0, 0, :, :, 2:34, 8:40])  # centre: top 2 * 1, left 2 * 4
    three = TestViews(32, 3, **ident)(x)
    assert three.shape == (2, 6, 3, 3, 36, 36)  # squares of the shorter side: step (48 - 36) // 2 = 6
    for c, left in enumerate((0, 6, 12)):
        assert torch.allclose(three[1, 3 + c], frames[1, 1, :, :, :, left:left + 36])


def test_one_crop_equals_the_validation_transform():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 1, 4, 50, 70, 3), dtype=torch.uint8, generator=g)
    views = TestViews(32, 1)(x)
    assert torch.equal(views[:, 0], VideoTransform(train=False, input_size=32)(x[:, 0]))


# --------------------------------------------------------------------------- view averaging

def test_average_view_scores_is_the_mean_of_the_softmaxes():
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [ln3, 0.0]], [[0.0, 0.0], [0.0, ln3]]])  # (N=2, V=2, K=2)
    assert torch.allclose(average_view_scores(logits), torch.tensor([[0.5, 0.5], [0.375, 0.625]]))
    # not the softmax of the mean logit (which would be 0.5, 0.5 for video 1 too: ln3 / 2 each)
    with pytest.raises(ValueError):
        average_view_scores(torch.zeros(2, 3))


class KnownLogits(torch.nn.Module):
    """Returns, for call i, the views' logits ``table[i]`` (one video per call)."""

    def __init__(self, table):
        super().__init__()
        self.table, self.calls, self.shapes = table, 0, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        out = self.table[self.calls]
        self.calls += 1
        return out


@pytest.fixture
def recipe(tmp_path, tiny_demo):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "t", data={"workers": 0, "classes": str(classes)},
                       dist={"engine": "none"}, train={"batch_size": 4, "threads": 1, "device": "cpu"})
    return load_recipe(path)


def _checkpoint(recipe) -> Path:
    torch.manual_seed(0)
    model = create_model(recipe.model, recipe.data.num_segments)
    with torch.no_grad():  # an untrained but not uniform classifier
        model.fc.weight.normal_(0, 0.5)
    run_dir = recipe.run_dir
    return save_checkpoint({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json")}, run_dir, 1)


def test_views_of_each_video_are_averaged(recipe):
    records = read_list(recipe.data.val_list, recipe.data.root)[:3]
    protocol = Protocol(clips=2, crops=3)
    g = torch.Generator().manual_seed(3)
    table = [torch.randn(protocol.views, 4, generator=g) * 3 for _ in records]
    model = KnownLogits(table)
    out = score_part(model, records, recipe, protocol, LocalEngine(), torch.device("cpu"), top=4,
                      videos_per_batch=1)
    assert model.shapes == [(6, 4, 3, 36, 36)] * 3  # 2 clips x 3 crops of one video per call, 4 frames each
    for video, result in zip(table, out):
        e = np.exp(video.numpy().astype(np.float64))
        expected = (e / e.sum(1, keepdims=True)).mean(0)
        assert result["top"] == list(np.argsort(-expected))
        assert np.allclose(result["scores"], np.sort(expected)[::-1], atol=1e-6)


# --------------------------------------------------------------------------- ranks

class FakeRank(LocalEngine):
    """Rank ``rank`` of ``size``; allgather returns what ``shards`` holds (every rank's results)."""

    def __init__(self, rank, size, shards=None):
        self.rank, self.size, self.shards = rank, size, shards

    def allgather_object(self, obj, name="object"):
        return self.shards


def test_each_video_counted_once_over_two_ranks(recipe, tmp_path):
    # 7 videos (does not divide by 2), one of them unreadable: reported and counted, not replaced
    root = Path(recipe.data.root)
    lines = (root / "val.txt").read_text().split("\n")[:6] + ["videos/val/missing.mp4 2"]
    (tmp_path / "seven.txt").write_text("\n".join(lines) + "\n")
    records = read_list(tmp_path / "seven.txt", root)
    assert len(records) == 7
    model, _ = load_model(recipe, _checkpoint(recipe), torch.device("cpu"))
    protocol = Protocol(2, 1)
    shards = [score_part(model, records, recipe, protocol, FakeRank(r, 2), torch.device("cpu")) for r in (0, 1)]
    assert [len(s) for s in shards] == [4, 3]
    assert {r["index"] for r in shards[0]}.isdisjoint(r["index"] for r in shards[1])
    merged = gather_results(FakeRank(0, 2, shards), shards[0], len(records))
    assert [r["index"] for r in merged] == list(range(7))
    assert gather_results(FakeRank(1, 2, shards), shards[1], len(records)) is None
    alone = score_part(model, records, recipe, protocol, LocalEngine(), torch.device("cpu"))
    assert [(r["top"], r["error"] is None) for r in merged] == [(r["top"], r["error"] is None) for r in alone]
    assert np.allclose([r["scores"] for r in merged[:6]], [r["scores"] for r in alone[:6]], atol=1e-5)
    assert "missing.mp4" in merged[6]["error"] and merged[6]["top"] == []
    s = summarise(merged, 4)
    assert s["videos"] == 7 and s["unreadable"] == 1 and s["confusion"].sum() == 6
    correct = sum(r["top"][0] == r["label"] for r in merged[:6])
    assert s["top1"] == pytest.approx(100 * correct / 7)  # the unreadable video counts as wrong
    assert s["per_class"][2]["unreadable"] == 1
    with pytest.raises(RuntimeError, match="twice"):
        gather_results(FakeRank(0, 2, [shards[0], shards[0]]), shards[0], len(records))


def test_summarise_mean_class_accuracy():
    results = [{"index": i, "label": y, "top": [p, (p + 1) % 3], "scores": [0.6, 0.4], "error": None}
               for i, (y, p) in enumerate([(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 0)])]
    s = summarise(results, 3)
    assert s["top1"] == pytest.approx(400 / 6)
    assert s["mean_class_accuracy"] == pytest.approx((75 + 50) / 2)  # class 2 has no video: left out
    assert s["per_class"][2]["accuracy"] is None
    assert s["confusion"].tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_one_clip_one_crop_equals_validation(recipe):
    records = read_list(recipe.data.val_list, recipe.data.root)
    model, _ = load_model(recipe, _checkpoint(recipe), torch.device("cpu"))
    tf = VideoTransform(train=False, input_size=recipe.data.input_size, mean=recipe.data.mean, std=recipe.data.std)
    logits = torch.cat([lg for lg, _, _, _ in eval_predict(model, records, recipe, LocalEngine(), "cpu", tf)])
    probs = logits.softmax(1)
    out = score_part(model, records, recipe, Protocol(1, 1), LocalEngine(), torch.device("cpu"), top=4)
    assert [r["top"][0] for r in out] == probs.argmax(1).tolist()
    assert np.allclose([r["scores"][0] for r in out], probs.max(1).values.numpy(), atol=1e-6)


def test_run_test_writes_its_files(recipe):
    _checkpoint(recipe)
    report = run_test(recipe, Protocol(2, 3))
    folder = Path(recipe.run.dir) / "t" / "test" / "test-2clips-3crops"
    assert report.files["predictions"] == folder / "predictions.csv"
    for path in report.files.values():
        assert path.is_file() and path.stat().st_size > 0
    rows = list(csv.DictReader(report.files["predictions"].open()))
    assert len(rows) == 8 and rows[0]["video"].startswith("videos/val/")
    assert rows[0]["label_name"] == NAMES[int(rows[0]["label"])] and rows[0]["top1_name"] in NAMES
    per_class = list(csv.DictReader(report.files["per_class"].open()))
    assert [r["name"] for r in per_class] == NAMES
    assert report.files["confusion"].read_bytes()[:4] == b"\x89PNG"


def test_missing_checkpoint_names_the_run_directory(recipe):
    with pytest.raises(TrainingError, match=r"no checkpoint in the run directory .*runs/t"):
        load_model(recipe, None, torch.device("cpu"))


# --------------------------------------------------------------------------- label maps

def test_label_map_must_match_num_classes(tmp_path, tiny_demo):
    classes = tmp_path / "three.txt"
    classes.write_text("a\nb\nc\n")
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "t", data={"classes": str(classes)})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    (p,) = err.value.problems
    assert p.key == "data.classes" and "three.txt" in p.message
    assert "3 classes" in p.message and "model.num_classes is 4" in p.message
    load_recipe(path, ["model.num_classes=3"])  # matching: fine
    with pytest.raises(ClassNamesError, match=r"three.txt names 3 classes but model.num_classes is 5"):
        read_class_names(classes, 5)


def test_label_map_format(tmp_path):
    f = tmp_path / "map.txt"
    f.write_text("abseiling\nair drumming\n\n")  # trailing blank lines are fine
    assert read_class_names(f) == ["abseiling", "air drumming"]
    f.write_text("a\n\nb\n")
    with pytest.raises(ClassNamesError, match=r"map.txt:2: blank line"):
        read_class_names(f)
    f.write_text("a\nb\na\n")
    with pytest.raises(ClassNamesError, match=r"map.txt:3: .*repeats line 1"):
        read_class_names(f)
    with pytest.raises(ClassNamesError, match="cannot read"):
        read_class_names(tmp_path / "absent.txt")


def test_demo_label_map_fits_the_demo():
    recipe = load_recipe(REPO / "configs" / "demo.yaml", check_files=False)
    names = read_class_names(REPO / recipe.data.classes, recipe.model.num_classes)
    assert len(names) == 4 and "growing" in names


# --------------------------------------------------------------------------- predict

def test_predict_on_a_demo_clip(recipe):
    _checkpoint(recipe)
    records = read_list(recipe.data.val_list, recipe.data.root)
    out, path, names = predict_videos(recipe, [records[0].path, "nowhere.mp4"], Protocol(2, 3), top=3)
    assert names == NAMES and path.name.startswith("checkpoint-")
    assert len(out[0]["top"]) == 3 and out[0]["scores"] == sorted(out[0]["scores"], reverse=True)
    assert 0 < sum(out[0]["scores"]) <= 1 + 1e-6
    assert out[1]["error"] and "nowhere.mp4" in out[1]["error"]
    model, _ = load_model(recipe, None, torch.device("cpu"))
    shard = score_part(model, records[:1], recipe, Protocol(2, 3), LocalEngine(), torch.device("cpu"), top=3)
    assert shard[0]["top"] == out[0]["top"] and np.allclose(shard[0]["scores"], out[0]["scores"], atol=1e-6)


def test_predict_command_prints_class_names(recipe, tmp_path):
    _checkpoint(recipe)
    recipe_file = tmp_path / "r.yaml"
    clip = read_list(recipe.data.val_list, recipe.data.root)[0].path
    from typer.testing import CliRunner

    from tsmtrain.cli import app

    # the CLI in this process (a child costs seconds of imports); an exception escaping it fails here
    done = CliRunner().invoke(app, ["predict", str(recipe_file), clip, "--top", "2", "--set", "data.workers=0"])
    assert done.exit_code == 0 and done.exception is None, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == f"{clip}:" and len(lines) == 4
    assert all(any(n in line for n in NAMES) for line in lines[2:])
    missing = CliRunner().invoke(app, ["test", str(recipe_file), "--set", "run.name=none"])
    assert missing.exit_code == 2 and "no checkpoint in the run directory" in missing.stderr
    assert isinstance(missing.exception, SystemExit) and "Traceback" not in missing.stderr


@pytest.mark.slow
@pytest.mark.horovod
def test_two_ddp_ranks_count_each_video_once(recipe, tmp_path):
    """tsmtrain test --np 2 (torchrun, DDP over Gloo) on 7 videos, one of them unreadable: the
    same predictions as one process, each video once."""
    root = Path(recipe.data.root)
    lines = (root / "val.txt").read_text().split("\n")[:6] + ["videos/val/missing.mp4 2"]
    (tmp_path / "seven.txt").write_text("\n".join(lines) + "\n")
    _checkpoint(recipe)
    out = {}
    for np_ in (1, 2):
        done = subprocess.run([sys.executable, "-m", "tsmtrain", "test", str(tmp_path / "r.yaml"), "--list",
                               str(tmp_path / "seven.txt"), "--clips", "2", "--np", str(np_), "--set", "dist.engine=ddp"],
                              capture_output=True, text=True, cwd=REPO, env=venv_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "7 videos, 1 unreadable" in done.stdout and "missing.mp4" in done.stderr
        assert "top-1 " in done.stdout and "top-5 " in done.stdout and "mean class accuracy " in done.stdout
        assert "wrote " in done.stdout and "confusion.png" in done.stdout
        folder = Path(recipe.run.dir) / "t" / "test" / "test-2clips-1crop-seven"
        out[np_] = list(csv.DictReader((folder / "predictions.csv").open()))
        assert json.loads((folder / "summary.json").read_text())["ranks"] == np_
    assert [r["video"] for r in out[2]] == [line.split()[0] for line in lines]  # each once, in list order
    assert [r["top1_class"] for r in out[2]] == [r["top1_class"] for r in out[1]]
    assert np.allclose([float(r["top1_score"]) for r in out[2][:6]], [float(r["top1_score"]) for r in out[1][:6]],
                       atol=1e-5)
