"""Diagnostics: checks and benchmarks of a node and a recipe.

* :mod:`.doctor`: ``tsmtrain doctor``: the node's software, GPUs, NCCL, decoders, and with a
  recipe its loader, step and allreduce figures
* :mod:`.step`: ``tsmtrain bench step``: the training step's clips/s per variant, and the shift
* :mod:`.allreduce`: the allreduce benchmark of a network's gradients
* :mod:`.data`: ``tsmtrain bench data``: the loader's clips/s per core
"""
