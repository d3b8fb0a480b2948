"""Multi-label figures (mAP, GAP@20, Hit@1) against reference computations, and the
Mixture-of-Experts head against its formula (issue 22, parts 2 and 3)."""

import numpy as np
import pytest
import torch

from tsmtrain.models.heads import MoEHead, create_head
from tsmtrain.eval.multilabel_metrics import (average_precision, global_average_precision, hit_at_1,
                                              mean_average_precision, multi_hot, multilabel_figures)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random(seed, videos=60, classes=12):
    rng = np.random.default_rng(seed)
    scores = rng.random((videos, classes))
    targets = (rng.random((videos, classes)) < 0.2).astype(np.float32)
    targets[:, 3] = 0  # a class with no positive video
    targets[0, 3] = 0
    return scores, targets


def _gap_reference(scores, targets, k=20):
    """YouTube-8M's calculate_gap, step by step: top-k of each video, pooled, sorted, AP over all positives."""
    pairs = []
    for s, t in zip(scores, targets):
        for c in sorted(range(len(s)), key=lambda c: -s[c])[:k]:
            pairs.append((s[c], t[c]))
    pairs.sort(key=lambda p: -p[0])
    hits, total, ap = 0, float(targets.sum()), 0.0
    for i, (_, t) in enumerate(pairs, start=1):
        if t:
            hits += 1
            ap += hits / i
    return ap / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_scikit_learn_over_classes_with_positives(seed):
    scores, targets = _random(seed)
    expect = [sklearn_metrics.average_precision_score(targets[:, c], scores[:, c])
              for c in range(scores.shape[1]) if targets[:, c].any()]
    assert len(expect) == scores.shape[1] - 1  # class 3 has no positive: left out
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(expect), abs=1e-12)
    assert np.isnan(average_precision(scores[:, 3], targets[:, 3].astype(bool)))
    assert np.isnan(mean_average_precision(scores, np.zeros_like(targets)))


@pytest.mark.parametrize("seed,k", [(0, 20), (1, 5), (2, 1)])
def test_gap_equals_youtube8m_definition(seed, k):
    scores, targets = _random(seed, videos=40, classes=30)
    assert global_average_precision(scores, targets, k) == pytest.approx(_gap_reference(scores, targets, k), abs=1e-12)
    perfect = targets * 2 + scores * 0.1  # every positive above every negative
    assert global_average_precision(perfect, targets, 30) == pytest.approx(1.0)
    assert global_average_precision(perfect, targets, 1) < 1  # labels beyond a video's top 1 are missed


def test_hit_at_1_and_multi_hot():
    targets = multi_hot([[0, 2], [1], [3], []], 4)
    assert targets.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    scores = np.array([[0.1, 0.2, 0.9, 0], [0.8, 0.1, 0, 0], [0, 0, 0, 0.5], [1, 0, 0, 0]])
    assert hit_at_1(scores, targets) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="label 4 of video 0 outside 0..3"):
        multi_hot([[4]], 4)
    figures = multilabel_figures(scores, targets)
    assert set(figures) == {"mAP", "GAP20", "hit1"} and figures["hit1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(V, K\)"):
        mean_average_precision(scores, targets[:, :3])


def test_moe_probabilities_are_the_formula():
    torch.manual_seed(0)
    head = MoEHead(8, 5, num_mixtures=3)
    x = torch.randn(4, 8)
    g = torch.cat([head.gates(x).view(4, 5, 3), torch.zeros(4, 5, 1)], 2).softmax(2)
    e = torch.sigmoid(head.experts(x).view(4, 5, 3))
    p = (g[..., :3] * e).sum(2)
    assert torch.allclose(head.probabilities(x), p, atol=1e-6)
    assert torch.allclose(torch.sigmoid(head(x)), p, atol=1e-5)
    assert ((p > 0) & (p < 1)).all()


def test_moe_dummy_expert_drives_the_probability_to_zero():
    head = MoEHead(2, 3, num_mixtures=2)
    with torch.no_grad():
        head.gates.weight.zero_()
        head.gates.bias.fill_(-30.0)  # every real gate far below the dummy's 0
        head.experts.weight.zero_()
        head.experts.bias.fill_(10.0)  # experts all but certain
    x = torch.randn(6, 2)
    assert head.probabilities(x).max() < 1e-12
    logit = head(x)
    assert torch.isfinite(logit).all() and (logit < -25).all()  # log-odds stay finite, no log(0)
    with torch.no_grad():
        head.gates.bias.fill_(30.0)  # the real experts take over
    assert head.probabilities(x).min() > 0.99
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x), torch.ones(6, 3))
    loss.backward()
    assert torch.isfinite(head.experts.weight.grad).all()


def test_head_factory():
    assert isinstance(create_head("moe", 4, 3, 2), MoEHead)
    linear = create_head("linear", 4, 3)
    assert linear.weight.abs().max() < 0.01 and linear.bias.abs().max() == 0
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        create_head("mlp", 4, 3)


def test_multi_label_lists(tmp_path):
    from tsmtrain.data import ListFileError, read_list

    good = tmp_path / "train.txt"
    good.write_text("a.mp4 3\nwith space/b.mp4 0 2 5\n# comment\nc.mp4 1 0\n")
    records = read_list(good, "/d", num_classes=6, multi_label=True)
    assert [(r.path, r.label, r.labels) for r in records] == [
        ("/d/a.mp4", 3, (3,)), ("/d/with space/b.mp4", 0, (0, 2, 5)), ("/d/c.mp4", 1, (1, 0))]
    assert read_list(good, "/d", num_classes=6)[1].path == "/d/with space/b.mp4 0 2"  # single-label as before
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 1 1\nb.mp4 2 x\nc.mp4 0 7\n4 5\nd.mp4 2\n")
    with pytest.raises(ListFileError) as err:
        read_list(bad, "/d", num_classes=6, multi_label=True)
    assert err.value.problems == [
        f"{bad}:1: label 1 given twice: 'a.mp4 1 1'",
        f"{bad}:2: label 'x' is not an integer: 'b.mp4 2 x'",
        f"{bad}:3: label 7 outside 0..5: 'c.mp4 0 7'",
    ]


def test_sigmoid_loss_is_binary_cross_entropy_summed_over_classes():
    from tsmtrain.train.step import classification_loss, targets

    torch.manual_seed(0)
    logits = torch.randn(3, 4)
    y = torch.from_numpy(multi_hot([[0, 2], [1], [3]], 4))
    p = torch.sigmoid(logits)
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1).mean()
    assert torch.allclose(classification_loss(logits, y, "sigmoid"), by_hand, atol=1e-6)
    labels = torch.tensor([2, 0, 1])
    assert torch.allclose(classification_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))

    class Cfg:
        loss, num_classes = "sigmoid", 4

    batch = {"label": labels, "labels": [(2, 0), (0,), (1, 3)]}
    assert targets(batch, Cfg).tolist() == [[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1]]
    Cfg.loss = "softmax"
    assert targets(batch, Cfg) is labels


def test_network_with_a_moe_head_scores_the_averaged_features():
    from tsmtrain.models import VideoNet

    torch.manual_seed(0)
    net = VideoNet("resnet18", 5, 4, shift=False, dropout=0.0, head="moe", num_mixtures=3).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        features = net.backbone(x.flatten(0, 1)).view(2, 4, -1).mean(1)
        assert torch.allclose(out, net.fc(features), atol=1e-5)
    assert out.shape == (2, 5) and isinstance(net.fc, MoEHead) and net.fc.gates.out_features == 15


def test_moe_with_softmax_is_refused(tmp_path):
    import yaml

    from tsmtrain.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_list": "l.txt"}, "model": {"num_classes": 4, "head": "moe"}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, check_files=False)
    assert [p.key for p in err.value.problems] == ["model.head"] and "model.loss: sigmoid" in str(err.value)


def test_multi_label_training_reports_map_gap_and_hit(tiny_demo, tmp_path):
    import json

    from typer.testing import CliRunner

    from tests.conftest import tiny_recipe
    from tsmtrain.cli import app
    from tsmtrain.recipe import load_recipe

    lists = {}
    for name in ("train", "val"):  # every video also carries the other member of its pair
        rows = [line.split() for line in (tiny_demo / f"{name}.txt").read_text().splitlines() if line.strip()]
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("".join(f"{p} {y} {int(y) ^ 1}\n" if i % 2 else f"{p} {y}\n"
                                       for i, (p, y) in enumerate(rows)))
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "ml", dist={"engine": "none"},
                       data={"train_list": str(lists["train"]), "val_list": str(lists["val"]), "workers": 0},
                       model={"loss": "sigmoid", "head": "moe", "num_mixtures": 2},
                       schedule={"epochs": 1, "warmup_epochs": 0})
    done = CliRunner().invoke(app, ["run", str(path)])
    assert done.exit_code == 0, done.output
    recipe = load_recipe(path)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_mAP" in r][-1]
    assert 0 < val["val_mAP"] <= 1 and 0 < val["val_GAP20"] <= 1 and 0 <= val["val_hit1"] <= 1
    assert val["val_top1"] == pytest.approx(100 * val["val_hit1"])
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    done = CliRunner().invoke(app, ["test", str(path)])  # (tests/test_multilabel_testing.py checks its figures)
    assert done.exit_code == 0 and "mAP" in done.output, done.output


def test_multilabel_demo_clips_and_lists(tmp_path):
    from tsmtrain.data import read_list
    from tsmtrain.data.decoding import open_video
    from tsmtrain.prep.synthetic import generate_multilabel_dataset, render_multilabel_clip

    rng = np.random.default_rng(0)
    forward = render_multilabel_clip([0], np.random.default_rng(1), frames=8, size=32)
    backward = render_multilabel_clip([1], np.random.default_rng(1), frames=8, size=32)
    assert np.array_equal(forward, backward[::-1])  # one object: the paired class is the same clip reversed
    two = render_multilabel_clip([2, 5], rng, frames=8, size=32)
    assert two.shape == (8, 32, 32, 3) and two.dtype == np.uint8
    with pytest.raises(ValueError, match="distinct classes"):
        render_multilabel_clip([2, 2], rng)
    train, val = generate_multilabel_dataset(tmp_path, train_videos=12, val_videos=4, frames=8, size=32)
    records = read_list(train, tmp_path, 6, multi_label=True)
    assert len(records) == 12 and len(read_list(val, tmp_path, 6, multi_label=True)) == 4
    assert all(1 <= len(r.labels) <= 3 and list(r.labels) == sorted(set(r.labels)) for r in records)
    assert max(len(r.labels) for r in records) > 1
    assert open_video(records[0].path).num_frames == 8
