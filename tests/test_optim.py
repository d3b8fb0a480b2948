import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tsmtrain.optim import (LARS, LinearScaling, LRSchedule, create_optimizer, create_schedule, linear_scaling,
                            param_groups)
from tsmtrain.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]


def recipe(**sections) -> Recipe:
    return Recipe.model_validate({"data": {"train_list": "train.txt"}, **sections})


def test_lars_step_equals_formula():
    w0 = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    g = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    lr, wd, eta, mom = 0.1, 0.01, 0.02, 0.9
    w = nn.Parameter(w0.clone())
    opt = LARS([w], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=0.0)
    w.grad = g.clone()
    opt.step()
    trust = eta * 5.0 / (1.0 + wd * 5.0)
    v1 = lr * trust * (g + wd * w0)
    assert torch.allclose(w.detach(), w0 - v1, atol=1e-7)
    # second step: momentum carries v1, trust ratio recomputed on the new weights
    w1 = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    trust2 = eta * w1.norm() / (g.norm() + wd * w1.norm())
    v2 = mom * v1 + lr * trust2 * (g + wd * w1)
    assert torch.allclose(w.detach(), w1 - v2, atol=1e-7)


def test_lars_excluded_group_is_plain_sgd():
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([{"params": [b], "lars": False, "weight_decay": 0.0}], lr=0.5, momentum=0.9)
    b.grad = torch.tensor([0.2, -0.4])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1, 2.0 + 0.2]))


def test_lars_zero_weight_uses_trust_one():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert torch.allclose(w.detach(), -torch.ones(3, 3))


def test_param_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, plain = param_groups(model, 1e-4)
    assert {p.ndim for p in decay["params"]} == {2, 4} and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 4
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False


def test_warmup_is_linear_per_iteration_then_cosine():
    s = LRSchedule(peak_lr=1.6, steps_per_epoch=100, epochs=10, warmup_epochs=2, warmup_start_lr=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.1 + 1.5 * 0.5)
    assert s(199) == pytest.approx(0.1 + 1.5 * 199 / 200)
    assert s(200) == pytest.approx(1.6)
    assert s(600) == pytest.approx(1.6 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(1000) == pytest.approx(0.0, abs=1e-12)


def test_step_decay():
    s = LRSchedule(peak_lr=1.0, steps_per_epoch=10, epochs=30, warmup_epochs=0, decay="step",
                   milestones=[10, 20], gamma=0.1)
    assert s(99) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.1)
    assert s(250) == pytest.approx(0.01)


def test_apply_sets_every_group():
    p1, p2 = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=9.0)
    s = LRSchedule(peak_lr=2.0, steps_per_epoch=4, epochs=1, warmup_epochs=1, warmup_start_lr=0.0)
    assert s.apply(opt, 2) == pytest.approx(1.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1.0)] * 2


# --------------------------------------------------------------------------- linear scaling rule


def test_linear_scaling_global_batch_and_lr():
    r = recipe(train={"batch_size": 6}, dist={"np": 2, "backward_passes_per_step": 3},
               optim={"base_lr": 0.02, "base_batch": 16}, schedule={"epochs": 10, "warmup_epochs": 2.5})
    s = linear_scaling(r, world_size=8, steps_per_epoch=7)
    assert s == LinearScaling(world_size=8, global_batch=6 * 8 * 3, lr=pytest.approx(0.02 * 144 / 16),
                              warmup_steps=round(2.5 * 7))
    assert s.warmup_steps == 18  # 17.5 rounds to even
    assert linear_scaling(r).world_size == 2 and linear_scaling(r).global_batch == 6 * 2 * 3  # dist.np
    assert linear_scaling(r, world_size=1).lr == pytest.approx(0.02 * 18 / 16)
    assert linear_scaling(r).warmup_steps is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 1.0


def test_linear_scaling_warmup_steps_match_the_schedule():
    r = recipe(schedule={"epochs": 4, "warmup_epochs": 1.3})
    scaling = linear_scaling(r, 4, steps_per_epoch=10)
    schedule = create_schedule(r, scaling, 10)
    assert scaling.warmup_steps == schedule.warmup_steps == 13


def test_create_schedule_starts_warmup_at_the_small_batch_rate():
    r = recipe(train={"batch_size": 8}, optim={"base_lr": 0.1, "base_batch": 64},
               schedule={"epochs": 10, "warmup_epochs": 2, "decay": "none"})
    big = linear_scaling(r, 32)  # global batch 256: lr 0.4
    s = create_schedule(r, big, steps_per_epoch=5)
    assert s.peak_lr == pytest.approx(0.4) and s.total_steps == 50 and s.warmup_steps == 10
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(0.25) and s(10) == pytest.approx(0.4)
    small = linear_scaling(r, 2)  # global batch 16: lr 0.025, below base_lr: no ramp down from 0.1
    assert create_schedule(r, small, 5)(0) == pytest.approx(0.025)
    r = recipe(optim={"base_lr": 0.1, "base_batch": 64},
               schedule={"epochs": 10, "warmup_epochs": 2, "warmup_start_lr": 0.0, "decay": "step",
                         "milestones": [5], "gamma": 0.5})
    s = create_schedule(r, linear_scaling(r, 16), 5)  # 128 clips: lr 0.2
    assert s(0) == 0.0 and s(10) == pytest.approx(0.2) and s(25) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        create_schedule(r, linear_scaling(r), 0)


def test_create_optimizer_follows_the_recipe():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sgd = create_optimizer(model, recipe(optim={"nesterov": True, "base_lr": 0.3}).optim)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] is True and sgd.defaults["lr"] == 0.3
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    lars = create_optimizer(model, recipe(optim={"name": "lars", "trust_coefficient": 0.02}).optim)
    assert type(lars) is LARS and [g["lars"] for g in lars.param_groups] == [True, False]
    assert lars.defaults["trust_coefficient"] == 0.02


def test_scaling_rule_and_schedule_import_no_torch():
    """The sweep and tsmtrain validate use the rule without torch; LARS and the factory load it on first use."""
    code = ("import sys\nimport tsmtrain.optim.scaling_rule, tsmtrain.optim.schedule\n"
            "from tsmtrain.optim import LRSchedule, linear_scaling\nassert 'torch' not in sys.modules\n"
            "from tsmtrain.optim import LARS\nimport tsmtrain.optim.lars\n"
            "assert 'torch' in sys.modules and LARS is tsmtrain.optim.lars.LARS\n"
            "import tsmtrain.optim\ntry:\n    tsmtrain.optim.nothing_here\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "module 'tsmtrain.optim' has no attribute 'nothing_here'"
