"""tsmtrain extract and data.features: every video's features once, in shards with an index,
resumable, the same on 2 ranks; a head trained on them equals the same head trained end to end
on the same clips with the backbone frozen; bad feature folders refused with one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, tiny_recipe, venv_env
from tsmtrain.data.readers.features import FeatureDataset, read_index, read_feature_file

pytestmark = pytest.mark.slow  # each trains or extracts through the CLI
REPO = Path(__file__).resolve().parents[1]


def _tsmtrain(*args, code=0, timeout=600) -> subprocess.CompletedProcess:
    """``tsmtrain ARGS`` with exit status ``code``: in this process (a child costs seconds of imports),
    except with ``--np``, whose ranks a launcher starts; a traceback that escaped ends up in stderr."""
    if "--np" in args:
        proc = subprocess.run([sys.executable, "-m", "tsmtrain", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=venv_env(), cwd=REPO)
    else:
        proc = run_cli(*args)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    """A tiny run trained for 2 steps (its checkpoint is what extract reads) and its recipe."""
    tmp = tmp_path_factory.mktemp("features")
    path = tiny_recipe(tmp / "r.yaml", tiny_demo, "r", dist={"engine": "none"}, data={"workers": 0},
                       train={"stop_after_steps": 2})
    _tsmtrain("run", path)
    return tmp, path


def _extract(path, out, *extra):
    return _tsmtrain("extract", path, "--out", out, "--shard-videos", "5", *extra)


def test_extract_writes_every_video_once_in_float16_shards(trained):
    tmp, path = trained
    out = tmp / "f1"
    done = _extract(path, out)
    assert "train: 24 videos, 5 shards (5 extracted, 0 kept)" in done.stdout
    for split, videos in (("train", 24), ("val", 8)):
        index = read_index(out / split)
        assert index["videos"] == videos and index["dim"] == 512 and index["dtype"] == "float16"
        assert index["shards"] == [f"features-{s:05d}.npz" for s in range((videos + 4) // 5)]
        lines = np.concatenate([read_feature_file(out / split / name)["index"] for name in index["shards"]])
        assert sorted(lines.tolist()) == list(range(videos))  # every video exactly once
        assert all(read_feature_file(out / split / n)["features"].dtype == np.float16 for n in index["shards"])
        assert index["unreadable"] == []
    labels = [int(line.split()[1]) for line in Path(json.loads((out / "train" / "index.json").read_text())["list"])
              .read_text().splitlines()]
    assert FeatureDataset(out / "train").labels == [(y,) for y in labels]


def test_extract_resumes_keeping_complete_shards(trained):
    tmp, path = trained
    out = tmp / "f2"
    _extract(path, out)
    before = {p.name: read_feature_file(p)["features"] for p in (out / "train").glob("features-*.npz")}
    (out / "train" / "features-00001.npz").unlink()  # never written
    damaged = out / "train" / "features-00003.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a write cut short (not renamed in real life)
    (out / "train" / "index.json").unlink()
    done = _extract(path, out)
    assert "train: 24 videos, 5 shards (2 extracted, 3 kept)" in done.stdout
    assert "val: 8 videos, 2 shards (0 extracted, 2 kept)" in done.stdout
    for name, value in before.items():
        assert np.array_equal(read_feature_file(out / "train" / name)["features"], value), name


def test_two_ranks_extract_the_features_of_one(trained):
    tmp, path = trained
    _extract(path, tmp / "one")
    _extract(path, tmp / "two", "--np", "2", "--set", "dist.engine=ddp")
    for split in ("train", "val"):
        a, b = FeatureDataset(tmp / "one" / split), FeatureDataset(tmp / "two" / split)
        assert torch.equal(a.features, b.features) and a.labels == b.labels


def test_head_on_features_equals_the_head_trained_end_to_end_with_a_frozen_backbone(trained):
    from tsmtrain.data import collate_views, multi_clip_dataset, read_list
    from tsmtrain.data.modality import modality_of
    from tsmtrain.data.transforms import TestViews
    from tsmtrain.models import FeatureClassifier
    from tsmtrain.optim import create_optimizer
    from tsmtrain.recipe import OptimConfig, load_recipe
    from tsmtrain.train import TrainStep
    from tsmtrain.eval.protocols import load_model

    tmp, path = trained
    out = tmp / "f32"
    _extract(path, out, "--dtype", "float32")
    recipe = load_recipe(path)
    features = FeatureDataset(out / "train")
    cpu = torch.device("cpu")
    # end to end: the same clips' views through the network, its backbone frozen, a fresh head
    net, _ = load_model(recipe, None, cpu)
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    net.dropout.p = 0.0
    records = read_list(recipe.data.train_list, recipe.data.root, 4)
    clips = collate_views([multi_clip_dataset(recipe, records, 1)[i] for i in range(len(records))])["frames"]
    x = TestViews(recipe.data.input_size, 1, modality=modality_of(recipe.data))(clips)[:, 0]  # (24, T, 3, S, S)
    y = torch.tensor([r.label for r in records])
    head_only = FeatureClassifier(512, 4, dropout=0.0)
    torch.nn.init.normal_(net.fc.weight, 0, 0.01)
    head_only.fc.load_state_dict(net.fc.state_dict())
    cfg = OptimConfig(base_lr=0.5)
    end_to_end = TrainStep(net, cpu, optimizer=create_optimizer(net, cfg))
    on_features = TrainStep(head_only, cpu, optimizer=create_optimizer(head_only, cfg))
    for step in range(3):
        a = end_to_end(x, y, step=step).loss.item()
        b = on_features(features.features, y, step=step).loss.item()
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(net.fc.weight, head_only.fc.weight, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(net.fc.bias, torch.zeros(4))  # the head did train


def test_training_the_head_on_features_reports_validation_and_saves_only_the_head(trained):
    from tsmtrain.train.checkpoint import latest_checkpoint, load_checkpoint

    tmp, path = trained
    out = tmp / "f3"
    _extract(path, out)
    _tsmtrain("run", path, "--set", f"data.features={out}", "--set", "run.name=head", "--set", "train.batch_size=8",
              "--set", "train.stop_after_steps=null", "--set", "schedule.epochs=3")
    run_dir = tmp / "runs" / "head"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_top1" in r]
    assert len(val) == 3 and val[-1]["val_clips"] == 8
    assert [r["step"] for r in records if "loss" in r][-1] == 9  # 24 videos / 8, 3 epochs
    weights = load_checkpoint(latest_checkpoint(run_dir))["model"]
    assert sorted(weights) == ["fc.bias", "fc.weight"] and weights["fc.weight"].shape == (4, 512)
    # tsmtrain test puts the head on the backbone the features came from and scores the videos
    _tsmtrain("test", path, "--set", f"data.features={out}", "--set", "run.name=head")
    summary = json.loads((run_dir / "test" / "test-1clip-1crop" / "summary.json").read_text())
    assert summary["top1"] == pytest.approx(val[-1]["val_top1"])  # (features stored in float16)


def test_bad_feature_folders_are_refused_with_one_line(trained, tmp_path):
    tmp, path = trained
    done = _tsmtrain("run", path, "--set", f"data.features={tmp_path / 'none'}", "--set", "run.name=bad", code=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.features" in lines[0] and "index.json" in lines[0] and "tsmtrain extract" in lines[0]
    out = tmp / "f4"
    _extract(path, out)
    other = tmp_path / "other.txt"  # another list: the features are not its
    text = Path(read_index(out / "train")["list"]).read_text().splitlines()
    other.write_text("\n".join(text[:-1]) + "\n")
    done = _tsmtrain("run", path, "--set", f"data.features={out}", "--set", f"data.train_list={other}",
                     "--set", "run.name=bad2", code=2)
    assert "holds the features of" in done.stderr and "extract them again" in done.stderr


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(trained):
    """Resuming into a folder of another extraction (dtype, shard size, protocol) would mix two
    extractions' shards under one index: refused with one line, before any shard is touched."""
    from typer.testing import CliRunner

    from tsmtrain.cli import app
    from tsmtrain.data import DataError
    from tsmtrain.dist.base import LocalEngine
    from tsmtrain.recipe import load_recipe
    from tsmtrain.eval.extract import extract_features
    from tsmtrain.eval.protocols import Protocol

    tmp, path = trained
    recipe, out = load_recipe(path), tmp / "f5"
    report = extract_features(recipe, out, Protocol(), shard_videos=5, engine=LocalEngine())
    assert report.splits["train"]["extracted"] == 5
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    for settings, key in ((dict(shard_videos=12), "shard_videos"),
                          (dict(shard_videos=5, dtype="float32"), "dtype"),
                          (dict(shard_videos=5, protocol=Protocol(2, 1)), "protocol")):
        with pytest.raises(DataError, match=f"other settings .*differ in {key}"):
            extract_features(recipe, out, settings.pop("protocol", Protocol()), engine=LocalEngine(), **settings)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == files
    index = read_index(out / "train")
    assert index["dtype"] == "float16" and len(index["shards"]) == 5 and len(FeatureDataset(out / "train")) == 24
    done = CliRunner().invoke(app, ["extract", str(path), "--out", str(out), "--shard-videos", "5", "--crops", "3"])
    assert done.exit_code == 2 and done.stdout == "", done.output
    assert done.stderr.strip().count("\n") == 0 and "differ in protocol" in done.stderr
    assert "Traceback" not in done.output
    kept = extract_features(recipe, out, Protocol(), shard_videos=5, engine=LocalEngine())  # the same settings: resumes
    assert kept.splits["train"]["kept"] == 5 and kept.splits["val"]["kept"] == 2


def test_the_index_covers_every_video_exactly_once(tmp_path):
    from tsmtrain.data import DataError
    from tsmtrain.eval.feature_files import feature_file_is_complete, write_index, write_feature_file
    from tsmtrain.data.readers.features import feature_file_path

    split = tmp_path / "train"
    f = np.zeros((2, 3), np.float16)
    write_feature_file(feature_file_path(split, 0), f, [0, 1], [(0,), (1,)], [], source="s")
    write_feature_file(feature_file_path(split, 1), f[:1], [3], [(1,)], [(2, "x.mp4: unreadable")], source="s")
    assert feature_file_is_complete(feature_file_path(split, 1), [2, 3], 3, "s")
    assert not feature_file_is_complete(feature_file_path(split, 1), [2, 3], 3, "other")  # another extraction's
    assert not feature_file_is_complete(feature_file_path(split, 1), [3, 4], 3, "s")  # other lines of the list
    doc = json.loads(write_index(split, {"videos": 4}, shards=2).read_text())
    assert doc["shards"] == ["features-00000.npz", "features-00001.npz"]
    assert doc["unreadable"] == [[2, "x.mp4: unreadable"]]
    write_feature_file(feature_file_path(split, 2), f[:1], [1], [(1,)], [], source="s")  # a stale shard of another layout
    assert json.loads(write_index(split, {"videos": 4}, shards=2).read_text())["shards"][-1] == "features-00001.npz"
    with pytest.raises(DataError, match=r"lines in two shards: \[1\], in none: \[\]"):
        write_index(split, {"videos": 4})
    with pytest.raises(DataError, match=r"in none: \[4\]"):
        write_index(split, {"videos": 5}, shards=2)


def test_the_recipe_check_refuses_features_of_other_classes(trained, tmp_path):
    from tsmtrain.recipe import RecipeError, load_recipe

    _, path = trained
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text(json.dumps({"num_classes": 6, "multi_label": True, "dim": 512}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [f"data.features={tmp_path}"])
    (p,) = err.value.problems
    assert p.key == "data.features" and "6 classes (multi-label)" in p.message
    assert "model.num_classes 4" in p.message
    assert "\n" not in str(p)
    load_recipe(path, [f"data.features={tmp_path}", "model.num_classes=6", "model.loss=sigmoid"])  # it fits
