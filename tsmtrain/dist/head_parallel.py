"""A classifier sharded across ranks (``model.head_parallel: true``): data parallelism for the
backbone, model parallelism for the head.

Hwang et al. (KDD 2019, "Large-scale training framework for video annotation") combine data
parallelism for the network with model parallelism for classifiers too large to replicate; the
softmax part follows Megatron-LM's vocabulary-parallel cross-entropy (Shoeybi et al. 2019,
sec. 3, "parallelizing the output embedding"). With S ranks and K classes:

* rank r holds the classes ``[lo_r, hi_r)`` of :func:`class_shard` (``K / S`` each, the first
  ``K mod S`` ranks one more), and only them: a linear head's rows, an MoE head's gates and
  experts of those classes;
* the backbone's features ``(n_r, D)`` of every rank are gathered (:func:`gather_features`,
  ``(N, D)``, ``N = sum n_r``: the global batch) and each rank scores its classes for the whole
  global batch, ``(N, K_r)``;
* the loss is that of the global batch: ``sigmoid``, binary cross-entropy summed over classes,
  so each rank adds its classes' part (:meth:`HeadParallel.loss`); ``softmax``, the
  vocabulary-parallel cross-entropy, whose log-sum-exp needs the row maxima (gathered) and the
  sums of exponentials and the target logit (allreduced) from every rank (:class:`_VocabParallelCE`);
* in backward, each rank's gradient of the gathered features is summed over ranks and each rank
  takes its own rows back to its backbone; the head's gradients stay on their rank: they are
  left out of the engine's gradient allreduce (a separate optimizer, see
  :class:`tsmtrain.train.step.TrainStep`).

A step on S ranks with ``n`` clips each then equals one process with ``S n`` clips and the whole
head (tested). Memory per rank for the head's parameters, gradients and momentum is ``1/S`` of
the replicated head; the price is two gathers of ``(N, D)`` features per step (forward, and
backward as an allreduce).

This module knows the engine (:class:`~tsmtrain.dist.base.Engine`) and tensors, not the networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Engine

__all__ = ["class_shard", "HeadParallel", "gather_features"]


def class_shard(num_classes: int, rank: int, size: int) -> tuple[int, int]:
    """The classes ``[lo, hi)`` rank ``rank`` of ``size`` holds: contiguous, ``num_classes // size``
    each, the first ``num_classes % size`` ranks one more.

    Raises:
        ValueError: fewer classes than ranks, or ``rank`` outside ``0 .. size-1``.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    if num_classes < size:
        raise ValueError(f"model.head_parallel: {num_classes} classes cannot be split over {size} ranks")
    base, extra = divmod(num_classes, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows ``(n_r, D)`` stacked in rank order, ``(N, D)``. Backward: the
    gradient of the stacked rows summed over ranks, this rank's rows, times S (the engine then
    averages the backbone's gradients over the S ranks, which gives the sum, the gradient of the
    global batch's loss)."""

    @staticmethod
    def forward(ctx, rows, engine, start, name):
        ctx.engine, ctx.start, ctx.n = engine, start, len(rows)
        return engine.allgather(rows.contiguous(), name=name)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.engine.allreduce(grad.contiguous(), average=False)
        return total[ctx.start:ctx.start + ctx.n] * ctx.engine.size, None, None, None


def gather_features(features: torch.Tensor, engine: Engine, start: int, name: str = "head_features") -> torch.Tensor:
    """Every rank's features ``(n_r, D)`` stacked in rank order, ``(N, D)``, differentiable
    (:class:`_GatherRows`); ``start`` is this rank's first row, ``sum of n_q for q < rank``."""
    if engine.size == 1:
        return features
    return _GatherRows.apply(features, engine, start, name)


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy of a global batch whose classes are split across ranks (Megatron-LM's
    vocabulary-parallel cross-entropy). Input this rank's logits ``(N, K_r)`` of its classes
    ``[lo, lo + K_r)`` and every clip's label ``(N,)``; output the loss, the same on every rank.
    Gradient of the logits: ``(softmax - onehot) / N`` on this rank's classes."""

    @staticmethod
    def forward(ctx, logits, labels, lo, engine):
        logits = logits.float()
        n, k = logits.shape
        row_max = engine.allgather(logits.max(dim=1).values[None].contiguous(), name="vocab_max").max(dim=0).values
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        inside = (labels >= lo) & (labels < lo + k)
        index = (labels - lo).clamp(0, k - 1)
        target = torch.where(inside, shifted.gather(1, index[:, None])[:, 0], torch.zeros_like(row_max))
        sums = engine.allreduce(torch.stack([exp.sum(dim=1), target]), average=False)  # (2, N)
        ctx.save_for_backward(exp / sums[0][:, None], inside, index)
        return (sums[0].log() - sums[1]).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, inside, index = ctx.saved_tensors
        out = softmax.clone()
        rows = inside.nonzero()[:, 0]
        out[rows, index[rows]] -= 1
        return out * (grad / len(out)), None, None, None


class HeadParallel:
    """What one rank needs to train and evaluate its shard of the classifier.

    Args:
        engine: the run's engine (rank, world size, collectives).
        num_classes: K, the whole vocabulary.
        loss: ``"softmax"`` or ``"sigmoid"`` (``model.loss``).

    Attributes:
        lo, hi: this rank's classes ``[lo, hi)`` (:func:`class_shard`).
        ranges: every rank's ``(lo, hi)``, in rank order.

    Raises:
        ValueError: fewer classes than ranks; an unknown loss.
    """

    def __init__(self, engine: Engine, num_classes: int, loss: str = "softmax"):
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown loss {loss!r}")
        self.engine, self.num_classes, self.loss_kind = engine, num_classes, loss
        self.ranges = [class_shard(num_classes, r, engine.size) for r in range(engine.size)]
        self.lo, self.hi = self.ranges[engine.rank]

    def counts(self, n: int) -> list[int]:
        """Every rank's number of clips ``n_r`` (one small allreduce)."""
        mine = torch.zeros(self.engine.size, dtype=torch.float64)
        mine[self.engine.rank] = n
        return self.engine.allreduce(mine, average=False).long().tolist()

    def logits(self, features: torch.Tensor, head: torch.nn.Module, counts: list[int]) -> torch.Tensor:
        """This rank's classes' logits for the global batch, ``(N, K_r)``: ``head`` (this rank's
        shard) on every rank's ``features (n_r, D)`` gathered."""
        start = sum(counts[:self.engine.rank])
        # fp32 on the wire: every rank's rows must have one dtype (an empty batch's too, under autocast)
        return head(gather_features(features.float(), self.engine, start))

    def targets(self, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The global batch's targets for this rank's classes: labels ``(N,)`` from every rank's
        ``(n_r,)`` (``softmax``), or the multi-hot ``(N, K_r)`` of this rank's classes from every
        rank's multi-hot ``(n_r, K)`` (``sigmoid``; sent as (clip, class) pairs, not as rows)."""
        engine = self.engine
        if self.loss_kind == "softmax":
            return engine.allgather(y.contiguous(), name="head_labels")
        pairs = y.nonzero()  # (P, 2): clip, class
        pairs[:, 0] += sum(counts[:engine.rank])
        pairs = engine.allgather(pairs.contiguous(), name="head_label_pairs")
        pairs = pairs[(pairs[:, 1] >= self.lo) & (pairs[:, 1] < self.hi)]
        out = torch.zeros(sum(counts), self.hi - self.lo, device=y.device)
        out[pairs[:, 0], pairs[:, 1] - self.lo] = 1.0
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_backward, value)`` for this rank's logits ``(N, K_r)`` and :meth:`targets`.

        ``value`` is the global batch's mean loss (a 0-d fp32 tensor, the same on every rank,
        detached): cross-entropy, or binary cross-entropy summed over the K classes. Backward of
        ``to_backward`` gives this rank's head its exact gradient and the gathered features this
        rank's part of theirs.
        """
        if self.loss_kind == "softmax":
            loss = _VocabParallelCE.apply(logits, targets, self.lo, self.engine)
            return loss, loss.detach()
        part = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / max(len(targets), 1)
        return part, self.engine.allreduce(part.detach()[None], average=False)[0]

    def full(self, logits: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every class's logits for this rank's own clips, ``(n_r, K)``, from every rank's
        ``(N, K_r)`` (gathered class-major: ``N K`` values per rank, for evaluation and tests)."""
        every = self.engine.allgather(logits.float().t().contiguous(), name="head_logits")  # (K, N)
        start = sum(counts[:self.engine.rank])
        return every[:, start:start + counts[self.engine.rank]].t()

    def best(self, logits: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The best class of each of this rank's own clips, int64 ``(n_r,)``, from every rank's
        ``(N, K_r)``: each rank's best value and class are gathered (``2 N`` values per rank)."""
        values, index = logits.float().max(dim=1)
        mine = torch.stack([values.double(), (index + self.lo).double()])[None]  # (1, 2, N)
        every = self.engine.allgather(mine.contiguous(), name="head_best")  # (S, 2, N)
        winner = every[:, 0].argmax(dim=0)  # (N,)
        best = every[winner, 1, torch.arange(every.shape[2], device=every.device)].long()
        start = sum(counts[:self.engine.rank])
        return best[start:start + counts[self.engine.rank]]
