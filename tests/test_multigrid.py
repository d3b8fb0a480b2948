"""Multigrid training (multigrid.long_cycle, multigrid.short_cycle; tsmtrain/train/multigrid.py).

* The long cycle's stages and epochs are PySlowFast's (its Kinetics recipe, computed with
  PySlowFast's own get_long_cycle_schedule: the numbers below), the batches scale with 1/(T S^2).
* The loader serves each optimizer step the documented shape: a training run's batches follow the
  schedule step by step, with dist.backward_passes_per_step too.
* The learning rate is the baseline's curve times the stage's batch factor (linear rule).
* A run stopped in the middle of a long cycle and resumed ends with the weights of an
  uninterrupted run, bit for bit.
* Evaluation runs at the recipe's shape; the defaults change nothing.
"""

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml
from pydantic import ValidationError

from tsmtrain.data.loader import RankSampler, ShapeBatchSampler
from tsmtrain.models.sub_batch_norm import SubBatchNorm2d, set_bn_splits

from tests.conftest import run_cli, venv_env
from tests.conftest import tiny_recipe as conftest_recipe
from tests.test_train import read_metrics, tiny_recipe
from tsmtrain.optim.schedule import LRSchedule
from tsmtrain.recipe.schema import Recipe
from tsmtrain.train import TrainingError, TrainStep, train
from tsmtrain.train import loop
from tsmtrain.train.multigrid import LR_RESOLUTION, MultigridSchedule, Shape, multigrid_on, plan_stages

MULTIGRID = {"data.input_size": 16, "train.batch_size": 1, "schedule.epochs": 4, "schedule.warmup_epochs": 0.5,
             "multigrid.long_cycle": "true", "multigrid.short_cycle": "true", "train.eval_every": 100,
             "train.checkpoint_every": 100, "train.threads": 1}
"""The tiny demo (24 training clips) with both cycles: T0 = 4, S0 = 16, B0 = 1; 6 epochs, 23 steps."""


def recipe(**sections) -> Recipe:
    doc = {"data": {"train_list": "train.txt", "num_segments": 8, "input_size": 224}, "train": {"batch_size": 8},
           "multigrid": {"long_cycle": True, "short_cycle": True}}
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value)
    return Recipe.model_validate(doc)


def test_long_cycle_is_pyslowfast_schedule():
    # PySlowFast's configs/Kinetics/SLOWFAST_8x8_R50_stepwise_multigrid.yaml: STEPS [0, 94, 154, 196], MAX_EPOCH
    # 239; its get_long_cycle_schedule gives these stage ends (3 long cycles, then the base shape)
    stages, _ = plan_stages(recipe(schedule={"epochs": 239, "decay": "step", "milestones": [94, 154, 196]}))
    assert [s.end_epoch for s in stages] == [73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 358]
    assert [s.cycle for s in stages] == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    own = [(s.shapes[-1].segments, s.shapes[-1].size, s.shapes[-1].batch) for s in stages[:4]]
    assert own == [(2, 158, 64), (4, 158, 32), (4, 224, 16), (8, 224, 8)]  # B = 8 round(1 / (t s^2))
    assert [s.lr_factor for s in stages[:4]] == [8, 4, 2, 1] and stages[-1].lr_factor == 1
    # the short cycle: sides round(224 * 0.5), round(224 / sqrt 2), then the stage's; batch x round((S / side)^2)
    assert stages[0].shapes == (Shape(128, 2, 112), Shape(64, 2, 158), Shape(64, 2, 158))
    assert stages[2].shapes == (Shape(64, 4, 112), Shape(32, 4, 158), Shape(16, 4, 224))
    assert stages[-1].shapes == (Shape(32, 8, 112), Shape(16, 8, 158), Shape(8, 8, 224))


def test_cosine_demo_schedule_and_short_cycle_alone():
    stages, knots = plan_stages(recipe(schedule={"epochs": 4, "decay": "cosine"}, data={"input_size": 64}))
    assert [(s.first_epoch, s.end_epoch, s.cycle) for s in stages] == [(0, 3, 0), (3, 4, 0), (4, 5, 0), (5, 6, 1)]
    assert knots == [(0.0, 0.0), (5.0, 3.2), (6.0, 4.0)]  # the last 0.2 of the baseline at the base shape
    short_only = recipe(schedule={"epochs": 4}, multigrid={"long_cycle": False})
    (stage,), _ = plan_stages(short_only)
    assert (stage.end_epoch, stage.lr_factor) == (6, 1.0)
    assert [(x.batch, x.size) for x in stage.shapes] == [(32, 112), (16, 158), (8, 224)]


def test_steps_per_epoch_follow_the_short_cycle_with_passes():
    mg = MultigridSchedule(recipe(schedule={"epochs": 4}, data={"input_size": 64}, train={"batch_size": 2},
                                  dist={"backward_passes_per_step": 2}), clips_per_rank=100)
    stage = mg.stage(0)
    steps = mg.epoch_steps(0)
    assert steps == [stage.shapes[k % 3] for k in range(len(steps))]  # 64, 32, 32 clips per pass, 2 passes
    assert sum(2 * s.batch for s in steps) <= 100 < sum(2 * s.batch for s in steps) + 2 * stage.shapes[len(steps) % 3].batch
    assert mg.micro_batches(0) == [(s.batch, s.segments) for s in steps for _ in range(2)]
    assert mg.shape(0, 3) == steps[1]
    assert mg.total_steps == sum(mg.steps_in(e) for e in range(mg.epochs))
    assert [mg.locate(mg._starts[e]) for e in range(mg.epochs)] == [(e, 0) for e in range(mg.epochs)]


def test_learning_rate_is_the_baseline_curve_times_the_stage_batch():
    r = recipe(schedule={"epochs": 4, "warmup_epochs": 0.5, "decay": "cosine"}, data={"input_size": 64})
    mg = MultigridSchedule(r, clips_per_rank=800)
    base = LRSchedule(0.1, LR_RESOLUTION, 4, 0.5, 0.0125, "cosine")
    lr = mg.lr_schedule(base)
    assert lr(0) == 0.0125  # warmup starts at the small batch's rate ...
    for step in range(mg.total_steps):
        epoch, _ = mg.locate(step)
        at = mg.baseline_epoch(step)
        if at >= 0.5:  # ... after it, the baseline's cosine times the stage's batch factor
            assert lr(step) == pytest.approx(base(at * LR_RESOLUTION) * mg.stage(epoch).lr_factor)
    factors = [mg.stage(mg.locate(s)[0]).lr_factor for s in range(mg.total_steps)]
    assert sorted(set(factors), reverse=True) == [8.0, 4.0, 2.0, 1.0] and factors == sorted(factors, reverse=True)
    assert mg.baseline_epoch(mg.total_steps - 1) < 4.0 and mg.baseline_epoch(0) == 0.0


def test_defaults_are_off_and_impossible_combinations_refused():
    plain = Recipe.model_validate({"data": {"train_list": "t.txt"}})
    assert not multigrid_on(plain) and not plain.multigrid.long_cycle and not plain.multigrid.short_cycle
    assert plain.multigrid.long_cycle_factors == [(0.25, 0.5 ** 0.5), (0.5, 0.5 ** 0.5), (0.5, 1.0), (1.0, 1.0)]
    assert (plain.multigrid.short_cycle_factors, plain.multigrid.epoch_factor) == ((0.5, 0.5 ** 0.5), 1.5)
    with pytest.raises(ValidationError) as refused:
        recipe(data={"features": "feats"})
    (rows,) = [e["ctx"]["rows"] for e in refused.value.errors()]
    assert rows[0][0] == "multigrid.long_cycle" and "data.features" in rows[0][2]
    with pytest.raises(Exception, match="more than the 24 clips per rank"):
        MultigridSchedule(recipe(schedule={"epochs": 4}), clips_per_rank=24)


@pytest.fixture(scope="module")
def multigrid_run(tmp_path_factory, tiny_demo):
    """An uninterrupted multigrid run of the tiny demo: its folder, result, the (x shape, step) of
    every backward pass, and (T of the network and of its shifts, crop side) at each evaluation."""
    tmp = tmp_path_factory.mktemp("multigrid")
    passes, evals = [], []
    step_call, evaluate = TrainStep.__call__, loop.evaluate_epoch

    def record_pass(self, x, y, step):
        passes.append((tuple(x.shape), step))
        return step_call(self, x, y, step=step)

    def record_eval(model, *args, **kwargs):
        shifts = {m.num_segments for m in model.modules() if type(m).__name__ == "TemporalShift"}
        splits = {getattr(m, "splits", 1) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        evals.append((model.num_segments, shifts, splits, args[4].input_size))
        return evaluate(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainStep, "__call__", record_pass)
        mp.setattr(loop, "evaluate_epoch", record_eval)
        result = train(tiny_recipe(tmp, tiny_demo, "mg", **MULTIGRID))
    return tmp, result, passes, evals


@pytest.mark.slow
def test_batches_and_learning_rates_follow_the_schedule(multigrid_run, tiny_demo):
    tmp, result, passes, _ = multigrid_run
    mg = MultigridSchedule(tiny_recipe(tmp, tiny_demo, "check", **MULTIGRID), clips_per_rank=24)
    expected = [((s.batch, s.segments, 3, s.size, s.size), step)
                for step, s in enumerate(s for e in range(mg.epochs) for s in mg.epoch_steps(e))]
    assert passes == expected and result.step == mg.total_steps == 23 and result.epoch == 6
    assert {p[0][1] for p in passes} == {1, 2, 4} and {p[0][3] for p in passes} == {8, 11, 16}
    baseline = LRSchedule(0.05, LR_RESOLUTION, 4, 0.5, 0.05, "cosine")  # LARS base_lr 0.1 for 2 clips; 1 clip here
    lr = mg.lr_schedule(baseline)
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp / "runs" / "mg") if "loss" in r}
    assert logged == pytest.approx({s + 1: lr(s) for s in range(23)})
    assert logged[1] == pytest.approx(0.05) and max(logged.values()) > 0.05 * 4  # the 8x stage's rate


@pytest.mark.slow
def test_evaluation_runs_at_the_base_shape(multigrid_run):
    _, result, _, evals = multigrid_run
    assert evals == [(4, {4}, {1}, 16)]  # the last epoch's evaluation, at T0 = 4, S0 = 16, BatchNorm whole
    assert result.model.num_segments == 4  # and the network is left at it (checkpoint, test, predict)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, extra", [
    (12, {}),  # epoch 4's 2nd step of 4: inside the long cycle's third stage, after two shape changes
    (5, {"multigrid.short_cycle": "false", "dist.backward_passes_per_step": 2}),  # epoch 3, 2 of 3 steps
])
def test_stop_and_resume_in_a_long_cycle_is_exact(tmp_path, tiny_demo, multigrid_run, stop_at, extra):
    extra = {**MULTIGRID, **extra}
    if extra != MULTIGRID:  # the reference without the short cycle, 2 passes per step
        reference = train(tiny_recipe(tmp_path, tiny_demo, "ref", **extra))
    else:
        reference = multigrid_run[1]
    cut = train(tiny_recipe(tmp_path, tiny_demo, "cut", **extra, **{"train.stop_after_steps": stop_at}))
    assert cut.step == stop_at
    resumed = train(tiny_recipe(tmp_path, tiny_demo, "cut", **extra))
    assert resumed.step == reference.step and resumed.epoch == reference.epoch
    ours, theirs = resumed.model.state_dict(), reference.model.state_dict()
    for name, value in theirs.items():
        assert torch.equal(value, ours[name]), name
    assert resumed.eval == reference.eval


def test_validate_prints_the_schedule(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"v{i}.mp4 {i % 4}\n" for i in range(100)))
    doc = {"data": {"root": str(tmp_path), "train_list": str(tmp_path / "train.txt"), "num_segments": 8,
                    "input_size": 64},
           "model": {"num_classes": 4}, "optim": {"base_lr": 0.01, "base_batch": 4}, "schedule": {"epochs": 4},
           "train": {"batch_size": 2}, "dist": {"engine": "none"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    on = ("--set", "multigrid.long_cycle=true", "--set", "multigrid.short_cycle=true", "--no-files")
    shown = yaml.safe_load(run_cli("validate", path, *on).stdout)["derived"]["multigrid"]
    mg = MultigridSchedule(Recipe.model_validate({**doc, "multigrid": {"long_cycle": True, "short_cycle": True}}), 100)
    assert (shown["epochs"], shown["steps"]) == (mg.epochs, mg.total_steps) == (6, 52)
    first = shown["stages"][0]
    assert (first["epochs"], first["shapes"], first["batch_per_rank"]) == ("0-2", "2x32x32 / 2x45x45 / 2x45x45",
                                                                          "32 / 16 / 16")
    assert first["peak_lr"] == pytest.approx(0.04) and first["steps_per_epoch"] == 4
    assert sum(s["steps"] for s in shown["stages"]) == 52
    assert "multigrid" not in yaml.safe_load(run_cli("validate", path, "--no-files").stdout)["derived"]
    too_big = run_cli("validate", path, *on, "--set", "train.batch_size=8")
    assert too_big.returncode == 2 and too_big.stderr.count("\n") == 1 and "more than the 100 clips" in too_big.stderr


def test_sub_batch_norm_is_batch_norm_per_sub_batch():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    reference = [copy.deepcopy(bn) for _ in range(2)]
    set_bn_splits(bn, 2)
    assert isinstance(bn, SubBatchNorm2d) and set(bn.state_dict()) == set(reference[0].state_dict())
    x = torch.randn(8, 3, 5, 5) * 3 + 1  # 2 sub-batches of 4 rows (clips x frames)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = bn(x1)
    y_ref = torch.cat([reference[0](x2[:4]), reference[1](x2[4:])])
    assert torch.allclose(y, y_ref, atol=1e-5)
    (y * torch.arange(8.0).view(8, 1, 1, 1)).sum().backward()
    (y_ref * torch.arange(8.0).view(8, 1, 1, 1)).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    # the running statistics: PySlowFast's aggregate of the two sub-batches' (mean of means, pooled variance)
    means = torch.stack([x[:4].mean((0, 2, 3)), x[4:].mean((0, 2, 3))])
    variances = torch.stack([x[:4].var((0, 2, 3)), x[4:].var((0, 2, 3))])
    whole_var = variances.mean(0) + (means - means.mean(0)).pow(2).mean(0)
    assert torch.allclose(bn.running_mean, 0.1 * means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * whole_var, atol=1e-5)
    tiny = torch.randn(4, 3, 1, 1)  # 4 splits would leave 1 value per channel: 2 sub-batches of 2 rows
    bn.splits = 4
    expected = torch.cat([torch.nn.functional.batch_norm(tiny[i:i + 2], None, None, bn.weight, bn.bias, True, 0.0,
                                                         bn.eps) for i in (0, 2)])
    assert torch.allclose(bn(tiny), expected, atol=1e-5)
    set_bn_splits(bn, 1)  # one split, and evaluation: BatchNorm2d's own forward
    assert torch.equal(bn(x), torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    bn.eval()
    assert torch.equal(bn(x), torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_bn_splits_keep_the_clips_per_batch_norm():
    mg = MultigridSchedule(recipe(schedule={"epochs": 4}), clips_per_rank=10_000)
    assert [mg.bn_splits(s) for s in mg.stages[0].shapes] == [16, 8, 8]  # 8 clips each: train.batch_size
    assert {s.batch // mg.bn_splits(s) for st in mg.stages for s in st.shapes} == {8}
    assert MultigridSchedule(recipe(schedule={"epochs": 4}, multigrid={"bn_clips": 48}), None).bn_splits(
        Shape(128, 2, 112)) == 2  # 128 // 48 = 2 sub-batches of 64
    assert MultigridSchedule(recipe(schedule={"epochs": 4}, model={"sync_bn": True}), None).bn_splits(
        Shape(128, 2, 112)) == 1


def test_shape_batch_sampler_serves_each_batch_its_size_and_length_and_resumes():
    sampler = RankSampler(10, rank=0, world_size=1, shuffle=True, seed=3)
    shapes = {0: [(4, 1), (2, 2), (3, 4)], 1: [(5, 2), (5, 2)]}
    batches = ShapeBatchSampler(sampler, shapes.__getitem__)
    batches.set_epoch(0)
    whole = list(batches)
    assert [len(b) for b in whole] == [4, 2, 3] and len(batches) == 3  # the 10th clip is left over
    assert [{k[2] for k in b} for b in whole] == [{1}, {2}, {4}] and {k[1] for b in whole for k in b} == {0}
    assert [k[0] for b in whole for k in b] == sampler.indices()[:9]
    batches.set_epoch(0, 1)  # resumed after the first batch: the sampler skips its 4 clips
    assert list(batches) == whole[1:] and sampler.state_dict()["skip"] == 4 and len(batches) == 2
    batches.set_epoch(1)
    assert [len(b) for b in batches] == [5, 5] and {k[1] for b in batches for k in b} == {1}


@pytest.mark.slow
@pytest.mark.horovod
def test_both_engines_run_the_schedule_on_two_ranks(tmp_path, tiny_demo):
    """Two ranks (12 clips each) with the long cycle, through `tsmtrain run` and its launcher: the
    same steps, rates and losses with Horovod and DDP."""
    on = {**MULTIGRID, "multigrid.short_cycle": "false", "dist.np": 2, "dist.engine": "horovod"}
    records = {}
    for engine in ("horovod", "ddp"):
        recipe_path = conftest_recipe(tmp_path / f"{engine}.yaml", tiny_demo, engine, dist={"engine": engine, "np": 2},
                                      data={"input_size": 16, "workers": 0},
                                      train={"batch_size": 1, "eval_every": 100, "checkpoint_every": 100},
                                      schedule={"epochs": 4, "warmup_epochs": 0.5},
                                      multigrid={"long_cycle": True})
        proc = subprocess.run([sys.executable, "-m", "tsmtrain", "run", str(recipe_path)], capture_output=True,
                              text=True, timeout=600, env=venv_env())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        records[engine] = [r for r in read_metrics(tmp_path / "runs" / engine) if "loss" in r]
    mg = MultigridSchedule(tiny_recipe(tmp_path, tiny_demo, "check", **on), clips_per_rank=12)
    for engine, steps in records.items():
        assert [r["step"] for r in steps] == list(range(1, mg.total_steps + 1)), engine
    assert [r["lr"] for r in records["ddp"]] == [r["lr"] for r in records["horovod"]]
    assert [r["loss"] for r in records["ddp"]] == pytest.approx([r["loss"] for r in records["horovod"]], rel=1e-4)


@pytest.mark.slow
def test_a_run_does_not_resume_under_another_multigrid_schedule(tmp_path, tiny_demo):
    plain = {k: v for k, v in MULTIGRID.items() if not k.startswith("multigrid.")}
    assert train(tiny_recipe(tmp_path, tiny_demo, "plain", **plain, **{"train.stop_after_steps": 1})).step == 1
    with pytest.raises(TrainingError, match=r"another multigrid schedule \(multigrid.long_cycle: False there, True"):
        train(tiny_recipe(tmp_path, tiny_demo, "plain", **MULTIGRID))


class _TwoNorms(torch.nn.Module):
    """A network of clips ``(N, T, 3, H, W)``: BatchNorm, convolution, BatchNorm, mean: precise BatchNorm
    statistics can be worked out by hand for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn1, self.conv, self.bn2 = torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(x.flatten(0, 1)))).mean((1, 2, 3))


@pytest.mark.slow
def test_precise_bn_statistics_are_the_clip_weighted_mean_of_batch_statistics(tmp_path, tiny_demo):
    from tsmtrain.data import read_list
    from tsmtrain.data.transforms import VideoTransform
    from tsmtrain.train.precise_bn import precise_bn_records, recompute_bn_stats
    from torch.nn.functional import batch_norm

    r = tiny_recipe(tmp_path, tiny_demo, "pbn", **{**MULTIGRID, "multigrid.precise_bn_clips": 5,
                                                     "train.batch_size": 2})
    records = read_list(r.data.train_list, r.data.root, 4)
    chosen = precise_bn_records(records, 5, r.train.seed, 3)
    assert chosen == precise_bn_records(records, 5, r.train.seed, 3) != precise_bn_records(records, 5, r.train.seed, 4)
    assert len({c.path for c in chosen}) == 5 and len(precise_bn_records(records, 99, 0, 0)) == len(records)
    net, tf = _TwoNorms(), VideoTransform(train=False, input_size=16)
    net.bn1.running_mean.fill_(7.0)
    net.eval()
    assert recompute_bn_stats(net, records, r, torch.device("cpu"), tf, epoch=3) == 5
    assert not net.training and net.bn1.momentum == 0.1 and int(net.bn1.num_batches_tracked) == 0

    from tsmtrain.data.loader import clip_dataset
    clips = torch.stack([clip_dataset(r, chosen, train=False, replace=False)[i]["frames"] for i in range(5)])
    x = tf(clips).flatten(0, 1)  # (5*T, 3, 16, 16)
    expected = {name: [torch.zeros(c), torch.zeros(c)] for name, c in (("bn1", 3), ("bn2", 5))}
    for lo, hi in ((0, 2), (2, 4), (4, 5)):  # batches of train.batch_size = 2 clips, the last of 1
        rows = x[lo * 4:hi * 4]  # T = 4 rows per clip
        h = batch_norm(rows, None, None, net.bn1.weight, net.bn1.bias, True)
        for name, inp in (("bn1", rows), ("bn2", net.conv(h))):
            dims = (0, 2, 3)
            expected[name][0] += inp.mean(dims) * (hi - lo)
            expected[name][1] += inp.var(dims, unbiased=True) * (hi - lo)
    for name, (mean, var) in expected.items():
        layer = getattr(net, name)
        assert torch.allclose(layer.running_mean, mean / 5, atol=1e-5), name
        assert torch.allclose(layer.running_var, var / 5, rtol=1e-4), name

    before = {k: v.clone() for k, v in net.state_dict().items()}
    missing = [dataclasses.replace(c, path=str(tmp_path / f"missing{i}.mp4")) for i, c in enumerate(records)]
    assert recompute_bn_stats(net, missing, r, torch.device("cpu"), tf, epoch=3) == 0  # none readable: unchanged
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    off = tiny_recipe(tmp_path, tiny_demo, "pbn0", **{**MULTIGRID, "multigrid.precise_bn_clips": 0})
    assert recompute_bn_stats(net, records, off, torch.device("cpu"), tf, epoch=3) == 0


@pytest.mark.slow
def test_a_multigrid_run_evaluates_with_precise_statistics(multigrid_run, tiny_demo):
    from tsmtrain.data import read_list
    from tsmtrain.data.transforms import VideoTransform
    from tsmtrain.train.precise_bn import recompute_bn_stats

    tmp, result, _, _ = multigrid_run
    r = tiny_recipe(tmp, tiny_demo, "again", **MULTIGRID)
    model = copy.deepcopy(result.model)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    # training-mode forwards do not read the running statistics: recomputing them gives the same ones again,
    # so the run's evaluation (after its last epoch) used statistics recomputed from these clips
    n = recompute_bn_stats(model, read_list(r.data.train_list, r.data.root, 4), r, torch.device("cpu"),
                           VideoTransform(train=False, input_size=16), epoch=result.epoch)
    assert n == 24  # precise_bn_clips 64 > the 24 training clips: all of them
    assert all(torch.allclose(v, model.state_dict()[k], rtol=1e-5, atol=1e-6) for k, v in saved.items())
    other = recompute_bn_stats(model, read_list(r.data.train_list, r.data.root, 4)[:3], r, torch.device("cpu"),
                               VideoTransform(train=False, input_size=16), epoch=result.epoch)
    assert other == 3 and not all(torch.allclose(v, model.state_dict()[k]) for k, v in saved.items())


def test_the_demo_recipe_schedule_is_the_documented_one():
    from tsmtrain.recipe import load_recipe

    on = ["multigrid.long_cycle=true", "multigrid.short_cycle=true"]
    r = load_recipe("configs/demo.yaml", on, check_files=False)
    mg = MultigridSchedule(r, clips_per_rank=800)
    assert [(s.first_epoch, s.end_epoch, s.cycle, s.lr_factor) for s in mg.stages] == [
        (0, 3, 0, 4.0), (3, 6, 0, 2.0), (6, 7, 0, 1.0), (7, 8, 1, 1.0)]  # docs/training.md's table
    assert [mg.steps_in(e) for e in range(mg.epochs)] == [9, 9, 9, 10, 10, 10, 21, 21] and mg.total_steps == 99
    assert [(x.batch, x.segments, x.size) for x in mg.stages[0].shapes] == [(128, 4, 32), (64, 4, 45), (64, 4, 45)]
    assert not multigrid_on(load_recipe("configs/demo.yaml", check_files=False))  # the plain demo stays plain
