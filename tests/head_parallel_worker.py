"""A classifier sharded across ranks against the whole classifier on one process
(tests/test_head_parallel.py).

usage: python tests/head_parallel_worker.py ENGINE OUT_DIR   (ENGINE: ddp or horovod; 2 ranks)

Every case trains a tiny network (a linear "backbone" and a head) for :data:`STEPS` optimizer
steps on a global batch of :data:`N` clips, each rank on its rows; the head's classes are split
over the ranks (7 classes: 4 and 3). Each rank saves, per case: the loss of every step, its
weights after the steps, and its features' gradient from one forward and backward of the
sharded loss. :func:`run_case` with the single-process engine and ``sharded=False`` is the
reference the test compares them with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tsmtrain.dist.head_parallel import HeadParallel
from tsmtrain.models import create_head, shard_classifier
from tsmtrain.optim import create_optimizer
from tsmtrain.recipe import OptimConfig
from tsmtrain.train import TrainStep
from tsmtrain.train.step import classification_loss

K, D, N, STEPS = 7, 6, 8, 3
CASES = [("softmax", "linear", "sgd"), ("softmax", "linear", "lars"), ("sigmoid", "linear", "sgd"),
         ("sigmoid", "moe", "sgd"), ("sigmoid", "moe", "lars")]


class TinyNet(nn.Module):
    """The interface of VideoNet that training uses: ``features``, ``fc``, ``forward(x, classify)``."""

    def __init__(self, head: str):
        super().__init__()
        self.head, self.feature_dim, self.num_classes = head, D, K
        self.backbone = nn.Linear(5, D)
        self.fc = create_head(head, D, K, 2)

    def features(self, x):
        return torch.tanh(self.backbone(x))

    def forward(self, x, classify=True):
        f = self.features(x)
        return self.fc(f) if classify else f


def batch(step: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: clips ``(N, 5)`` and labels ``(N,)`` or multi-hot ``(N, K)``
    (some clips with no label)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N, 5, generator=g)
    if loss == "softmax":
        return x, torch.randint(0, K, (N,), generator=g)
    return x, (torch.rand(N, K, generator=g) < 0.3).float()


def run_case(engine, loss: str, head: str, optim: str, sharded: bool) -> dict:
    """Train one case on this rank's rows (all of them without ``sharded``); returns the losses,
    the weights and the features' gradient (see the module docstring)."""
    torch.manual_seed(0)
    model = TinyNet(head)
    cfg = OptimConfig(name=optim, base_lr=0.5, weight_decay=1e-3, trust_coefficient=0.02)
    hp = HeadParallel(engine, K, loss) if sharded else None
    lo, hi = (hp.lo, hp.hi) if sharded else (0, K)
    shard_classifier(model, lo, hi, seed=3)  # the same head, whatever the split
    if sharded:
        step = TrainStep(model, torch.device("cpu"), optimizer=create_optimizer(model, cfg, skip=model.fc),
                         head_optimizer=create_optimizer(model.fc, cfg, sum_across=lambda t: engine.allreduce(
                             t, average=False)), engine=engine, loss=loss, head_parallel=hp)
    else:
        step = TrainStep(model, torch.device("cpu"), optimizer=create_optimizer(model, cfg), engine=engine, loss=loss)
    n = N // engine.size
    rows = slice(engine.rank * n, (engine.rank + 1) * n) if sharded else slice(0, N)
    losses = []
    for i in range(STEPS):
        x, y = batch(i, loss)
        losses.append(step(x[rows], y[rows], step=i).loss.item())
    x, y = batch(STEPS, loss)
    features = model.features(x[rows]).detach().requires_grad_()
    if sharded:
        counts = hp.counts(len(features))
        to_backward, _ = hp.loss(hp.logits(features, model.fc, counts), hp.targets(y[rows], counts))
    else:
        to_backward = classification_loss(model.fc(features), y, loss)
    to_backward.backward()
    return {"losses": losses, "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "feature_grad": features.grad.clone(), "classes": (lo, hi)}


def main() -> None:
    kind, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if kind == "ddp":
        from tsmtrain.dist.ddp import DDPEngine

        engine = DDPEngine()
    else:
        from tsmtrain.dist.horovod import HorovodEngine

        engine = HorovodEngine()
    results = {case: run_case(engine, *case, sharded=True) for case in CASES}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{engine.rank}.pt")
    engine.shutdown()


if __name__ == "__main__":
    main()
