import math

import pytest
import torch
from torch import nn

from tsmtrain.optim import LARS, LRSchedule, param_groups


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
