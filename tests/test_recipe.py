import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsmtrain.optim import LinearScaling, linear_scaling
from tsmtrain.recipe import RecipeError, load_recipe

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


def test_defaults_and_linear_scaling(tmp_path):
    r = load_recipe(write(tmp_path, {"train": {"batch_size": 8}, "dist": {"np": 4, "backward_passes_per_step": 2},
                                     "optim": {"base_lr": 0.1, "base_batch": 32}}))
    assert r.model.shift_div == 8 and r.data.num_segments == 8
    scaling = linear_scaling(r)  # world size: dist.np
    assert isinstance(scaling, LinearScaling)
    assert scaling.world_size == 4 and scaling.global_batch == 8 * 4 * 2
    assert scaling.lr == pytest.approx(0.1 * 64 / 32)
    assert scaling.warmup_steps is None  # no steps per epoch given


def test_run_dir_is_run_dir_slash_name(tmp_path):
    r = load_recipe(write(tmp_path, {"run": {"dir": str(tmp_path / "runs"), "name": "tsm-8"}}))
    assert r.run_dir == tmp_path / "runs" / "tsm-8"
    assert load_recipe(write(tmp_path, {})).run_dir == Path("runs") / "run"  # the defaults, relative
    assert "run_dir" not in r.model_dump()  # computed, not a recipe key


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
    assert list(doc["derived"])[:4] == ["world_size", "global_batch", "lr", "run_dir"]  # as before the typed rule
    # then the schedule of that batch (schedule.*_per_batch_doubling) and the steps of the 1-video list
    assert list(doc["derived"])[4:] == ["epochs", "warmup_epochs", "steps_per_epoch", "steps", "warmup_steps"]
    assert doc["derived"]["epochs"] == 50 and doc["derived"]["steps_per_epoch"] == 0
    assert doc["derived"]["lr"] == pytest.approx(0.01 * 16 / 64) and doc["derived"]["run_dir"] == "runs/run"
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


# --------------------------------------------------------------------------- hardened input


def alias_bomb(path, levels):
    """A recipe whose key ``x`` is an alias bomb: ``levels`` levels, each naming the previous one 9 times
    (9 ** levels values once expanded, a few hundred bytes of text)."""
    lines = ["data:", f"  root: {path.parent}", f"  train_list: {path.parent / 'train.txt'}", "x:",
             '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    (path.parent / "train.txt").write_text("a.mp4 0\n")
    path.write_text("\n".join(lines) + "\n")
    return path


def limited_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB of address space


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    lists = write(tmp_path, {}).parent / "train.txt"
    path.write_text(f"data:\n  root: {tmp_path}\n  train_list: {lists}\n"  # lines 1-3
                    "model:\n  arch: resnet18\n  num_classes: 4\n"          # lines 4-6
                    "optim:\n  base_lr: 0.1\n  momentum: 0.8\n  base_lr: 0.2\n"  # lines 7-10
                    "model:\n  num_classes: 6\n")                           # lines 11-12
    found = problems(path)
    assert [(p.key, p.line) for p in found] == [("optim.base_lr", 10), ("model", 11)]
    assert all(p.file == str(path) for p in found)
    assert "duplicate key (first at line 8)" in found[0].message
    assert str(found[1]) == f"{path}:11: model: duplicate key (first at line 4); a recipe names each key once"
    out = cli("validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"error: {p}" for p in found]


def test_duplicate_key_in_an_override_value_is_refused(tmp_path):
    (p,) = problems(write(tmp_path, {}), ["cluster.env={A: '1', A: '2'}"])
    assert p.file == "--set" and p.key == "cluster.env" and "duplicate key" in p.message


@pytest.mark.parametrize("levels", [6, 9])
def test_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path, levels):
    path = alias_bomb(tmp_path / "bomb.yaml", levels)
    out = subprocess.run([sys.executable, "-m", "tsmtrain", "validate", str(path)], capture_output=True, text=True,
                         cwd=REPO, timeout=20, preexec_fn=limited_memory)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr) < 300
    (line,) = out.stderr.splitlines()
    # the first level that expands past 10,000 values: l4 (1 + 9 * (1 + 9 * (1 + 9 * (1 + 9 * 10)))), on line 9
    assert line.startswith(f"error: {path}:9: (yaml): aliases (*name) expand this to more than 10,000 values")


def test_alias_bomb_leaves_the_line_index_empty(tmp_path):
    from tsmtrain.recipe import line_index

    assert line_index(alias_bomb(tmp_path / "bomb.yaml", 9).read_text()) == {}


@pytest.mark.parametrize("text, why", [
    ("x: &a [*a]\n", "inside the node it names"),
    ("x: " + "[" * 60 + "]" * 60 + "\n", "nested more than 50 levels"),
    ("a: &a 1\nx: [" + ", ".join(["*a"] * 101) + "]\n", "more than 100 aliases"),
])
def test_recursive_deep_or_alias_heavy_yaml_is_refused(tmp_path, text, why):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    (p,) = problems(path)
    assert p.key == "(yaml)" and why in p.message and p.line is not None


def test_small_anchors_and_merge_keys_still_work(tmp_path):
    from tsmtrain.recipe import yaml_load

    lists = write(tmp_path, {}).parent / "train.txt"
    path = tmp_path / "anchors.yaml"
    text = (f"data:\n  root: {tmp_path}\n  train_list: {lists}\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n"
            "model: &model {num_classes: 4, arch: resnet18}\n"
            "train:\n  <<: {batch_size: 4, seed: 3}\n  batch_size: 2\n")  # a merged key named again: no duplicate
    path.write_text(text)
    r = load_recipe(path)
    assert r.data.mean == r.data.std == (0.5, 0.5, 0.5)
    assert (r.train.batch_size, r.train.seed, r.model.arch) == (2, 3, "resnet18")
    path.write_text(text.replace("seed: 3", "seed: -3"))
    (p,) = problems(path)
    assert (p.key, p.line) == ("train.seed", 8)  # where the merged mapping names it
    assert yaml_load("base: &base {a: 1, b: 2}\nx:\n  <<: *base\n  b: 3\n")["x"] == {"a": 1, "b": 3}


WRONG_VALUES = [
    ("optim", {"base_lr": float("inf")}, "optim.base_lr", "finite"),
    ("optim", {"base_lr": float("nan")}, "optim.base_lr", "finite"),
    ("optim", {"base_lr": 0}, "optim.base_lr", "greater than 0"),
    ("optim", {"momentum": float("nan")}, "optim.momentum", "finite"),
    ("data", {"std": [0, 0, 0]}, "data.std", "greater than 0"),
    ("data", {"std": [0.2, -0.1, 0.2]}, "data.std", "greater than 0"),
    ("data", {"mean": [0.5, float("inf"), 0.5]}, "data.mean", "finite"),
    ("data", {"scales": [1.0, float("nan")]}, "data.scales", "finite"),
    ("train", {"seed": -1}, "train.seed", "greater than or equal to 0"),
    ("data", {"frame_size": [0, 0]}, "data.frame_size", "greater than or equal to 1"),
    ("data", {"frame_size": [112, 300], "input_size": 224}, "data.frame_size", "smaller than data.input_size (224)"),
    ("data", {"short_side": 200, "input_size": 224}, "data.short_side", "smaller than data.input_size (224)"),
    ("data", {"short_side": 4}, "data.short_side", "greater than or equal to 8"),
    ("schedule", {"epochs": True}, "schedule.epochs", "a boolean is not a number"),
    ("schedule", {"warmup_epochs": False}, "schedule.warmup_epochs", "a boolean is not a number"),
    ("train", {"threads": True}, "train.threads", "a boolean is not a number"),
    ("data", {"frame_size": [True, 224]}, "data.frame_size", "a boolean is not a number"),
    ("schedule", {"milestones": [True]}, "schedule.milestones", "a boolean is not a number"),
    ("run", {"name": "../../x"}, "run.name", "not a plain name"),
    ("run", {"name": ".."}, "run.name", "not a plain name"),
    ("run", {"name": "a/b"}, "run.name", "'/'"),
]


@pytest.mark.parametrize("section, values, key, why", WRONG_VALUES,
                         ids=[f"{key}={values[key.split('.')[1]]}" for _, values, key, _ in WRONG_VALUES])
def test_wrong_values_are_refused_naming_the_key(tmp_path, section, values, key, why):
    path = write(tmp_path, {section: values})
    found = problems(path)
    assert [p.key for p in found] == [key]
    assert why in found[0].message
    assert key.rsplit(".", 1)[1] in path.read_text().splitlines()[found[0].line - 1]


def test_values_at_the_bounds_are_accepted(tmp_path):
    r = load_recipe(write(tmp_path, {"data": {"frame_size": [224, 398], "short_side": 224, "std": [1, 1, 1]},
                                     "train": {"seed": 0}, "run": {"name": "tsm_r50-k400.v2"}}))
    assert r.data.frame_size == (224, 398) and r.data.short_side == 224 and r.run.name == "tsm_r50-k400.v2"
    assert load_recipe(write(tmp_path, {})).data.short_side is None


def test_run_name_outside_run_dir_is_refused_by_the_cli(tmp_path):
    out = cli("validate", str(write(tmp_path, {})), "--set", "run.name=../../x")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: --set: run.name = '../../x': not a plain name")


def test_a_huge_value_gives_a_short_message(tmp_path):
    (p,) = problems(write(tmp_path, {"train": {"batch_size": "x" * 100_000}}))
    assert p.key == "train.batch_size" and len(str(p)) < len(str(p.file)) + 300
    assert "'xxx" in str(p) and "..." in str(p)


def test_non_utf8_recipe_is_one_line_with_the_byte_offset(tmp_path):
    path = write(tmp_path, {})
    text = path.read_bytes()
    path.write_bytes(text + b"# caf\xe9\n")
    out = cli("validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = len(text.splitlines()) + 1
    assert out.stderr == f"error: {path}: not UTF-8 text: byte 0xe9 at offset {len(text) + 5} (line {lines})\n"


def test_non_utf8_label_map_names_the_byte(tmp_path):
    from tsmtrain.recipe.label_map import ClassNamesError, read_class_names

    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"run\njump\n\xffsit\n")
    with pytest.raises(ClassNamesError, match=r"classes.txt: not UTF-8 text: byte 0xff at offset 9 \(line 3\)$"):
        read_class_names(classes)
    (p,) = problems(write(tmp_path, {"data": {"classes": str(classes)}}))
    assert p.key == "data.classes" and "byte 0xff at offset 9" in p.message


# --------------------------------------------------------------------------- no torch


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("module", ["tsmtrain.recipe", "tsmtrain.recipe.label_map", "tsmtrain.data.lists",
                                    "tsmtrain.dist.slurm"])
def test_recipe_check_imports_no_torch(module):
    """validate, render and submit run on login nodes without torch: what they import must not load it."""
    out = _fresh(f"import sys, {module}\n"
                 "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    assert out.returncode == 0, out.stderr[-2000:]


def test_recipe_check_of_a_label_map_loads_no_torch(tmp_path):
    path = write(tmp_path, {"data": {"classes": str(tmp_path / "classes.txt")}})
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    out = _fresh(f"import sys\nfrom tsmtrain.recipe import load_recipe\nfrom tsmtrain.recipe.label_map import read_class_names\n"
                 f"r = load_recipe({str(path)!r})\nprint(read_class_names(r.data.classes, r.model.num_classes))\n"
                 f"assert 'torch' not in sys.modules")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['a', 'b', 'c', 'd']"


def test_data_package_names_load_on_first_use():
    """tsmtrain.data's loader names (which need torch) still import from the package."""
    code = ("import sys, tsmtrain.data\nassert 'torch' not in sys.modules\n"
            "from tsmtrain.data import VideoClipDataset, build_loader\nimport tsmtrain.data.loader as loader\n"
            "assert 'torch' in sys.modules\n"
            "assert VideoClipDataset is loader.VideoClipDataset and build_loader is loader.build_loader\n"
            "assert set(tsmtrain.data.__all__) <= set(dir(tsmtrain.data))\n"
            "assert all(getattr(tsmtrain.data, n) is not None for n in tsmtrain.data.__all__)\n"
            "try:\n    tsmtrain.data.nothing_here\nexcept AttributeError as e:\n    print(e)\n")
    out = _fresh(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "module 'tsmtrain.data' has no attribute 'nothing_here'"
