"""``dist.sync``: how the ranks' models stay together, and the bytes that costs.

* ``allreduce`` (the default): the gradients are averaged at every optimizer step (DDP's
  buckets, Horovod's fused ring-allreduce), so the ranks' parameters never differ.
* ``local_sgd``: post-local SGD (Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use
  Local SGD", ICLR 2020). The first ``dist.local_sgd_start`` epochs (rounded to optimizer
  steps) average the gradients as above; from then on each rank steps on its own gradients
  (:meth:`~tsmtrain.dist.base.Engine.use_local_sgd`), and the parameters and BatchNorm
  statistics are averaged (:meth:`~tsmtrain.dist.base.Engine.average_model`) after every
  ``dist.local_sgd_period`` (H) local steps, counted from the start, and at every epoch end
  (so that evaluation and the epoch's checkpoint see one model). The optimizer's state
  (momentum) stays each rank's own, as PyTorch's ``PeriodicModelAverager`` leaves it.

Averaging after step ``n`` (optimizer steps done) happens when ``n > start`` and
``(n - start) % H == 0``, or ``n`` ends an epoch: a function of ``n`` alone, so a resumed run
averages exactly where an uninterrupted one does. Between averagings the ranks' parameters
differ: a checkpoint then holds every rank's model and optimizer state
(:meth:`LocalSGD.checkpoint_kind`, :func:`tsmtrain.train.checkpoint.save_run_checkpoint`).

Bytes: :meth:`LocalSGD.step_done` counts what each optimizer step allreduces, as one rank's
payload (a ring allreduce sends about twice that per rank): the gradients of the trainable
parameters (in float16 with ``dist.fp16_allreduce``) at a synchronous step, the parameters and
floating-point buffers at an averaging; the stop vote's 8 bytes per step and, under local SGD,
the 8-byte flag with which the ranks agree on a non-finite gradient are left out.
"""

from __future__ import annotations

from torch import nn

from .base import Engine, model_tensors

__all__ = ["LocalSGD", "start_step"]


def start_step(local_sgd_start: float, steps_per_epoch: int) -> int:
    """The first local optimizer step (counted from 0) of ``dist.local_sgd_start`` epochs:
    ``round(local_sgd_start * steps_per_epoch)``."""
    return int(round(local_sgd_start * steps_per_epoch))


class LocalSGD:
    """When the ranks average their models, and the bytes allreduced per optimizer step.

    Args:
        engine: the run's engine; with ``sync="local_sgd"`` it is told to step locally from
            ``start`` on (:meth:`~tsmtrain.dist.base.Engine.use_local_sgd`), so build this before
            the engine wraps the model and optimizer.
        model: the plain network (what is averaged).
        sync: ``"allreduce"`` or ``"local_sgd"`` (``dist.sync``).
        period: H, optimizer steps between averagings (``dist.local_sgd_period``), >= 1.
        start: the first local optimizer step (:func:`start_step`), >= 0.
        fp16_allreduce: gradients are sent as float16 (for the byte count).
        exclude: parameters whose gradients are not averaged (a sharded head's).

    Attributes:
        grad_bytes: bytes of one gradient allreduce (0 with one rank).
        model_bytes: bytes of one averaging of the model (0 with one rank).
        averaged_at: the optimizer step after which the model was last averaged (-1: never).
    """

    def __init__(self, engine: Engine, model: nn.Module, sync: str = "allreduce", period: int = 1, start: int = 0,
                 fp16_allreduce: bool = False, exclude: tuple[nn.Parameter, ...] = ()):
        if sync not in ("allreduce", "local_sgd"):
            raise ValueError(f"unknown dist.sync {sync!r}; choose allreduce or local_sgd")
        if period < 1 or start < 0:
            raise ValueError(f"local SGD needs period >= 1 and start >= 0, not {period} and {start}")
        self.engine, self.model, self.local = engine, model, sync == "local_sgd"
        self.period, self.start = period, start
        skip = {id(p) for p in exclude}
        several = engine.size > 1
        self.grad_bytes = several * sum(p.numel() * (2 if fp16_allreduce else p.element_size())
                                        for p in model.parameters() if p.requires_grad and id(p) not in skip)
        self.model_bytes = several * sum(t.numel() * 4 for t in model_tensors(model))  # averaged in float32
        self.averaged_at = -1
        self._bytes = 0
        if self.local:
            engine.use_local_sgd(start)

    def describe(self) -> str:
        """One line of what this run communicates (for the log)."""
        if not self.local:
            return f"gradients allreduced every step ({self.grad_bytes / 1e6:.2f} MB)"
        return (f"local SGD: gradients allreduced for the first {self.start} steps ({self.grad_bytes / 1e6:.2f} MB "
                f"each), then each rank steps alone and the models ({self.model_bytes / 1e6:.2f} MB of parameters "
                f"and buffers) are averaged every {self.period} steps and at epoch ends")

    def is_local(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 0) uses each rank's own gradients."""
        return self.local and step >= self.start

    def due(self, done: int, epoch_end: bool = False) -> bool:
        """Whether the models are averaged after ``done`` optimizer steps (``epoch_end``: that
        step ended an epoch)."""
        if not self.local or done <= self.start:
            return False
        return epoch_end or (done - self.start) % self.period == 0

    def step_done(self, done: int, epoch_end: bool = False) -> bool:
        """After optimizer step ``done`` (steps done, >= 1): count its bytes and average the
        models when :meth:`due`. Every rank must call it after every optimizer step.

        Returns:
            Whether the models were averaged.
        """
        if not self.is_local(done - 1):
            self._bytes += self.grad_bytes
        if not self.due(done, epoch_end):
            return False
        self.engine.average_model(self.model)
        self._bytes += self.model_bytes
        self.averaged_at = done
        return True

    def epoch_done(self, done: int) -> None:
        """At an epoch's end, after :meth:`step_done`: make every rank hold one model for
        evaluation and the checkpoint. Local SGD averaged it with the epoch's last step;
        otherwise (allreduce, or the warm-up) the parameters are equal and only the BatchNorm
        statistics are averaged (:meth:`~tsmtrain.dist.base.Engine.average_buffers`)."""
        if self.averaged_at != done:
            self.engine.average_buffers(self.model)

    def checkpoint_kind(self, done: int) -> str | None:
        """What of each rank a checkpoint after ``done`` optimizer steps must hold besides rank
        0's model: ``None`` (nothing: before local SGD), ``"optimizer"`` (each rank's optimizer
        state: the models were just averaged, the momentum is each rank's), or ``"model"``
        (each rank's parameters, buffers and optimizer state: between averagings)."""
        if not self.local or done <= self.start:
            return None
        return "optimizer" if self.averaged_at == done else "model"

    def take_bytes(self) -> int:
        """Bytes allreduced since the last call (for a logging interval)."""
        taken, self._bytes = self._bytes, 0
        return taken
