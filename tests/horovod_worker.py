"""Run under horovodrun, mpirun or torchrun by tests/test_horovod.py and tests/test_ddp.py: train a
recipe, save this rank's weights.

usage: python tests/horovod_worker.py RECIPE OUT_DIR
"""

import sys
from pathlib import Path

import torch

from tsmtrain.recipe import load_recipe
from tsmtrain.train import train

recipe, out = sys.argv[1], Path(sys.argv[2])
result = train(load_recipe(recipe))
out.mkdir(parents=True, exist_ok=True)
torch.save({"step": result.step, "model": result.model.state_dict()}, out / f"rank{result.rank}.pt")
