import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsmtrain.recipe import RecipeError, derived_values, load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, doc, name="r.yaml"):
    lists = tmp_path / "train.txt"
    lists.write_text("a.mp4 0\n")
    base = {"data": {"root": str(tmp_path), "train_list": str(lists)}, "model": {"num_classes": 4}}
    for section, values in doc.items():
        base.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tsmtrain", *args], capture_output=True, text=True, cwd=REPO)


def problems(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


def test_defaults_and_derived_values(tmp_path):
    r = load_recipe(write(tmp_path, {"train": {"batch_size": 8}, "dist": {"np": 4, "backward_passes_per_step": 2},
                                     "optim": {"base_lr": 0.1, "base_batch": 32}}))
    assert r.model.shift_div == 8 and r.data.num_segments == 8
    d = derived_values(r)
    assert d["global_batch"] == 8 * 4 * 2
    assert d["lr"] == pytest.approx(0.1 * 64 / 32)


def test_typo_key_names_path_and_line(tmp_path):
    path = write(tmp_path, {"optim": {"lerning_rate": 0.1, "momentum": 0.9}})
    (p,) = problems(path)
    assert p.key == "optim.lerning_rate" and p.message.startswith("unknown key")
    text = path.read_text().splitlines()
    assert "lerning_rate" in text[p.line - 1]
    assert str(path) in str(p)


def test_close_typo_gets_a_suggestion(tmp_path):
    (p,) = problems(write(tmp_path, {"model": {"shift_dvi": 4}}))
    assert "did you mean 'shift_div'" in p.message


def test_schema_and_file_problems_reported_together(tmp_path):
    path = write(tmp_path, {"data": {"val_list": "nope.txt"}, "train": {"bach_size": 4}})
    assert {p.key for p in problems(path)} == {"data.val_list", "train.bach_size"}


def test_wrong_type_and_range(tmp_path):
    found = problems(write(tmp_path, {"train": {"batch_size": "eight"}, "model": {"shift_div": 1}}))
    assert {p.key for p in found} == {"train.batch_size", "model.shift_div"}


def test_missing_files_all_reported(tmp_path):
    path = write(tmp_path, {"data": {"val_list": "nope.txt"}, "model": {"pretrained": "w.pth"}})
    keys = {p.key for p in problems(path)}
    assert keys == {"data.val_list", "model.pretrained"}


def test_generated_dataset_needs_no_list_but_its_source(tmp_path):
    path = write(tmp_path, {"data": {"train_list": "later.txt", "generate": "arrow_of_time", "source": "no/clips"}})
    (p,) = problems(path)
    assert p.key == "data.source" and "no/clips" in str(p)
    load_recipe(write(tmp_path, {"data": {"train_list": "later.txt", "generate": "demo"}}, "demo.yaml"))


def test_rendered_datasets_bound_the_class_count(tmp_path):
    load_recipe(write(tmp_path, {"data": {"train_list": "later.txt", "generate": "study"}, "model": {"num_classes": 12}}))
    (p,) = problems(write(tmp_path, {"data": {"train_list": "later.txt", "generate": "study"},
                                     "model": {"num_classes": 14}}))
    assert p.key == "model.num_classes" and "2..12" in p.message
    (p,) = problems(write(tmp_path, {"data": {"train_list": "later.txt", "generate": "demo"},
                                     "model": {"num_classes": 8}}))
    assert p.key == "model.num_classes" and "2..6" in p.message


def test_impossible_combinations(tmp_path):
    path = write(tmp_path, {"schedule": {"epochs": 5, "warmup_epochs": 6, "decay": "step"},
                            "dist": {"engine": "none", "np": 2}})
    keys = {p.key for p in problems(path)}
    assert {"schedule.warmup_epochs", "schedule.milestones", "dist.np"} <= keys


def test_overrides(tmp_path):
    path = write(tmp_path, {})
    r = load_recipe(path, ["model.shift=false", "data.scales=[1, 0.5]", "train.batch_size=3"])
    assert r.model.shift is False and r.data.scales == [1.0, 0.5] and r.train.batch_size == 3
    (p,) = problems(path, ["model.shfit=false"])
    assert p.file == "--set" and p.key == "model.shfit"
    (p,) = problems(path, ["model.shift"])
    assert "KEY.PATH=VALUE" in p.message


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  root: .\n  train_list: [unclosed\n")
    (p,) = problems(path)
    assert p.line is not None and "YAML" in p.message


def test_cli_validate_exit_codes(tmp_path):
    good = write(tmp_path, {}, "good.yaml")
    out = cli("validate", str(good), "--np", "2")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["derived"]["global_batch"] == 16 and doc["derived"]["world_size"] == 2
    bad = write(tmp_path, {"train": {"bach_size": 4}}, "bad.yaml")
    out = cli("validate", str(bad))
    assert out.returncode == 2
    assert "train.bach_size" in out.stderr and "Traceback" not in out.stderr
    out = cli("validate", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "absent.yaml" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name", ["demo.yaml", "tsm_r50_kinetics400.yaml", "arrow_of_time.yaml", "large_batch_study.yaml"])
def test_shipped_recipes_are_valid(name):
    load_recipe(REPO / "configs" / name, check_files=False)


def test_shift_div_that_shifts_no_channel_is_refused(tmp_path):
    (p,) = problems(write(tmp_path, {"model": {"arch": "resnet50", "shift_div": 1000}}))
    assert p.key == "model.shift_div" and p.value == "1000"
    assert "64 channels" in p.message and "resnet50" in p.message and "at most 64" in p.message
    load_recipe(write(tmp_path, {"model": {"arch": "resnet50", "shift_div": 64}}))  # one channel each way
    load_recipe(write(tmp_path, {"model": {"shift": False, "shift_div": 1000}}))  # TSN: nothing shifts
    (p,) = problems(write(tmp_path, {"model": {"arch": "mobilenet_v2", "shift_div": 32}}))
    assert "24 channels" in p.message


def test_training_step_settings(tmp_path):
    r = load_recipe(write(tmp_path, {}))
    assert (r.train.precision, r.train.channels_last, r.train.compile) == ("fp32", False, False)
    r = load_recipe(write(tmp_path, {}), ["train.precision=bf16", "train.channels_last=true", "train.compile=true"])
    assert (r.train.precision, r.train.channels_last, r.train.compile) == ("bf16", True, True)
    (p,) = problems(write(tmp_path, {"train": {"precision": "fp8"}}))
    assert p.key == "train.precision" and "fp16" in p.message


def test_cli_refuses_shift_div_with_exit_2(tmp_path):
    proc = cli("validate", str(write(tmp_path, {})), "--set", "model.shift_div=1000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --set: model.shift_div = '1000': leaves no channel")
