"""tsmtrain test, predict and fuse on multi-label runs (``model.loss: sigmoid``): per-class sigmoid
probabilities averaged over the views, mAP / GAP@20 / Hit@1 recomputed from the saved scores, and
fusion of multi-label runs (and its refusal to mix one with a single-label run)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_recipe
from tests.test_fusion import error_line, fake_test, invoke
from tests.test_testing import NAMES, FakeRank, KnownLogits
from tsmtrain.data import multi_clip_dataset, read_list
from tsmtrain.data.transforms import TestViews
from tsmtrain.dist.base import LocalEngine
from tsmtrain.models import create_model
from tsmtrain.recipe import load_recipe
from tsmtrain.train.checkpoint import save_checkpoint
from tsmtrain.eval.fusion import SCORES_FILE, fuse_runs, list_fingerprint, load_scores
from tsmtrain.eval.multilabel_metrics import (average_precision, global_average_precision, hit_at_1,
                                              mean_average_precision, multi_hot, multilabel_figures)
from tsmtrain.eval.protocols import (Protocol, average_view_scores, gather_results, load_model, score_part,
                                     summarise_multilabel)

ONE, TWO = "test-1clip-1crop", "test-2clips-1crop"


def _multi_label_lists(demo: Path, out: Path) -> dict[str, Path]:
    """The tiny demo's lists with every other video also carrying the other class of its pair
    (as tests/test_multilabel.py builds them): ``path y`` or ``path y y^1``."""
    lists = {}
    for name in ("train", "val"):
        rows = [line.split() for line in (demo / f"{name}.txt").read_text().splitlines() if line.strip()]
        lists[name] = out / f"{name}.txt"
        lists[name].write_text("".join(f"{p} {y} {int(y) ^ 1}\n" if i % 2 else f"{p} {y}\n"
                                       for i, (p, y) in enumerate(rows)))
    return lists


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_demo):
    """Run A: a tiny multi-label run (MoE head) trained 1 epoch, tested with 1 clip and with 2
    clips; run B: the same recipe with an untrained checkpoint, tested with 1 clip."""
    tmp = tmp_path_factory.mktemp("multilabel_testing")
    lists = _multi_label_lists(tiny_demo, tmp)
    classes = tmp / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    out, recipes = {}, {}
    for name in ("a", "b"):
        path = tiny_recipe(tmp / f"{name}.yaml", tiny_demo, name, dist={"engine": "none"},
                           data={"train_list": str(lists["train"]), "val_list": str(lists["val"]), "workers": 0,
                                 "classes": str(classes)},
                           model={"loss": "sigmoid", "head": "moe", "num_mixtures": 2},
                           schedule={"epochs": 1, "warmup_epochs": 0},
                           train={"batch_size": 4, "threads": 1, "device": "cpu"})
        recipes[name] = recipe = load_recipe(path)
        if name == "a":
            done = invoke("run", path)
            assert done.exit_code == 0, done.output
        else:
            torch.manual_seed(1)
            model = create_model(recipe.model, recipe.data.num_segments)
            save_checkpoint({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json")}, recipe.run_dir, 1)
        for args in ((), ("--clips", 2)) if name == "a" else ((),):
            done = invoke("test", path, *args)
            assert done.exit_code == 0, done.output
            out[name, args] = done.stdout
    return recipes, out, tmp


def _folder(recipe, protocol=ONE) -> Path:
    return recipe.run_dir / "test" / protocol


def _list(recipe):
    records = read_list(recipe.data.val_list, recipe.data.root, recipe.model.num_classes, multi_label=True)
    entries = [line.split() for line in Path(recipe.data.val_list).read_text().splitlines() if line.strip()]
    return records, [e[0] for e in entries], [tuple(int(y) for y in e[1:]) for e in entries]


def test_test_reports_map_recomputed_from_the_saved_scores(runs):
    recipes, out, _ = runs
    recipe = recipes["a"]
    records, paths, labels = _list(recipe)
    assert max(len(y) for y in labels) == 2  # a multi-label list
    folder = _folder(recipe)
    with np.load(folder / SCORES_FILE, allow_pickle=False) as npz:
        assert bool(npz["multi_label"]) and npz["paths"].tolist() == paths
        scores, targets = npz["scores"], npz["labels"]
        assert npz["unreadable_paths"].size == 0 and npz["classes"].tolist() == NAMES
    assert scores.shape == (8, 4) and scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    assert not np.allclose(scores.sum(1), 1, atol=1e-3)  # sigmoid probabilities, not a softmax
    assert np.array_equal(targets, multi_hot(labels, 4))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["multi_label"] is True and summary["videos"] == 8 and summary["unreadable"] == 0
    assert summary["mAP"] == pytest.approx(mean_average_precision(scores, targets), abs=1e-12)
    assert summary["GAP20"] == pytest.approx(global_average_precision(scores, targets), abs=1e-12)
    assert summary["hit1"] == pytest.approx(hit_at_1(scores, targets), abs=1e-12)
    assert "top1" not in summary and "confusion" not in summary
    assert summary["scores"]["list_sha256"] == list_fingerprint(paths, labels)
    assert list_fingerprint(paths, [y[::-1] for y in labels]) == summary["scores"]["list_sha256"]
    per_class = list(csv.DictReader((folder / "per_class.csv").open()))
    assert [r["name"] for r in per_class] == NAMES
    for c, row in enumerate(per_class):
        assert float(row["ap"]) == pytest.approx(average_precision(scores[:, c], targets[:, c] > 0), abs=1e-6)
        assert int(row["videos"]) == targets[:, c].sum()
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert [r["video"] for r in rows] == paths
    assert [r["labels"] for r in rows] == [" ".join(map(str, y)) for y in labels]
    assert rows[1]["label_names"] == "; ".join(NAMES[c] for c in labels[1])
    for row, s in zip(rows, scores):
        assert s[int(row["top1_class"])] == s.max()
        assert [float(row[f"top{i}_score"]) for i in range(1, 5)] == pytest.approx(np.sort(s)[::-1], abs=1e-6)
    assert not (folder / "confusion.png").exists()
    text = out["a", ()]
    assert f"mAP {100 * summary['mAP']:.2f}%  GAP@20 {100 * summary['GAP20']:.2f}%  Hit@1 " in text
    assert "top-1" not in text and "sigmoid probabilities averaged over the views" in text
    assert f"wrote {folder / SCORES_FILE}" in text and "8 videos, 0 unreadable" in text


def test_views_are_averaged_as_probabilities(runs):
    recipe = runs[0]["a"]
    records = _list(recipe)[0]
    model, _ = load_model(recipe, None, torch.device("cpu"))
    dataset = multi_clip_dataset(recipe, records, 2)
    views = TestViews(recipe.data.input_size, 1)
    with torch.no_grad():
        logits = torch.stack([model(views(dataset[i]["frames"][None]).flatten(0, 1)) for i in range(len(records))])
    assert logits.shape == (8, 2, 4)  # 2 views (clips) of each video
    by_hand = (1 / (1 + np.exp(-logits.double().numpy()))).mean(1)
    with np.load(_folder(recipe, TWO) / SCORES_FILE) as npz:
        assert np.allclose(npz["scores"], by_hand, atol=1e-5)
    # known logits: the mean of the sigmoids, not the sigmoid of the mean logit nor a softmax
    ln3 = math.log(3)
    known = torch.tensor([[[0.0, ln3], [ln3, ln3]]])  # (N=1, V=2, K=2)
    assert torch.allclose(average_view_scores(known, "sigmoid"), torch.tensor([[0.625, 0.75]]))
    assert not torch.allclose(average_view_scores(known, "sigmoid"), torch.sigmoid(known.mean(1)), atol=1e-3)
    shard = score_part(KnownLogits([known[0]]), records[:1], recipe, Protocol(2, 1), LocalEngine(),
                        torch.device("cpu"), top=2, videos_per_batch=1)
    assert shard[0]["top"] == [1, 0] and shard[0]["scores"] == pytest.approx([0.75, 0.625])
    assert shard[0]["labels"] == records[0].labels
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        average_view_scores(known, "hinge")


def test_two_ranks_give_the_figures_of_one(runs):
    recipe = runs[0]["a"]
    records = _list(recipe)[0]
    model, _ = load_model(recipe, None, torch.device("cpu"))
    shards = [score_part(model, records, recipe, Protocol(), FakeRank(r, 2), torch.device("cpu")) for r in (0, 1)]
    merged = gather_results(FakeRank(0, 2, shards), shards[0], len(records))
    s = summarise_multilabel(merged, 4)
    saved = json.loads((_folder(recipe) / "summary.json").read_text())
    assert {k: s[k] for k in ("videos", "mAP", "GAP20", "hit1")} == pytest.approx(
        {k: saved[k] for k in ("videos", "mAP", "GAP20", "hit1")}, abs=1e-6)


def test_an_unreadable_video_counts_as_missed():
    def result(labels, scores):
        return {"labels": labels, "class_scores": None if scores is None else np.array(scores),
                "error": None if scores is not None else "v: file not found"}

    results = [result((0,), [0.9, 0.2, 0.1]), result((1, 2), [0.3, 0.6, 0.4]), result((0, 1), None)]
    s = summarise_multilabel(results, 3)
    # class 0: 2 positives, 1 retrieved at rank 1 -> AP 1/2; class 1: 2 positives, 1 at rank 1 -> 1/2;
    # class 2: 1 positive at rank 1 -> 1
    assert [p["ap"] for p in s["per_class"]] == pytest.approx([0.5, 0.5, 1.0])
    assert s["mAP"] == pytest.approx(2 / 3) and s["hit1"] == pytest.approx(2 / 3) and s["unreadable"] == 1
    # GAP@20: pooled 0.9+, 0.6+, 0.4+, 0.3-, 0.2-, 0.1- over 5 positives: (1 + 1 + 1) / 5
    assert s["GAP20"] == pytest.approx(3 / 5)
    assert s["per_class"][0]["unreadable"] == 1 and s["per_class"][2]["unreadable"] == 0
    read = summarise_multilabel(results[:2], 3)  # all read: the figures of the scores themselves
    scores, targets = np.array([[0.9, 0.2, 0.1], [0.3, 0.6, 0.4]]), multi_hot([(0,), (1, 2)], 3)
    assert {k: read[k] for k in ("mAP", "GAP20", "hit1")} == pytest.approx(multilabel_figures(scores, targets))


def test_predict_prints_averaged_sigmoid_probabilities(runs):
    recipes, _, tmp = runs
    recipe = recipes["a"]
    records, paths, _ = _list(recipe)
    done = invoke("predict", tmp / "a.yaml", records[0].path, records[1].path, "--top", "4")
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert "sigmoid probabilities (multi-label) averaged over the views" in lines[0]
    with np.load(_folder(recipe) / SCORES_FILE) as npz:  # the same protocol: 1 clip x 1 crop
        scores = npz["scores"]
    for v in (0, 1):
        block = lines[1 + 5 * v: 6 + 5 * v]
        assert block[0] == f"{records[v].path}:"
        printed = [(float(line.split()[0]), int(line.split()[1])) for line in block[1:]]
        assert sorted(c for _, c in printed) == [0, 1, 2, 3]
        assert [p for p, _ in printed] == sorted((p for p, _ in printed), reverse=True)  # best first
        assert [p for p, _ in printed] == pytest.approx([scores[v][c] for _, c in printed], abs=1e-4)
        assert all(NAMES[c] in line for (_, c), line in zip(printed, block[1:]))


def test_fuse_of_two_multi_label_runs_is_the_weighted_average(runs):
    recipes, _, tmp = runs
    a, b = _folder(recipes["a"], TWO), _folder(recipes["b"])
    done = invoke("fuse", a, b, "--weights", "2,1", "--json", tmp / "fused.json")
    assert done.exit_code == 0, done.output
    sa, sb = load_scores(a), load_scores(b)
    assert sa.multi_label and sb.multi_label and sa.paths == sb.paths
    by_hand = (2 * sa.scores.astype(np.float64) + sb.scores) / 3
    expected = multilabel_figures(by_hand, sa.labels)
    result = json.loads((tmp / "fused.json").read_text())
    assert result["multi_label"] is True and result["videos"] == 8
    assert {k: result["fused"][k] for k in expected} == pytest.approx(expected, abs=1e-9)
    for stream, s in zip(result["streams"], (sa, sb)):
        alone = multilabel_figures(s.scores, s.labels)
        assert {k: stream[k] for k in alone} == pytest.approx(alone, abs=1e-9)
    assert expected != pytest.approx(multilabel_figures(sa.scores, sa.labels))  # the fusion changed something
    assert fuse_runs([a, b], [2, 1])["fused"] == pytest.approx(result["fused"])
    lines = done.stdout.splitlines()
    assert lines[0].endswith("4 classes, multi-label (sigmoid probabilities fused)")
    assert lines[1].split() == ["stream", "weight", "views", "videos", "mAP", "GAP@20", "Hit@1"]
    fused = [f"{100 * expected[k]:.2f}%" for k in ("mAP", "GAP20", "hit1")]
    assert lines[4].split() == ["fused", "8", *fused]


def test_fuse_refuses_a_single_label_run_with_a_multi_label_one(runs):
    recipes, _, tmp = runs
    multi = _folder(recipes["a"])
    _, paths, labels = _list(recipes["a"])
    rng = np.random.default_rng(0)
    single = fake_test(tmp / "single" / "test" / ONE, paths, [y[0] for y in labels],
                       [p / p.sum() for p in rng.random((8, 4))])
    for pair in ((multi, single), (single, multi)):
        line = error_line(invoke("fuse", *pair))
        assert f"{multi} is a multi-label run" in line and f"{single} a single-label one" in line
