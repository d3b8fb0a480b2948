"""The large-batch recipe knobs: label smoothing (train.label_smoothing), what weight decay and LARS
leave out (optim.exclude_from_decay, optim.lars_exclude), and epochs and warmup that grow with the
global batch (schedule.epochs_per_batch_doubling, schedule.warmup_epochs_per_batch_doubling)."""

import math

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import run_cli, tiny_recipe
from tsmtrain.models import create_model
from tsmtrain.models.heads import FeatureClassifier
from tsmtrain.optim import (LARS, batch_scaled_epochs, batch_scaled_schedule, create_optimizer, linear_scaling,
                            param_groups)
from tsmtrain.recipe import ModelConfig, OptimConfig, Recipe, RecipeError, load_recipe
from tsmtrain.train.step import classification_loss


def recipe(**sections) -> Recipe:
    return Recipe.model_validate({"data": {"train_list": "train.txt"}, **sections})


# --------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_equals_the_formula(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    # by hand: p = softmax(logits); per clip (1 - eps) * (-log p_y) + eps * mean_k(-log p_k), mean over clips
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    ce = -p[torch.arange(6), y].log()
    uniform = -p.log().mean(dim=1)
    expected = ((1 - eps) * ce + eps * uniform).mean()
    got = classification_loss(logits, y, "softmax", label_smoothing=eps)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert got.item() != pytest.approx(ce.mean().item(), rel=1e-3)  # it does smooth


def test_no_label_smoothing_is_todays_cross_entropy_bitwise():
    logits, y = torch.randn(4, 7), torch.tensor([1, 0, 6, 3])
    assert torch.equal(classification_loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    assert torch.equal(classification_loss(logits, y, "softmax", 0.0), classification_loss(logits, y))
    assert recipe().train.label_smoothing == 0.0


def test_label_smoothing_is_refused_with_the_sigmoid_loss_and_a_sharded_head(tmp_path):
    with pytest.raises(ValueError, match="softmax"):
        classification_loss(torch.zeros(2, 3), torch.zeros(2, 3), "sigmoid", 0.1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_list": "train.txt"}}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.label_smoothing=0.1", "model.loss=sigmoid"], check_files=False)
    (p,) = info.value.problems
    assert p.key == "train.label_smoothing" and "sigmoid" in p.message and "\n" not in str(p)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.label_smoothing=0.1", "model.head_parallel=true"], check_files=False)
    assert [p.key for p in info.value.problems] == ["train.label_smoothing"]
    with pytest.raises(RecipeError):
        load_recipe(path, ["train.label_smoothing=1.0"], check_files=False)  # eps < 1
    assert load_recipe(path, ["train.label_smoothing=0.1"], check_files=False).train.label_smoothing == 0.1


# --------------------------------------------------------------------------- weight decay and LARS exclusions


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    """By name: the weight and bias of every BatchNorm layer, and every bias."""
    names = set()
    for module_name, m in model.named_modules():
        for name, _ in m.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or name == "bias":
                names.add(full)
    return names


NETWORKS = {
    # name: (model, BatchNorm layers, biases): the counts pin down what the backbones hold
    "resnet18": (lambda: create_model(ModelConfig(arch="resnet18", num_classes=5), 4), 20, 1),
    "resnet50": (lambda: create_model(ModelConfig(arch="resnet50", num_classes=5), 4), 53, 1),
    "mobilenet_v2": (lambda: create_model(ModelConfig(arch="mobilenet_v2", num_classes=5), 4), 52, 1),
    "resnet18-moe": (lambda: create_model(ModelConfig(arch="resnet18", num_classes=5, head="moe", loss="sigmoid"), 4),
                     20, 2),
    "resnet50-flow": (lambda: create_model(ModelConfig(arch="resnet50", num_classes=5), 4, in_channels=10), 53, 1),
    "mobilenet_v2-flow": (lambda: create_model(ModelConfig(arch="mobilenet_v2", num_classes=5), 4, in_channels=10),
                          52, 1),
    "resnet18-sync_bn": (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(
        create_model(ModelConfig(arch="resnet18", num_classes=5), 4)), 20, 1),
    "features-linear": (lambda: FeatureClassifier(16, 5, "linear", 2, 0.5), 0, 1),
    "features-moe": (lambda: FeatureClassifier(16, 5, "moe", 2, 0.5), 0, 2),
}


@pytest.mark.parametrize("network", list(NETWORKS))
def test_excluded_parameters_are_exactly_batchnorm_and_biases(network):
    build, bn_layers, biases = NETWORKS[network]
    torch.manual_seed(0)
    model = build()
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, plain = param_groups(model, 1e-4)
    excluded = [name_of[id(p)] for p in plain["params"]]
    assert set(excluded) == _norm_and_bias_names(model)
    assert len(excluded) == 2 * bn_layers + biases
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False
    assert decay["weight_decay"] == 1e-4 and decay["lars"] is True
    assert all(n.endswith("weight") and p.ndim >= 2 for n, p in model.named_parameters() if n not in excluded)
    # today's rule (ndim < 2) picks the same parameters in the same order: the default changes no run
    assert [id(p) for p in plain["params"]] == [id(p) for p in model.parameters() if p.ndim < 2]
    assert [id(p) for p in decay["params"]] == [id(p) for p in model.parameters() if p.ndim >= 2]


def test_exclusions_can_be_turned_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    for decay_ex, lars_ex, wd, lars in [("norm_and_bias", "norm_and_bias", 0.0, False),
                                        ("none", "norm_and_bias", 1e-3, False),
                                        ("norm_and_bias", "none", 0.0, True), ("none", "none", 1e-3, True)]:
        cfg = OptimConfig(name="lars", weight_decay=1e-3, exclude_from_decay=decay_ex, lars_exclude=lars_ex)
        opt = create_optimizer(model, cfg)
        assert isinstance(opt, LARS) and len(opt.param_groups) == 2
        weights, plain = opt.param_groups
        assert (weights["weight_decay"], weights["lars"]) == (1e-3, True)
        assert (plain["weight_decay"], plain["lars"]) == (wd, lars)
        assert len(plain["params"]) == 4  # conv bias, BatchNorm weight and bias, linear bias
        sgd = create_optimizer(model, cfg.model_copy(update={"name": "sgd"}))
        assert [g["weight_decay"] for g in sgd.param_groups] == [1e-3, wd]
    with pytest.raises(ValueError, match="exclude_from_decay"):
        param_groups(model, 1e-4, exclude_from_decay="bn")


def test_lars_on_every_parameter_scales_the_bias_step_by_its_trust_ratio():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([3.0]))
    cfg = OptimConfig(name="lars", base_lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.5,
                      lars_eps=0.0, lars_exclude="none")
    opt = create_optimizer(lin, cfg)
    lin.weight.grad, lin.bias.grad = torch.zeros(1, 2), torch.tensor([2.0])
    opt.step()
    assert lin.bias.item() == pytest.approx(3.0 - 0.5 * 3.0 / 2.0 * 2.0)  # trust = eta |b| / |g| = 0.75
    lin.bias.data.fill_(3.0)
    opt = create_optimizer(lin, cfg.model_copy(update={"lars_exclude": "norm_and_bias"}))
    opt.step()
    assert lin.bias.item() == pytest.approx(3.0 - 2.0)  # plain SGD


# --------------------------------------------------------------------------- epochs and warmup by batch


@pytest.mark.parametrize("multiple, epochs, warmup, steps, warmup_steps", [
    (1, 4, 1.0, 768, 192), (4, 8, 2.0, 384, 96), (16, 12, 3.0, 144, 36), (64, 16, 4.0, 48, 12)])
def test_epochs_and_warmup_grow_per_batch_doubling(multiple, epochs, warmup, steps, warmup_steps):
    # B0 = 8 clips; 2 epochs and 0.5 warmup epochs per doubling; 1,536 training clips
    assert batch_scaled_epochs(4, 1.0, 8 * multiple, 8, 2.0, 0.5) == (epochs, warmup)
    r = recipe(train={"batch_size": 8}, dist={"engine": "none", "backward_passes_per_step": multiple},
               optim={"base_batch": 8}, schedule={"epochs": 4, "warmup_epochs": 1, "epochs_per_batch_doubling": 2,
                                                  "warmup_epochs_per_batch_doubling": 0.5})
    ran = batch_scaled_schedule(r, 1)
    assert (ran.schedule.epochs, ran.schedule.warmup_epochs) == (epochs, warmup)
    assert ran.schedule.epochs_per_batch_doubling == ran.schedule.warmup_epochs_per_batch_doubling == 0
    assert batch_scaled_schedule(ran, 1) == ran  # applying it again changes nothing
    per_epoch = 1536 // (8 * multiple)
    assert per_epoch * ran.schedule.epochs == steps
    assert linear_scaling(ran, 1, steps_per_epoch=per_epoch).warmup_steps == warmup_steps


def test_batch_scaled_epochs_reproduces_mlperf_and_leaves_small_batches_alone():
    doublings = math.log2(67456 / 3264)
    per_epoch, per_warmup = (90 - 37) / doublings, (31 - 2) / doublings
    assert batch_scaled_epochs(37, 2.0, 3264, 3264, per_epoch, per_warmup) == (37, 2.0)
    epochs, warmup = batch_scaled_epochs(37, 2.0, 67456, 3264, per_epoch, per_warmup)
    assert epochs == 90 and warmup == pytest.approx(31.0)
    assert batch_scaled_epochs(10, 1.0, 32, 64, 3.0, 1.0) == (10, 1.0)  # below base_batch: unchanged
    assert batch_scaled_epochs(4, 1.0, 24, 8, 1.5, 0.0) == (7, 1.0)  # 4 + 1.5 log2 3 = 6.38: rounded up
    assert batch_scaled_epochs(4, 1.0, 32, 8, 1.5, 0.0) == (7, 1.0)  # 4 + 3.0: exactly 7


def test_default_recipe_is_left_as_it_is():
    r = recipe(dist={"backward_passes_per_step": 16})
    assert batch_scaled_schedule(r, 8) is r


def test_warmup_may_not_grow_faster_than_the_schedule(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_list": "train.txt"}}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["schedule.warmup_epochs_per_batch_doubling=2"], check_files=False)
    (p,) = info.value.problems
    assert p.key == "schedule.warmup_epochs_per_batch_doubling" and "epochs_per_batch_doubling" in p.message


def test_validate_shows_the_epochs_warmup_and_steps_of_the_batch(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"v{i}.mp4 {i % 4}\n" for i in range(1536)))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path), "train_list": str(listing), "generate": "demo"},  # (files not checked)
        "model": {"num_classes": 4}, "optim": {"base_batch": 8},
        "schedule": {"epochs": 4, "warmup_epochs": 1, "epochs_per_batch_doubling": 2,
                     "warmup_epochs_per_batch_doubling": 0.5},
        "train": {"batch_size": 8}, "dist": {"engine": "none", "backward_passes_per_step": 16}}))
    out = run_cli("validate", str(path))
    assert out.returncode == 0, out.stderr
    derived = yaml.safe_load(out.stdout)["derived"]
    assert derived["global_batch"] == 128
    assert (derived["epochs"], derived["warmup_epochs"]) == (12, 3.0)
    assert (derived["steps_per_epoch"], derived["steps"], derived["warmup_steps"]) == (12, 144, 36)
    out = run_cli("validate", str(path), "--no-files")  # the list is not read: steps unknown
    derived = yaml.safe_load(out.stdout)["derived"]
    assert derived["epochs"] == 12 and derived["steps"] is None


@pytest.mark.slow
def test_a_run_trains_the_scaled_epochs_with_label_smoothing(tmp_path, tiny_demo, monkeypatch):
    import tsmtrain.train.loop as loop
    from tsmtrain.train import train

    seen = []

    class Recording(loop.TrainStep):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("label_smoothing"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "TrainStep", Recording)
    # global batch 8 = 4 x base_batch 2: 2 doublings, so 1 + 2 x 1 = 3 epochs and 0 + 2 x 0.25 = 0.5 warmup
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "scaled", dist={"engine": "none", "backward_passes_per_step": 4},
                       optim={"name": "sgd", "base_lr": 0.05, "base_batch": 2},
                       schedule={"epochs": 1, "warmup_epochs": 0, "epochs_per_batch_doubling": 1,
                                 "warmup_epochs_per_batch_doubling": 0.25},
                       train={"batch_size": 2, "log_every": 1, "threads": 1, "label_smoothing": 0.1})
    part = train(load_recipe(path, ["train.stop_after_steps=4"]))  # past the unscaled schedule's 3 steps
    assert (part.step, part.epoch) == (4, 1)
    result = train(load_recipe(path), resume=True)  # the resumed run scales the same way
    assert seen == [0.1, 0.1]
    assert (result.step, result.epoch) == (9, 3)  # 24 clips / 8 per step = 3 steps per epoch, 3 epochs
    written = yaml.safe_load((tmp_path / "runs" / "scaled" / "recipe.yaml").read_text())["schedule"]
    assert (written["epochs"], written["warmup_epochs"], written["epochs_per_batch_doubling"]) == (3, 0.5, 0.0)


def test_sweeps_made_before_the_knobs_stay_comparable():
    import hashlib
    import json

    from tsmtrain.scaling.sweep import _comparable

    r = recipe()
    doc = r.model_dump(mode="json")
    for key in ("np", "master_addr", "master_port"):
        doc["dist"].pop(key)
    doc["dist"]["launcher"] = "gloo"
    doc["model"].pop("sync_bn")
    for key in ("exclude_from_decay", "lars_exclude"):  # the keys a sweep before them did not have
        doc["optim"].pop(key)
    keep = {k: doc[k] for k in ("data", "model", "optim", "dist")} | {"batch_size": doc["train"]["batch_size"]}
    assert _comparable(r) == hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
    assert _comparable(recipe(optim={"lars_exclude": "none"})) != _comparable(r)
