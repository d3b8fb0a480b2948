"""Late fusion of two-stream results: the scores file ``tsmtrain test`` saves, and ``tsmtrain fuse``
(weighted average of the streams' per-video class scores, checks of the lists and class maps)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tsmtrain.cli import app
from tsmtrain.models import create_model
from tsmtrain.recipe import load_recipe
from tsmtrain.train.checkpoint import save_checkpoint
from tsmtrain.eval.fusion import (SCORES_FILE, FusionError, figures, fuse_runs, fuse_scores, list_fingerprint,
                                  load_scores, parse_weights, write_scores)

NAMES = ["left to right", "right to left", "growing", "shrinking"]

# a hand-computed example: 4 videos shared by two streams, K = 3 classes
PATHS = ["v/0.mp4", "v/1.mp4", "v/2.mp4", "v/3.mp4", "v/4.mp4"]
LABELS = [0, 1, 2, 2, 1]
A = [[0.5, 0.4, 0.1],    # right (0)
     [0.6, 0.3, 0.1],    # wrong (0 for 1)
     [0.2, 0.5, 0.3],    # wrong (1 for 2)
     [0.1, 0.2, 0.7],    # right (2)
     [0.1, 0.8, 0.1]]    # v/4: read by A only
B = [[0.45, 0.5, 0.05],  # wrong (1 for 0)
     [0.1, 0.8, 0.1],    # right
     [0.1, 0.1, 0.8],    # right
     [0.3, 0.3, 0.4],    # right
     None]               # v/4: unreadable in B


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="tsmtrain")


def fake_test(folder: Path, paths, labels, scores, names=None, clips=1, crops=1) -> Path:
    """A test folder as ``tsmtrain test`` writes it: scores.npz and summary.json (with its meta)."""
    folder.mkdir(parents=True)
    k = len(next(s for s in scores if s is not None))
    _, meta = write_scores(folder, paths, labels, [None if s is None else np.array(s) for s in scores], k, names)
    summary = {"protocol": {"clips": clips, "crops": crops}, "list": "val.txt", "scores": meta}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    """Two run directories with one saved test each (stream A: 2 clips x 3 crops, B: 1 x 1)."""
    fake_test(tmp_path / "a" / "test" / "test-2clips-3crops", PATHS, LABELS, A, clips=2, crops=3)
    fake_test(tmp_path / "b" / "test" / "test-1clip-1crop", PATHS, LABELS, B)
    return tmp_path / "a", tmp_path / "b"


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


# --------------------------------------------------------------------------- the scores file

def test_scores_file_format(tmp_path):
    fake_test(tmp_path / "t", PATHS, LABELS, B, names=["x", "y", "z"])
    with np.load(tmp_path / "t" / SCORES_FILE, allow_pickle=False) as npz:
        assert npz["scores"].dtype == np.float32 and npz["scores"].shape == (4, 3)
        assert np.allclose(npz["scores"], B[:4])
        assert npz["labels"].dtype == np.int64 and npz["labels"].tolist() == LABELS[:4]
        assert npz["paths"].tolist() == PATHS[:4]
        assert npz["unreadable_paths"].tolist() == ["v/4.mp4"] and npz["unreadable_labels"].tolist() == [1]
        assert npz["classes"].tolist() == ["x", "y", "z"] and int(npz["num_classes"]) == 3
    meta = json.loads((tmp_path / "t" / "summary.json").read_text())["scores"]
    assert meta["videos"] == 4 and meta["unreadable"] == ["v/4.mp4"] and meta["num_classes"] == 3
    assert meta["list_sha256"] == list_fingerprint(PATHS, LABELS)
    # the fingerprint is of the sorted pairs: the order of the list does not matter, a label does
    assert list_fingerprint(PATHS[::-1], LABELS[::-1]) == meta["list_sha256"]
    assert list_fingerprint(PATHS, [0, 1, 2, 2, 0]) != meta["list_sha256"]
    s = load_scores(tmp_path / "t")
    assert s.entries == dict(zip(PATHS, LABELS)) and s.classes == ["x", "y", "z"] and s.protocol == "1x1"


# --------------------------------------------------------------------------- fusing

def test_fuse_is_the_weighted_average_computed_by_hand(two_runs, tmp_path):
    a, b = two_runs
    fused = fuse_scores([np.array(A[:4]), np.array(B[:4])], [1, 3])
    assert np.allclose(fused[0], [(0.5 + 3 * 0.45) / 4, (0.4 + 3 * 0.5) / 4, (0.1 + 3 * 0.05) / 4])
    assert np.allclose(fused, (np.array(A[:4]) + 3 * np.array(B[:4])) / 4)

    # weights 1, 3: video 0 scores 0.4625 for class 0, 0.475 for class 1: wrong; the others right
    result = fuse_runs([a, b], [1, 3])
    assert result["videos"] == 4 and result["list_videos"] == 5 and result["excluded"] == ["v/4.mp4"]
    sa, sb = result["streams"]
    assert sa["folder"].endswith("test-2clips-3crops") and sa["protocol"] == "2x3" and sb["protocol"] == "1x1"
    assert sa["top1"] == pytest.approx(50.0)  # v/4 (read by A only) is left out
    assert sa["mean_class_accuracy"] == pytest.approx((100 + 0 + 50) / 3)
    assert sb["top1"] == pytest.approx(75.0) and sb["mean_class_accuracy"] == pytest.approx((0 + 100 + 100) / 3)
    assert result["fused"]["top1"] == pytest.approx(75.0)
    assert result["fused"]["mean_class_accuracy"] == pytest.approx(200 / 3)
    assert result["fused"]["top5"] == 100.0  # K = 3: top-3

    # weights 1, 1: video 0 scores 0.475 for class 0, 0.45 for class 1: every video right
    out = invoke("fuse", a, b, "--json", tmp_path / "f.json")
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["fused"]["top1"] == 100.0 and saved["fused"]["mean_class_accuracy"] == 100.0
    assert [s["weight"] for s in saved["streams"]] == [1.0, 1.0]
    lines = out.stdout.splitlines()
    assert lines[0] == "2 runs, 4 videos read in every run (of 5 in the list val.txt), 3 classes"
    assert lines[1] == "excluded (unreadable in some run): v/4.mp4"
    assert lines[2].split() == ["stream", "weight", "views", "videos", "top-1", "top-3", "mean", "class"]
    assert lines[3].split() == [str(a), "1", "2x3", "4", "50.00%", "100.00%", "50.00%"]
    assert lines[4].split() == [str(b), "1", "1x1", "4", "75.00%", "100.00%", "66.67%"]
    assert lines[5].split() == ["fused", "4", "100.00%", "100.00%", "100.00%"]
    assert lines[6] == f"wrote {tmp_path / 'f.json'}"


def test_top5_and_mean_class_accuracy_against_numpy():
    g = np.random.default_rng(0)
    sa, sb = g.random((40, 9)), g.random((40, 9))
    labels = g.integers(0, 9, 40)
    fused = fuse_scores([sa, sb], [0.4, 1.2])
    assert np.allclose(fused, (0.4 * sa + 1.2 * sb) / 1.6)
    f = figures(fused, labels, 9)
    rank = (fused > fused[np.arange(40), labels][:, None]).sum(1)  # classes scored above the true one
    assert f["top1"] == pytest.approx(100 * np.mean(rank == 0))
    assert f["top5"] == pytest.approx(100 * np.mean(rank < 5))
    per_class = [np.mean(rank[labels == c] == 0) for c in range(9) if (labels == c).any()]
    assert f["mean_class_accuracy"] == pytest.approx(100 * np.mean(per_class))
    assert f["videos"] == 40


# --------------------------------------------------------------------------- refusals

def test_different_lists_are_refused_naming_the_difference(tmp_path):
    a = fake_test(tmp_path / "a", PATHS, LABELS, A)
    b = fake_test(tmp_path / "b", PATHS[:4] + ["v/9.mp4"], LABELS, A)
    with pytest.raises(FusionError, match=r"different lists: 1 videos only in .*a, e\.g\. v/4\.mp4; "
                                          r"1 videos only in .*b, e\.g\. v/9\.mp4"):
        fuse_runs([a, b])
    line = error_line(invoke("fuse", a, b))
    assert f"{a} and {b} were tested on different lists" in line and "v/9.mp4" in line
    c = fake_test(tmp_path / "c", PATHS, [0, 1, 2, 2, 0], A)
    line = error_line(invoke("fuse", a, c))
    assert "different lists: 1 videos labelled differently, e.g. v/4.mp4 (1 in" in line


def test_different_class_maps_are_refused(tmp_path):
    a = fake_test(tmp_path / "a", PATHS, LABELS, A)
    four = fake_test(tmp_path / "four", PATHS, LABELS, [s + [0.0] for s in A])
    line = error_line(invoke("fuse", a, four))
    assert f"{a} and {four} were tested with different class maps: 3 classes in {a}, 4 in {four}" in line
    named = fake_test(tmp_path / "named", PATHS, LABELS, A, names=["x", "y", "z"])
    other = fake_test(tmp_path / "other", PATHS, LABELS, A, names=["x", "w", "z"])
    line = error_line(invoke("fuse", named, other))
    assert "different class maps: 1 classes named differently, e.g. class 1 is 'y' in" in line
    assert invoke("fuse", a, named).exit_code == 0  # names on one side only: the same K is all we know


def test_user_mistakes_are_one_error_line(two_runs, tmp_path):
    a, b = two_runs
    assert "2 weights for 3 runs" in error_line(invoke("fuse", a, b, a, "--weights", "1,2"))
    assert "expected numbers" in error_line(invoke("fuse", a, b, "--weights", "1,x"))
    assert "not all 0" in error_line(invoke("fuse", a, b, "--weights", "0,0"))
    assert "at least two runs" in error_line(invoke("fuse", a))
    (tmp_path / "untested").mkdir()
    line = error_line(invoke("fuse", a, tmp_path / "untested"))
    assert "untested has no saved test scores: run `tsmtrain test` on its recipe first" in line
    old = tmp_path / "old" / "test" / "test-1clip-1crop"
    old.mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    assert "has no scores.npz (tested before test scores were saved)" in error_line(invoke("fuse", a, old.parents[1]))
    assert "no such run directory" in error_line(invoke("fuse", a, tmp_path / "absent"))
    assert "no test folder test-9clips" in error_line(invoke("fuse", a, b, "--test-dir", "test-9clips"))
    (a / "test" / "test-2clips-3crops" / SCORES_FILE).write_bytes(b"not a zip")
    assert "not a tsmtrain scores file" in error_line(invoke("fuse", a, b))
    with pytest.raises(FusionError):
        parse_weights("1,-1", 2)


def test_labels_out_of_range_are_one_error_line_naming_the_file_and_video(two_runs):
    """issue 30: `fuse` of score files whose labels are out of range gave a traceback."""
    a, b = two_runs
    bad = fake_test(b.parent / "bad" / "test" / "test-1clip-1crop", PATHS, [0, 1, 7, 2, 1], B)
    line = error_line(invoke("fuse", a, bad.parents[1]))
    assert f"{bad / SCORES_FILE}: labels: the label video 'v/2.mp4' is 7, outside 0..2 (num_classes 3)" in line
    lost = fake_test(b.parent / "lost" / "test" / "test-1clip-1crop", PATHS, [0, 1, 2, 2, -1], B)
    line = error_line(invoke("fuse", a, lost.parents[1]))
    assert "unreadable_labels: the label video 'v/4.mp4' is -1, outside 0..2" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_one_error_line_naming_the_file_and_value(two_runs, value):
    """issue 30: `fuse` accepted NaN or inf scores (and reported figures computed from them)."""
    a, b = two_runs
    scores = [list(row) if row else row for row in B]
    scores[1][2] = value
    bad = fake_test(b.parent / "bad" / "test" / "test-1clip-1crop", PATHS, LABELS, scores)
    line = error_line(invoke("fuse", a, bad.parents[1]))
    assert f"{bad / SCORES_FILE}: the score of class 2 of video 'v/1.mp4' is {np.float32(value)}" in line
    assert "(1 scores not finite)" in line

def test_latest_test_or_the_named_one(two_runs):
    a, b = two_runs
    newer = fake_test(a / "test" / "test-1clip-1crop", PATHS, LABELS, B)
    assert fuse_runs([a, b])["streams"][0]["folder"] == str(newer)
    assert fuse_runs([a, b], test_dir="test-1clip-1crop")["streams"][0]["protocol"] == "1x1"
    older = fuse_runs([a / "test" / "test-2clips-3crops", b])["streams"][0]
    assert older["protocol"] == "2x3" and older["top1"] == pytest.approx(50.0)


# --------------------------------------------------------------------------- tsmtrain test saves the scores

@pytest.fixture(scope="module")
def tested(tmp_path_factory, tiny_demo):
    """A tiny run (an untrained but not uniform classifier) tested by ``tsmtrain test`` three times:
    1 clip x 1 crop on the validation list, then 2 clips and 1 clip on it plus a missing video."""
    tmp = tmp_path_factory.mktemp("fusion_run")
    classes = tmp / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    path = tiny_recipe(tmp / "r.yaml", tiny_demo, "t", data={"workers": 0, "classes": str(classes)},
                       dist={"engine": "none"}, train={"batch_size": 4, "threads": 1, "device": "cpu"})
    recipe = load_recipe(path)
    torch.manual_seed(0)
    model = create_model(recipe.model, recipe.data.num_segments)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.5)
    save_checkpoint({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json")}, recipe.run_dir, 1)
    plus = tmp / "plus.txt"
    plus.write_text(Path(recipe.data.val_list).read_text().rstrip("\n") + "\nvideos/val/missing.mp4 2\n")
    for args in ((), ("--list", plus, "--clips", 2), ("--list", plus)):
        done = invoke("test", path, *args)
        assert done.exit_code == 0, done.output
    return recipe, plus


def test_tsmtrain_test_writes_the_scores(tested):
    recipe, _ = tested
    folder = recipe.run_dir / "test" / "test-1clip-1crop"
    lines = [line.split() for line in Path(recipe.data.val_list).read_text().splitlines() if line.strip()]
    with np.load(folder / SCORES_FILE, allow_pickle=False) as npz:
        scores, labels, paths = npz["scores"], npz["labels"], npz["paths"].tolist()
        assert npz["classes"].tolist() == NAMES and npz["unreadable_paths"].size == 0
    assert scores.shape == (8, 4) and scores.dtype == np.float32
    assert paths == [p for p, _ in lines] and labels.tolist() == [int(y) for _, y in lines]
    assert np.allclose(scores.sum(1), 1, atol=1e-5)
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    for row, s in zip(rows, scores):
        assert row["video"] in paths
        for i in range(1, 5):
            assert float(row[f"top{i}_score"]) == pytest.approx(s[int(row[f"top{i}_class"])], abs=1e-6)
        assert int(row["top1_class"]) == int(np.argmax(s))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["scores"]["list_sha256"] == list_fingerprint([p for p, _ in lines], [int(y) for _, y in lines])
    assert summary["scores"]["num_classes"] == 4 and summary["scores"]["videos"] == 8
    assert summary["protocol"]["clips"] == 1 and summary["list"] == recipe.data.val_list


def test_fuse_two_tests_of_a_run(tested):
    recipe, plus = tested
    tests = recipe.run_dir / "test"
    two, one = tests / "test-2clips-1crop-plus", tests / "test-1clip-1crop-plus"
    with np.load(two / SCORES_FILE) as npz:
        assert npz["scores"].shape == (8, 4) and npz["unreadable_paths"].tolist() == ["videos/val/missing.mp4"]
    assert json.loads((two / "summary.json").read_text())["scores"]["unreadable"] == ["videos/val/missing.mp4"]
    result = fuse_runs([two, one], [2, 1])
    assert result["videos"] == 8 and result["excluded"] == ["videos/val/missing.mp4"]
    sa, sb = load_scores(two), load_scores(one)
    expected = figures((2 * sa.scores.astype(np.float64) + sb.scores) / 3, sa.labels, 4)
    assert result["fused"] == pytest.approx(expected)
    alone = figures(sb.scores, sb.labels, 4)
    assert {k: result["streams"][1][k] for k in alone} == pytest.approx(alone)
    # the validation list without the missing video is another list
    line = error_line(invoke("fuse", tests / "test-1clip-1crop", one))
    assert "different lists: 1 videos only in" in line and "videos/val/missing.mp4" in line
    # a run directory stands for its latest test: the last one written
    assert fuse_runs([recipe.run_dir, two])["streams"][0]["folder"] == str(one)
