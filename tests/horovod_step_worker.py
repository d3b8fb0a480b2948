"""Run under horovodrun by tests/test_horovod.py: training steps of TrainStep on 2 ranks (its forward and
backward, then its optimizer step: the gradient wait, fp16 unscaling, the step under skip_synchronize).

usage: python tests/horovod_step_worker.py MODE OUT_DIR

* ``fp16-inf``: fp16 with the GradScaler; in step 1 only rank 1's loss is infinite, step 2 is
  finite. Saves per step: the scale, whether the weights moved, and the weights.
* ``compile`` / ``eager``: one step of a torch.compile'd (or eager) TSM-ResNet18, each rank on
  its own batch. Saves the weights and how many gradient allreduces Horovod's hooks started
  during backward (before ``synchronize``). It compiles with the ``aot_eager`` backend: the
  hooks hang on what AOTAutograd's compiled autograd Function does, which is the same for every
  backend, and without inductor's kernels (whose rounding differs) the step must equal eager's
  bit for bit. test_two_rank_run_with_compile runs inductor.
"""

import functools

import sys
from pathlib import Path

import torch

from tsmtrain.dist.horovod import HorovodEngine
from tsmtrain.models import VideoNet
from tsmtrain.optim import create_optimizer
from tsmtrain.recipe import OptimConfig
from tsmtrain.train import TrainStep

mode, out = sys.argv[1], Path(sys.argv[2])
if mode == "compile":
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
engine = HorovodEngine()
torch.set_num_threads(1)
cpu = torch.device("cpu")
shape = (2, 2, 3, 8, 8) if mode == "fp16-inf" else (4, 4, 3, 32, 32)
torch.manual_seed(0)
model = VideoNet("resnet18", 4, shape[1], shift=True, dropout=0.0)
step = TrainStep(model, cpu, "fp16" if mode == "fp16-inf" else "fp32", compile=mode == "compile", batch_shape=shape,
                 optimizer=create_optimizer(model, OptimConfig(base_lr=0.1)), engine=engine)
optimizer = step.optimizer  # Horovod's DistributedOptimizer, wrapped after the compile check
engine.broadcast_state(model, optimizer)
gen = torch.Generator().manual_seed(100 + engine.rank)  # each rank its own batch
x, y = torch.randn(shape, generator=gen), torch.randint(0, 4, (shape[0],), generator=gen)
result = {"rank": engine.rank}

if mode == "fp16-inf":
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)  # this tiny network's fp16 gradients stay finite
    for k, factor in ((1, float("inf") if engine.rank == 1 else 1.0), (2, 1.0)):
        before = model.fc.weight.detach().clone()
        with step.autocast():
            loss = torch.nn.functional.cross_entropy(step.forward_model(step.batch(x)), y) * factor
        step.scaler.scale(loss).backward()
        step.optimizer_step()
        result[f"scale{k}"] = step.loss_scale()
        result[f"moved{k}"] = not torch.equal(before, model.fc.weight)
else:
    step.forward_backward(x, y)
    result["hooks_fired"] = len(optimizer._handles)  # Horovod's per-parameter allreduces started in backward
    result["parameters"] = sum(p.requires_grad for p in model.parameters())
    step.optimizer_step()
result["model"] = {k: v.detach().clone() for k, v in model.named_parameters()}  # (BatchNorm statistics differ by rank)
out.mkdir(parents=True, exist_ok=True)
torch.save(result, out / f"rank{engine.rank}.pt")
