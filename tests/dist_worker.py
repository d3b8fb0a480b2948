"""Engine-level checks run on every rank by tests/test_ddp.py (under torchrun or horovodrun).

usage: python tests/dist_worker.py accumulate|accumulate-fp16|syncbn ENGINE OUT_DIR

* ``accumulate``: 3 optimizer steps of a small network, 2 backward passes per step through the
  engine (DDP: ``no_sync()`` on the first); this rank's micro-batches are rows
  ``[rank, size + rank]`` of each step's 4 micro-batches (:func:`micro_batches`);
  ``accumulate-fp16`` with the gradients compressed to float16 for the allreduce.
* ``syncbn``: one forward and backward pass of conv + synchronized BatchNorm on this rank's
  rows of one global batch of 6 (2 on rank 0, 4 on rank 1).
"""

import sys
from pathlib import Path

import torch
from torch import nn

from tsmtrain.dist import create_engine

STEPS, PASSES = 3, 2


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 3))


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 4 micro-batches (of 5 rows) of one optimizer step, the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(4)]


def syncbn_batch() -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, 5, 5, generator=g) * 2 + 1
    weights = torch.randn(6, 4, 3, 3, generator=g)
    return x, weights, [slice(0, 2), slice(2, 6)]


def syncbn_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def main() -> None:
    what, engine_name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    engine = create_engine(engine_name)
    out.mkdir(parents=True, exist_ok=True)
    if what.startswith("accumulate"):
        fp16 = what.endswith("fp16")
        model = small_net()
        net = engine.wrap_model(model, fp16=fp16)
        opt = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, fp16=fp16,
                                    backward_passes_per_step=PASSES)
        engine.broadcast_state(model, opt)
        for step in range(STEPS):
            batches = micro_batches(step)
            for i in range(PASSES):
                x, y = batches[i * engine.size + engine.rank]
                with engine.accumulate(net, last=i == PASSES - 1):
                    (nn.functional.cross_entropy(net(x), y) / PASSES).backward()
            engine.wait_gradients(opt)
            with engine.skip_synchronize(opt):
                opt.step()
            opt.zero_grad()
        torch.save({**model.state_dict(), "buckets": getattr(engine, "buckets_allreduced", None)},
                   out / f"rank{engine.rank}.pt")
    elif what == "syncbn":
        model = engine.sync_batchnorm(syncbn_net())
        x_all, weights, parts = syncbn_batch()
        x = x_all[parts[engine.rank]].clone().requires_grad_(True)
        y = model(x)
        (y * weights[parts[engine.rank]]).sum().backward()
        torch.save({"y": y.detach(), "x_grad": x.grad, "bn": model[1].state_dict(), "type": type(model[1]).__name__,
                    "grads": {n: p.grad for n, p in model.named_parameters()}}, out / f"rank{engine.rank}.pt")
    engine.barrier()


if __name__ == "__main__":
    main()
