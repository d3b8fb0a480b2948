"""The training step's compute (tsmtrain.train.step), the phase clock and the host allocator, on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsmtrain.dist.base import LocalEngine
from tsmtrain.models import VideoNet
from tsmtrain.optim import create_optimizer
from tsmtrain.recipe import OptimConfig
from tsmtrain.train import TrainingError, TrainStep
from tsmtrain.train.metrics_log import PhaseClock

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SHAPE = (2, 2, 3, 8, 8)  # tiny: half precision convolutions are slow on CPUs without AVX-512 (im2col, not oneDNN)


def tiny(seed=0):
    torch.manual_seed(seed)
    return VideoNet("resnet18", 3, SHAPE[1], shift=True, dropout=0.0)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randint(0, 3, (SHAPE[0],), generator=g)


def take_step(step, x, y, loss_factor=1.0):
    """Like calling the step, with the loss multiplied by ``loss_factor`` (inf: inf gradients)."""
    with step.autocast():
        loss = torch.nn.functional.cross_entropy(step.forward_model(step.batch(x)), y) * loss_factor
    step.scaler.scale(loss).backward() if step.scaler else loss.backward()
    step.optimizer_step()


def with_optimizer(model, precision="fp32", **kwargs):
    return TrainStep(model, CPU, precision, optimizer=create_optimizer(model, OptimConfig(base_lr=0.1)), **kwargs)


def test_fp16_step_with_infinite_gradients_is_skipped_and_the_scale_halves():
    model = tiny()
    step = with_optimizer(model, "fp16")
    x, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    scale = step.loss_scale()
    take_step(step, x, y, loss_factor=float("inf"))
    assert step.loss_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed for the next step
    step.scaler.update(2.0)  # a scale small enough that this tiny network's fp16 gradients stay finite
    take_step(step, x, y)
    assert step.loss_scale() == 2.0  # (growth only after 2000 good steps)
    assert not torch.equal(before["fc.weight"], model.fc.weight)  # a finite step is taken


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_step_stops_before_the_weights_change(bad):
    from tsmtrain.train.step import NonFiniteLoss

    model = tiny()
    step = with_optimizer(model)
    x, y = batch()
    step(x, y, step=0)  # a finite step first: its loss is the last finite one
    first_loss = float(step._last_finite[1])
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(NonFiniteLoss) as err:
        step(x.clone().fill_(bad), y, step=1)  # NaN/inf frames: NaN loss and gradients
    assert err.value.step == 2 and err.value.last_finite == (1, pytest.approx(first_loss))
    assert "step 2" in str(err.value) and "last finite loss" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())  # nothing applied
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_nonfinite_step_is_skipped_when_the_recipe_says_so():
    model = tiny()
    step = with_optimizer(model, nonfinite="skip")
    x, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = step(x.clone().fill_(float("nan")), y, step=0)
    assert out.stepped and step.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    step(x, y, step=1)  # the next finite batch is applied
    assert step.skipped_steps == 1 and not torch.equal(before["fc.weight"], model.fc.weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_scaler_state_round_trips():
    step = TrainStep(tiny(), CPU, "fp16")
    step.scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    step.scaler.update(1024.0)
    other = TrainStep(tiny(), CPU, "fp16")
    other.load_state_dict(step.state_dict())
    assert other.loss_scale() == 1024.0
    fp32 = TrainStep(tiny(), CPU, "fp32")
    assert fp32.state_dict() is None and fp32.loss_scale() is None
    fp32.load_state_dict(None)


def test_bf16_autocast_runs_the_network_in_bf16_and_the_loss_in_fp32():
    step = TrainStep(tiny(), CPU, "bf16")
    x, y = batch()
    logits, loss, _ = step.forward_backward(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in step.model.parameters())


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_convolutions_round_like_the_precision(precision, dtype):
    # what a CPU without oneDNN bf16/fp16 kernels runs: an fp32 convolution of rounded operands
    from tsmtrain.train.step import ReducedPrecisionConvolutions
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype), ReducedPrecisionConvolutions(dtype):
        out = conv(x)
        other = torch.nn.functional.linear(torch.randn(2, 8), torch.randn(4, 8))  # left to autocast
    rounded = [v.detach().to(dtype).float() for v in (x, conv.weight, conv.bias)]
    expected = torch.nn.functional.conv2d(*rounded, padding=1).to(dtype)
    assert out.dtype == dtype and torch.equal(out.detach(), expected)
    assert not torch.equal(expected.float(), torch.nn.functional.conv2d(x.detach(), conv.weight.detach(),
                                                                        conv.bias.detach(), padding=1))
    assert other.dtype == torch.bfloat16 if dtype == torch.bfloat16 else other.dtype == torch.float16
    with torch.autocast("cpu", dtype=dtype):  # PyTorch's own reduced-precision convolution (slow path here)
        native = conv(x)
    assert torch.allclose(out.float(), native.float(), rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x.grad.to(dtype).float())  # rounded gradient
    with ReducedPrecisionConvolutions(dtype):  # outside autocast: untouched
        assert conv(x).dtype == torch.float32


def test_autocast_uses_fp32_kernels_only_where_the_cpu_lacks_them(monkeypatch):
    from tsmtrain.train import step as step_module
    monkeypatch.setattr(step_module, "cpu_has_kernels", lambda precision: False)
    with step_module.autocast("bf16", CPU):
        assert isinstance(torch.overrides._get_current_function_mode(), step_module.ReducedPrecisionConvolutions)
    assert step_module.half_precision_note("bf16", CPU) is not None
    monkeypatch.setattr(step_module, "cpu_has_kernels", lambda precision: True)
    with step_module.autocast("bf16", CPU):
        assert torch.overrides._get_current_function_mode() is None
        assert torch.is_autocast_enabled("cpu")
    assert step_module.half_precision_note("bf16", CPU) is None


def test_channels_last_step_equals_contiguous_step():
    x, y = batch()
    results = []
    for channels_last in (False, True):
        model = tiny()
        step = TrainStep(model, CPU, channels_last=channels_last)
        assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert step.batch(x).flatten(0, 1).is_contiguous(memory_format=torch.channels_last) == channels_last
        logits, _, _ = step.forward_backward(x, y)
        results.append((logits, [p.grad for p in model.parameters()]))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    # other convolution kernels: rounding differs, BatchNorm on 1x1 maps amplifies it; with one
    # thread (as after an in-process run with train.threads: 1) oneDNN's kernels differ by 3e-3
    for a, b in zip(grads_a, grads_b):
        assert (a - b).norm() <= 1e-2 * a.norm() + 1e-6


def test_gradient_accumulation_divides_the_loss():
    x, y = batch()
    one, two = TrainStep(tiny(), CPU), TrainStep(tiny(), CPU, passes=2)
    one.forward_backward(x, y)
    two.forward_backward(x, y)
    two.forward_backward(x, y)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


class Recorder(LocalEngine):
    """One process that notes what the step asks of it, in order."""

    def __init__(self):
        self.calls = []

    def accumulate(self, net, last):
        self.calls.append(f"accumulate(last={last})")
        return super().accumulate(net, last)

    def wait_gradients(self, optimizer):
        self.calls.append("wait_gradients")

    def skip_synchronize(self, optimizer):
        self.calls.append("skip_synchronize")
        return super().skip_synchronize(optimizer)


def test_a_step_is_passes_backward_passes_then_the_wait_the_rate_and_the_optimizer_step():
    from tsmtrain.optim import LRSchedule

    x, y = batch()
    engine, clock = Recorder(), PhaseClock(CPU, enabled=True)
    model = tiny()
    step = with_optimizer(model, engine=engine, passes=2, schedule=LRSchedule(0.5, 10, 1), clock=clock)
    before = model.fc.weight.detach().clone()
    clock.mark()  # (the loop marks each batch's arrival)
    first = step(x, y, step=3)
    assert not first.stepped and first.lr is None and first.logits.shape == (2, 3) and first.loss.dim() == 0
    assert engine.calls == ["accumulate(last=False)"] and torch.equal(before, model.fc.weight)
    clock.mark()
    second = step(x, y, step=3)
    assert second.stepped and second.lr == LRSchedule(0.5, 10, 1)(3)
    assert engine.calls == ["accumulate(last=False)", "accumulate(last=True)", "wait_gradients", "skip_synchronize"]
    assert all(g["lr"] == second.lr for g in step.optimizer.param_groups)
    assert not torch.equal(before, model.fc.weight)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed for the next step
    assert set(clock.collect()) == {"augment", "forward_backward", "allreduce_wait", "optimizer"}
    clock.mark()
    assert not step(x, y, step=4).stepped  # the next step starts over


def test_compile_failure_names_the_setting(monkeypatch):
    def broken(fn):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    with pytest.raises(TrainingError, match=r"^train.compile: true: torch.compile failed .*InvalidCxxCompiler.*"
                                            r"set train.compile: false"):
        TrainStep(tiny(), CPU, compile=True, batch_shape=SHAPE)


def test_compile_check_leaves_no_trace(monkeypatch):
    calls = []

    def eager(model, **kw):  # a stand-in compiler: the check's forward and backward run eagerly
        calls.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", eager)
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, CPU, "fp16", compile=True, batch_shape=SHAPE)
    assert calls == [{"dynamic": False}]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert step.loss_scale() == 65536.0 and model.training


class FakeEvent:
    """A stand-in for torch.cuda.Event: the time it was recorded; elapsed_time in milliseconds."""

    clock = [0.0]
    synchronized = 0

    def record(self):
        self.t = FakeEvent.clock[0]

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        return 1000.0 * (end.t - self.t)


def test_phase_clock_on_events_reads_them_only_at_the_interval_end():
    clock = PhaseClock(torch.device("cuda"), enabled=True, event=FakeEvent)
    for _ in range(3):
        FakeEvent.clock[0] += 5.0  # data wait: not the clock's
        clock.mark()
        for phase, seconds in (("augment", 0.5), ("forward_backward", 2.0), ("allreduce_wait", 0.25),
                               ("optimizer", 0.125)):
            FakeEvent.clock[0] += seconds
            clock.lap(phase)
    assert FakeEvent.synchronized == 0  # no step waited for the device
    assert clock.collect() == {"augment": 1.5, "forward_backward": 6.0, "allreduce_wait": 0.75, "optimizer": 0.375}
    assert FakeEvent.synchronized == 1
    spare = len(clock._spare)
    clock.mark()
    FakeEvent.clock[0] += 1.0
    clock.lap("optimizer")
    assert len(clock._spare) == spare - 2  # events are reused
    assert clock.collect() == {"augment": 0.0, "forward_backward": 0.0, "allreduce_wait": 0.0, "optimizer": 1.0}


def test_phase_clock_on_the_cpu_and_disabled():
    clock = PhaseClock(CPU, enabled=True)
    clock.mark()
    clock.lap("augment")
    clock.lap("optimizer")
    sums = clock.collect()
    assert set(sums) == {"augment", "forward_backward", "allreduce_wait", "optimizer"} and sums["augment"] >= 0
    off = PhaseClock(CPU, enabled=False)
    off.mark()
    off.lap("augment")
    assert off.collect() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_step():
    # in a fresh process: by default glibc unmaps a freed 64 MiB block at once; after
    # keep_freed_memory the process keeps it (and the next step's blocks come from it)
    script = """
import torch
from tsmtrain.train.setup import keep_freed_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def after_free():
    before = resident_mib()
    big = torch.ones(16 * 2**20)  # 64 MiB, touched
    del big
    return resident_mib() - before

print(after_free(), keep_freed_memory(), after_free())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    default, applied, kept = out.stdout.split()
    assert float(default) < 16 and applied == "True" and float(kept) > 48, out.stdout
