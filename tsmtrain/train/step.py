"""One optimizer step, read in one place: :class:`TrainStep`, shared by the training loop and
``tsmtrain bench step``.

A step is ``dist.backward_passes_per_step`` forward and backward passes (one per batch the
loop hands in, each under the engine's :meth:`~tsmtrain.dist.base.Engine.accumulate`: DDP's
``no_sync()`` on all but the last), then the gradient wait, the scheduled learning rate and the
optimizer step. The engines (:mod:`tsmtrain.dist`) add only what differs between them: the
model's and the optimizer's wrappers, the wait (Horovod's ``optimizer.synchronize()``) and the
context of the optimizer step (Horovod's ``optimizer.skip_synchronize()``). The order of one
step, with fp16's ``torch.amp.GradScaler``, is the one Horovod documents for AMP
(``horovod/docs/pytorch.rst``, "Mixed precision"), written once, in
:meth:`TrainStep.optimizer_step`::

    scaler.scale(loss).backward()        # each pass; the allreduce runs during the last one
    optimizer.synchronize()              # Engine.wait_gradients: the allreduce is done
    schedule.apply(optimizer, step)      # the learning rate of this step
    scaler.unscale_(optimizer)           # on the averaged gradients
    with optimizer.skip_synchronize():   # Engine.skip_synchronize
        scaler.step(optimizer)           # skipped if a gradient is inf/NaN
    scaler.update()
    optimizer.zero_grad()

Since ``unscale_`` looks at gradients already averaged over all ranks, a step with an infinite
gradient on any rank is skipped on every rank, and the scale stays the same everywhere. Without
fp16 the same order holds with ``optimizer.step()`` and no scaler, and the classifier's averaged
gradients are checked before it (``train.nonfinite``): an inf or NaN anywhere (a NaN loss on any rank
makes every rank's average NaN) stops the run on every rank at the same step with
:class:`NonFiniteLoss` (``stop``, the default), or skips that step's update on every rank
(``skip``; BatchNorm's running statistics are put back as the step found them), so that a
NaN never reaches the weights or a checkpoint. The check reads one flag
per step back from the device, as the fp16 scaler does.

:class:`TrainStep` also holds what ``train.precision``, ``train.channels_last`` and
``train.compile`` change, in plain PyTorch (as torchvision's ``references/video_classification``):

* **precision** ``fp32 | bf16 | fp16``: forward and loss run under ``torch.autocast`` with that
  dtype (none for fp32; Micikevicius et al., "Mixed Precision Training", ICLR 2018). On a CPU
  whose oneDNN has no convolution kernels for that dtype (bf16 needs AVX-512 or AMX), PyTorch
  would run the convolutions on its reference im2col path, over 10x slower than fp32; there the
  convolutions run as fp32 convolutions of operands rounded to the dtype, with the output rounded
  back (:class:`ReducedPrecisionConvolutions`): the numerics of a bf16 convolution with fp32
  accumulation, at fp32's speed. fp16 adds the GradScaler above: the loss is scaled before
  backward.
* **channels_last**: the model's 4-D weights and each input batch in channels_last (NHWC)
  memory format; the frames of a clip ``(N, T, C, H, W)`` are laid out so that the network's
  ``(N*T, C, H, W)`` view is channels_last.
* **compile**: ``torch.compile`` of the model for the training forward and backward (fixed
  batch shape, ``dynamic=False``). Compilation happens on the first call, so the constructor
  runs one forward and backward on a zero batch first (and then restores the BatchNorm buffers
  and drops the gradients) so that a compiler failure stops the run before training starts.
  The eager module stays the one whose parameters are optimised, saved and broadcast, and
  evaluation runs it uncompiled (its batch sizes vary).

**A head sharded across ranks** (``model.head_parallel``, :mod:`tsmtrain.dist.head_parallel`):
the engine's wrapper runs the network up to its features (``net(x, classify=False)``), this
rank's slice of the classifier scores every rank's features, and the loss is the global batch's.
The head's parameters have their own optimizer (``head_optimizer``), which the engine does not
wrap: their gradients are exact on their rank and are never allreduced. Both optimizers take
the same learning rate, in the same step.

The phases of a step are timed on the run's :class:`~tsmtrain.train.metrics_log.PhaseClock`
(``forward_backward``, ``allreduce_wait``, ``optimizer``; the loop times the data and the
augmentation).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..dist.base import Engine, LocalEngine
from ..dist.head_parallel import HeadParallel
from ..optim import LRSchedule
from .metrics_log import PhaseClock
from ..errors import TrainingError

__all__ = ["PRECISIONS", "LOSSES", "NONFINITE", "NonFiniteLoss", "targets", "classification_loss", "TrainStep",
           "StepOutput", "autocast",
           "as_memory_format", "half_precision_note", "ReducedPrecisionConvolutions", "cpu_has_kernels"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` -> the autocast dtype (``None``: no autocast)."""


@functools.cache
def cpu_has_kernels(precision: str) -> bool:
    """Whether this CPU's oneDNN has convolution kernels for ``precision`` (``bf16``: AVX-512 or
    AMX; ``fp16``: AVX-512-FP16 or AMX-FP16; ``fp32``: always). Without them PyTorch convolves
    bf16/fp16 tensors on its reference im2col path, many times slower than fp32."""
    if precision == "fp32":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported() if precision == "bf16"
                    else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a private query; without it, assume the kernels are there
        return True


class ReducedPrecisionConvolutions(TorchFunctionMode):
    """Inside autocast to ``dtype`` on a CPU without oneDNN kernels for it: every
    ``conv1d/2d/3d`` runs as an fp32 convolution of its input, weight and bias rounded to
    ``dtype``, and returns its output rounded to ``dtype``.

    That is the arithmetic of a reduced-precision convolution on hardware that has one
    (operands in bf16/fp16, their products exact in fp32, sums accumulated in fp32, the output
    rounded; e.g. oneDNN's AVX-512-BF16 and AMX kernels, tensor cores), so a run keeps the
    precision's numerics, including its gradients: autograd differentiates the casts, so the
    input's gradient is rounded to ``dtype`` as well. Only the order of the fp32 sums may differ.
    It costs three casts per convolution instead of the reference path's 10x or more. Every
    other operation is left to autocast.
    """

    CONVOLUTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d})

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.CONVOLUTIONS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)

        def rounded(v):
            return v.to(self.dtype).float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        with torch.autocast("cpu", enabled=False):
            out = func(*(rounded(a) for a in args), **{k: rounded(v) for k, v in kwargs.items()})
        return out.to(self.dtype)


def autocast(precision: str, device: torch.device):
    """The autocast context for ``precision`` on ``device`` (a no-op context for fp32); on a CPU
    without oneDNN kernels for the precision, also :class:`ReducedPrecisionConvolutions`."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    if device.type != "cpu" or cpu_has_kernels(precision):
        return torch.autocast(device.type, dtype=dtype)
    stack = ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=dtype))
    stack.enter_context(ReducedPrecisionConvolutions(dtype))
    return stack


def half_precision_note(precision: str, device: torch.device) -> str | None:
    """A note when ``precision`` runs on a CPU whose PyTorch build has no oneDNN kernels for it:
    its convolutions then run as fp32 convolutions of rounded operands
    (:class:`ReducedPrecisionConvolutions`), so the precision brings no speed here. ``None``
    otherwise."""
    if device.type != "cpu" or cpu_has_kernels(precision):
        return None
    needs = "AVX-512 or AMX" if precision == "bf16" else "AVX-512-FP16 or AMX-FP16"
    return (f"train.precision: {precision}: this CPU has no oneDNN {precision} convolutions (they need {needs}), "
            f"and PyTorch's reference path is over 10x slower than fp32; the convolutions run as fp32 convolutions "
            f"of {precision}-rounded operands with {precision} outputs instead ({precision}'s numerics, fp32's speed)")


def as_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Clips ``(N, T, C, H, W)`` (or frames ``(N*T, C, H, W)``) in the layout the network
    wants: unchanged when not ``channels_last``, else each frame in NHWC order (strides
    ``(T*H*W*C, H*W*C, 1, W*C, C)``), so that ``x.flatten(0, 1)`` is channels_last."""
    if not channels_last or x.dim() < 4:  # (features (N, D) have no layout to change)
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    frames = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return frames.view(x.shape)


@dataclass
class StepOutput:
    """What one call of :class:`TrainStep` gives back.

    Attributes:
        logits: ``(N, K)`` of the batch (autocast's dtype); ``None`` with a sharded head, whose
            rank holds only its classes' logits.
        loss: the batch's mean cross-entropy, unscaled, a 0-d fp32 tensor on the device (with a
            sharded head, the global batch's).
        best: the best class of each clip, int64 ``(N,)``.
        stepped: this call ended an optimizer step (its last backward pass); ``False`` while
            gradients accumulate.
        lr: the learning rate of the optimizer step taken in this call (the schedule's; ``None``
            without a schedule or when no step was taken).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor
    best: torch.Tensor
    stepped: bool = False
    lr: float | None = None


NONFINITE = ("stop", "skip")
"""``train.nonfinite``: what a step whose gradients (or loss) are inf or NaN does, without fp16."""


class NonFiniteLoss(TrainingError):
    """A step's loss or averaged gradients are inf or NaN (``train.nonfinite: stop``); raised on
    every rank at the same step, before the optimizer step, so the weights are still finite.

    Attributes:
        step: the optimizer step that failed (1-based: the number it would have had).
        loss: this rank's loss of the step's last backward pass (may be finite on this rank when
            another rank's was not: the averaged gradients are NaN everywhere).
        last_finite: ``(step, loss)`` of the last step taken, or ``None`` before the first.
    """

    def __init__(self, step: int, loss: float, last_finite: tuple[int, float] | None):
        self.step, self.loss, self.last_finite = step, loss, last_finite
        last = ("no step was taken before it" if last_finite is None
                else f"the last finite loss was {last_finite[1]:.6g} at step {last_finite[0]}")
        super().__init__(f"step {step}: the loss or a gradient is not finite (this rank's loss: {loss}); {last}")


LOSSES = ("softmax", "sigmoid")
"""``model.loss``: one label per clip (cross-entropy), or several (binary cross-entropy per class)."""


def targets(batch: dict, model_cfg) -> torch.Tensor:
    """What the loss compares the logits with, for a loader batch: the labels int64 ``(N,)``
    (``model.loss: softmax``), or float32 ``(N, K)`` with 1 at each clip's labels (``sigmoid``)."""
    if model_cfg.loss == "softmax":
        return batch["label"]
    from ..eval.multilabel_metrics import multi_hot

    return torch.from_numpy(multi_hot(batch["labels"], model_cfg.num_classes))


def classification_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "softmax",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """The mean over the batch of the cross-entropy of ``logits (N, K)`` against labels ``y (N,)``
    (``softmax``), or of the binary cross-entropy of each class's log-odds against the multi-hot
    ``y (N, K)``, summed over the K classes (``sigmoid``: each class an independent yes/no, as for
    YouTube-8M; summed so that a head split across ranks adds its classes' parts).

    ``label_smoothing`` eps (``train.label_smoothing``; softmax only): per clip
    ``(1 - eps) * CE + eps * mean over the K classes of -log p_k`` (Szegedy et al. 2016,
    section 7; PyTorch's ``cross_entropy(label_smoothing=eps)``); 0 computes plain cross-entropy.

    Raises:
        ValueError: ``label_smoothing`` with the ``sigmoid`` loss.
    """
    if loss == "softmax":
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError("label smoothing applies to the softmax cross-entropy only, not the sigmoid loss")
    return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum") / max(len(y), 1)


class TrainStep:
    """One optimizer step: ``passes`` forward and backward passes, the gradient wait, the learning
    rate, fp16 unscaling and the optimizer step, in the order of the module docstring, as a
    recipe's ``train`` and ``dist`` sections ask (``precision``, ``channels_last``, ``compile``,
    ``backward_passes_per_step``, ``fp16_allreduce``).

    Call it with each batch (:meth:`__call__`); the call that completes ``passes`` backward passes
    also takes the optimizer step.

    Args:
        model: the network, already on ``device``; converted to channels_last here if asked.
            It stays the module to optimise, save, broadcast and evaluate.
        device: where it runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (:data:`PRECISIONS`).
        channels_last: model and inputs in channels_last memory format.
        compile: ``torch.compile`` the model for training.
        batch_shape: ``(N, T, 3, H, W)`` of every training batch; needed with ``compile`` for the
            compile-time check.
        optimizer: the optimizer of ``model``'s parameters (:func:`tsmtrain.optim.create_optimizer`),
            not yet wrapped: the engine wraps it here, after the compile check, so that the
            check's backward fires none of Horovod's allreduce hooks. ``None``: a step that only
            runs forward and backward (:meth:`forward_backward`).
        engine: the data-parallel engine (default: one process,
            :class:`~tsmtrain.dist.base.LocalEngine`); it wraps the model for the training forward
            (:meth:`~tsmtrain.dist.base.Engine.wrap_model`, DDP's) and the optimizer.
        schedule: the learning rate schedule applied before every optimizer step; ``None``: the
            optimizer's own rate.
        passes: backward passes per optimizer step (``dist.backward_passes_per_step``); each
            pass's loss is divided by it, so the step averages them.
        fp16_allreduce: compress the gradient allreduce to float16 (``dist.fp16_allreduce``).
        clock: the run's phase clock (default: one that times nothing).
        loss: ``"softmax"`` or ``"sigmoid"`` (:func:`classification_loss`; ``model.loss``).
        head_parallel: this rank's part of a classifier sharded across ranks
            (:class:`~tsmtrain.dist.head_parallel.HeadParallel`); ``model.fc`` is then this
            rank's slice. ``None``: the whole head on every rank.
        head_optimizer: with ``head_parallel``, the optimizer of ``model.fc``'s parameters (not
            wrapped by the engine); ``optimizer`` then holds the others' (``None`` when there are
            none: a head trained alone on features).
        nonfinite: ``"stop"`` or ``"skip"`` (:data:`NONFINITE`; ``train.nonfinite``): what a step
            whose averaged gradients hold an inf or NaN does without fp16 (with fp16 the
            gradient scaler skips it and lowers the scale).
        label_smoothing: eps of :func:`classification_loss` in training (``train.label_smoothing``;
            softmax and an unsharded head only).

    Attributes:
        forward_model: what the training forward calls: the model, wrapped by the engine, then
            compiled, as asked.
        optimizer: the engine's wrapper of ``optimizer`` (``None`` without one).
        scaler: the ``torch.amp.GradScaler`` (fp16), else ``None``.
        skipped_steps: steps skipped for an inf or NaN gradient (``nonfinite="skip"``).

    Raises:
        ValueError: an unknown precision, loss or ``nonfinite``; ``compile`` without ``batch_shape``;
            ``label_smoothing`` with the sigmoid loss or a sharded head.
        NonFiniteLoss: from a call whose optimizer step finds an inf or NaN gradient
            (``nonfinite="stop"``, without fp16).
        TrainingError: ``compile`` and torch.compile fails on this model, device or compiler
            (the message names ``train.compile``).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, batch_shape: tuple[int, ...] | None = None,
                 *, optimizer: torch.optim.Optimizer | None = None, engine: Engine | None = None,
                 schedule: LRSchedule | None = None, passes: int = 1, fp16_allreduce: bool = False,
                 clock: PhaseClock | None = None, loss: str = "softmax", head_parallel: HeadParallel | None = None,
                 head_optimizer: torch.optim.Optimizer | None = None, nonfinite: str = "stop",
                 label_smoothing: float = 0.0):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite {nonfinite!r}; choose one of {', '.join(NONFINITE)}")
        if label_smoothing and (loss != "softmax" or head_parallel is not None):
            raise ValueError("label smoothing applies to the softmax cross-entropy of an unsharded head only")
        self.nonfinite, self.skipped_steps, self.label_smoothing = nonfinite, 0, label_smoothing
        self._loss = None  # this step's last pass's loss (a device tensor)
        self._last_finite = None  # (step, loss tensor) of the last step taken
        self._buffers = []  # nonfinite="skip": the buffers as the step in progress found them
        self.loss, self.head_parallel, self.head_optimizer = loss, head_parallel, head_optimizer
        self.model, self.device, self.precision, self.channels_last = model, device, precision, channels_last
        self.engine = engine if engine is not None else LocalEngine()
        self.schedule, self.passes = schedule, passes
        self.clock = clock if clock is not None else PhaseClock(device, enabled=False)
        self._passes_done = 0  # backward passes of the optimizer step in progress
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place: the same Parameter objects
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        # the engine's wrapper (DDP) around the model in its memory format, compiled around that
        own = () if head_parallel is None else tuple(f"fc.{name}" for name, _ in model.fc.named_parameters())
        self.forward_model = self.engine.wrap_model(model, fp16=fp16_allreduce, **({"exclude": own} if own else {}))
        if compile:
            if batch_shape is None:
                raise ValueError("compile needs batch_shape for its check before training")
            self.forward_model = torch.compile(self.forward_model, dynamic=False)
            self._check_compile(batch_shape)
        self.optimizer = None if optimizer is None else self.engine.wrap_optimizer(
            optimizer, model, fp16=fp16_allreduce, backward_passes_per_step=passes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int = 0) -> StepOutput:
        """One backward pass of ``(x, y)``, and when it is the step's ``passes``-th, the optimizer
        step (:meth:`optimizer_step`).

        Args:
            x: clips ``(N, T, 3, H, W)`` float on the device.
            y: labels ``(N,)`` int64 on the device.
            step: the number of the optimizer step this pass belongs to (optimizer steps done
                before it), for the learning rate schedule.

        Returns:
            A :class:`StepOutput`.
        """
        self._passes_done += 1
        last = self._passes_done == self.passes
        if self._passes_done == 1:
            self.engine.begin_step(step)  # post-local SGD: whether this step's gradients are averaged
        if self.nonfinite == "skip" and self._passes_done == 1:  # a skipped step leaves BatchNorm's statistics too
            self._buffers = [b.detach().clone() for b in self.model.buffers()]
        with self.engine.accumulate(self.forward_model, last=last):  # DDP: no_sync() but on the last pass
            logits, loss, best = self.forward_backward(x, y)  # the allreduce runs during the last backward
        self.clock.lap("forward_backward")
        self._loss = loss.detach()
        if not last:
            return StepOutput(logits, loss, best)
        self._passes_done = 0
        return StepOutput(logits, loss, best, stepped=True, lr=self.optimizer_step(step))

    def autocast(self):
        """The autocast context of this step's precision."""
        return autocast(self.precision, self.device)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Clips ``(N, T, C, H, W)`` in this step's memory format (:func:`as_memory_format`)."""
        return as_memory_format(x, self.channels_last)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                           torch.Tensor]:
        """Forward and loss (:func:`classification_loss`) under autocast, then backward of ``loss / passes``
        (gradient accumulation over ``passes`` backward passes), scaled with fp16. The engine's
        :meth:`~tsmtrain.dist.base.Engine.accumulate` context is the caller's (:meth:`__call__`).
        With a sharded head, the global batch's loss (:meth:`_sharded_loss`).

        Args:
            x: clips ``(N, T, 3, H, W)`` float on the device.
            y: labels ``(N,)`` int64, or multi-hot ``(N, K)`` float (``sigmoid``).

        Returns:
            ``(logits (N, K) or None, loss, best (N,))``: the loss is the unscaled mean over the
            batch (fp32).
        """
        with self.autocast():
            if self.head_parallel is None:
                logits = self.forward_model(self.batch(x))
                loss = to_backward = classification_loss(logits, y, self.loss, self.label_smoothing)
                best = logits.detach().argmax(dim=1)
            else:
                logits, (to_backward, loss, best) = None, self._sharded_loss(x, y)
        scaled = to_backward / self.passes
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return logits, loss, best

    def _sharded_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(to_backward, loss, best)`` with this rank's slice of the head
        (:class:`~tsmtrain.dist.head_parallel.HeadParallel`): features through the engine's
        wrapper, gathered, scored by this rank's classes, the global batch's loss."""
        hp = self.head_parallel
        features = self.forward_model(self.batch(x), classify=False)  # (n_r, D)
        counts = hp.counts(len(features))
        logits = hp.logits(features, self.model.fc, counts)  # (N, K_r)
        to_backward, loss = hp.loss(logits, hp.targets(y, counts))
        with torch.no_grad():
            best = hp.best(logits.detach(), counts)
        return to_backward, loss, best

    def optimizer_step(self, step: int = 0) -> float | None:
        """The optimizer step once the passes' backward has run, in the order of the module
        docstring: wait for the averaged gradients, set the learning rate of ``step``, (fp16)
        unscale them, step (fp16: unless one is inf/NaN), (fp16) update the scale, zero the
        gradients. Laps ``allreduce_wait`` and ``optimizer`` on the clock.

        Returns:
            The learning rate set (``None`` without a schedule).

        Raises:
            ValueError: the step was built without an optimizer.
        """
        optimizer, scaler = self.optimizer, self.scaler
        optimizers = [o for o in (optimizer, self.head_optimizer) if o is not None]  # a sharded head's is its own
        if not optimizers:
            raise ValueError("this TrainStep has no optimizer")
        if optimizer is not None:
            self.engine.wait_gradients(optimizer)  # Horovod: optimizer.synchronize()
        self.clock.lap("allreduce_wait")
        self.clock.move("forward_backward", "allreduce_wait", self.engine.hidden_wait_s())  # DDP waited in backward()
        lr = None
        if scaler is not None and (self.head_parallel is not None or self.engine.local_gradients):
            self._share_head_overflow()
        for o in optimizers:
            lr = self.schedule.apply(o, step) if self.schedule is not None else None
            if scaler is not None:
                scaler.unscale_(o)
        if scaler is None and not self._gradients_finite(optimizers):
            for o in optimizers:
                o.zero_grad()
            if self.nonfinite == "stop":
                last = self._last_finite
                raise NonFiniteLoss(step + 1, self._loss_value(),
                                    None if last is None else (last[0], float(last[1])))
            self.skipped_steps += 1
            with torch.no_grad():  # the NaN batch's BatchNorm statistics go too
                for b, kept in zip(self.model.buffers(), self._buffers):
                    b.copy_(kept)
            self.clock.lap("optimizer")
            return lr
        # (a sharded head's optimizer is not Horovod's: it starts no allreduce)
        with self.engine.skip_synchronize(optimizer) if optimizer is not None else nullcontext():
            for o in optimizers:
                if scaler is not None:
                    scaler.step(o)  # skipped if a gradient is inf/NaN
                else:
                    o.step()
        if scaler is not None:
            scaler.update()
        self._last_finite = (step + 1, self._loss)
        for o in optimizers:
            o.zero_grad()  # (Horovod's override takes no set_to_none)
        self.clock.lap("optimizer")
        return lr

    def _loss_value(self) -> float:
        return float("nan") if self._loss is None else float(self._loss)

    def _gradients_finite(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        """Whether the classifier's gradients (``model.fc``; without one, every gradient the
        optimizers would apply) are finite: any inf or NaN of the forward pass or the loss reaches
        them, and they are a small part of the network's, so the check adds little to the step (an
        overflow inside the backward pass alone is not caught). The gradients are the ranks' average, so every rank gets the same answer without communicating, except with a
        sharded head, whose shards' gradients are each rank's own, and under local SGD, where every rank's
        are (one allreduce of a flag)."""
        head = getattr(self.model, "fc", None)
        params = (list(head.parameters()) if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters())
                  else [p for o in optimizers for g in o.param_groups for p in g["params"]])
        grads = [p.grad for p in params if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))
        if self.head_parallel is not None or self.engine.local_gradients:
            bad = torch.tensor([0.0 if finite else 1.0], dtype=torch.float64)
            finite = self.engine.allreduce(bad, average=False).item() == 0
        return finite

    def _share_head_overflow(self) -> None:
        """fp16 with a sharded head: when any rank's head shard has an inf/NaN gradient, every
        rank's gradients are made inf (one allreduce), so that every rank skips the whole step
        and lowers the scale together, as one process with the whole head would. (The
        backbone's gradients are averaged already, so their own overflow is the same everywhere.)
        Under local SGD every gradient is the rank's own, so all are checked: the ranks' scalers
        stay equal, and a checkpoint's (rank 0's) is every rank's."""
        own = self.model.fc if self.head_parallel is not None else self.model  # local SGD: every gradient is own
        head = [p.grad for p in own.parameters() if p.grad is not None]
        bad = torch.tensor([float(any(not bool(torch.isfinite(g).all()) for g in head))], dtype=torch.float64)
        if self.engine.allreduce(bad, average=False).item() > 0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))

    def loss_scale(self) -> float | None:
        """The fp16 loss scale now (``None`` without a scaler); reading it waits for the device."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps of this step: the scaler's state (``None`` without one)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict` (nothing to do without a scaler or a saved state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def _check_compile(self, batch_shape: tuple[int, ...]) -> None:
        """Compile now, on a zero batch of the training shape, forward and backward, instead of
        at the first training step; restore the buffers (BatchNorm statistics) and drop the
        gradients, so that training starts from the same state as without the check. Uses the
        global RNG (dropout), which the training loop seeds afterwards."""
        model = self.model
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        x = torch.zeros(batch_shape, device=self.device)
        y = (torch.zeros(batch_shape[0], dtype=torch.long, device=self.device) if self.loss == "softmax" else
             torch.zeros(batch_shape[0], self.model.num_classes, device=self.device))
        was_training = model.training
        model.train()
        try:
            self.forward_backward(x, y)
        except Exception as err:  # dynamo, AOTAutograd, inductor and the C++/Triton compilers raise many kinds
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise TrainingError(f"train.compile: true: torch.compile failed on this model and device "
                                f"({type(err).__name__}: {first}); set train.compile: false to train uncompiled") from err
        finally:
            model.train(was_training)
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    buf.copy_(buffers[name])
            for p in model.parameters():
                p.grad = None
        if self.scaler is not None:  # the check's backward must not count for the scaler
            self.scaler = torch.amp.GradScaler(self.device.type)
