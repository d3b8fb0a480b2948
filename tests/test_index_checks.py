"""Features folders checked when they are loaded (issue 30, items 4 and 5): a shard named outside
its split's folder, features of another dimension, labels out of range and NaN or infinite
features are each one ``error:`` line naming the file and the value, exit 2, before any step."""

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_recipe
from tsmtrain.cli import app
from tsmtrain.data import DataError
from tsmtrain.data.readers.features import FeatureDataset, list_digest, feature_file_path
from tsmtrain.eval.feature_files import write_index, write_feature_file

DIM, CLASSES = 8, 4


def _features(tmp_path, features=None, labels=((0,), (1,), (3,))):
    """A features folder as tsmtrain extract writes it (one train shard of 3 videos, D = 8, 4
    classes), the list it is of, and a recipe that trains a head on it (no validation)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    listed = tmp_path / "train.txt"
    listed.write_text("a.mp4 0\nb.mp4 1\nc.mp4 3\n")
    split = tmp_path / "features" / "train"
    features = np.ones((3, DIM), np.float16) if features is None else features
    write_feature_file(feature_file_path(split, 0), features, [0, 1, 2], list(labels), [], source="s")
    write_index(split, {"list": str(listed), "list_sha256": list_digest(listed), "videos": 3, "dim": DIM,
                        "dtype": "float16", "num_classes": CLASSES, "multi_label": False}, shards=1)
    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path, "head", dist={"engine": "none"},
                         data={"features": str(tmp_path / "features"), "train_list": str(listed), "val_list": None,
                               "workers": 0}, train={"batch_size": 3})
    return split, recipe


def _one_error_line(recipe, tmp_path) -> str:
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert not (tmp_path / "runs" / "head" / "metrics.jsonl").exists()  # no step was taken
    return line


def test_a_sound_folder_loads(tmp_path):
    split, _ = _features(tmp_path)
    data = FeatureDataset(split)
    assert len(data) == 3 and data.labels == [(0,), (1,), (3,)]


def test_features_of_the_wrong_dimension_are_one_error_line(tmp_path):
    split, recipe = _features(tmp_path, features=np.ones((3, DIM - 2), np.float16))
    line = _one_error_line(recipe, tmp_path)
    assert f"{feature_file_path(split, 0)}: features of shape (3, 6), the index says dim 8" in line


def test_labels_out_of_range_are_one_error_line(tmp_path):
    split, recipe = _features(tmp_path, labels=((0,), (1,), (CLASSES,)))
    line = _one_error_line(recipe, tmp_path)
    assert f"{feature_file_path(split, 0)}: label 4 of the video on line 3 of the list (row 2) is outside 0..3" in line
    split, _ = _features(tmp_path / "negative", labels=((0,), (-1,), (3,)))
    with pytest.raises(DataError, match=r"label -1 of the video on line 2 .* outside 0..3"):
        FeatureDataset(split)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_features_are_refused_at_load_naming_the_file_and_value(tmp_path, value):
    """NaN or inf features trained to a nan loss and exit 0."""
    features = np.ones((3, DIM), np.float16)
    features[1, 5] = value
    split, recipe = _features(tmp_path, features=features)
    line = _one_error_line(recipe, tmp_path)
    assert f"{feature_file_path(split, 0)}: feature [1, 5] of the video on line 2 of the list is {value}" in line
    assert "(1 values not finite)" in line


def test_shards_named_outside_the_split_folder_are_refused(tmp_path):
    """An index named `../..` and absolute paths, and np.load read them."""
    split, recipe = _features(tmp_path)
    elsewhere = tmp_path / "elsewhere.npz"
    os.replace(feature_file_path(split, 0), elsewhere)
    (split / "link.npz").symlink_to(elsewhere)
    index = json.loads((split / "index.json").read_text())
    for name, expected in (("../../elsewhere.npz", "leaves the index's folder"),
                           (str(elsewhere), "is an absolute path"),
                           ("link.npz", f"resolves to {elsewhere}, outside the index's folder")):
        (split / "index.json").write_text(json.dumps({**index, "shards": [name]}))
        line = _one_error_line(recipe, tmp_path)
        assert f"{split / 'index.json'}: shards[0]: {name!r} {expected}" in line
