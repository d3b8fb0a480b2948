"""Evaluation: what is measured on a trained network.

* :mod:`.evaluate`: validation accuracy during training and the per-video predictions, over
  every rank's part of the list
* :mod:`.protocols`: ``tsmtrain test`` and ``predict``: K clips x C crops view protocols,
  per-video score averages, the figures and report files
* :mod:`.multilabel_metrics`: mAP, GAP@20 and Hit@1 of multi-label runs
* :mod:`.fusion`: ``tsmtrain fuse``: late fusion of tested runs (two streams)
* :mod:`.extract`, :mod:`.feature_files`: ``tsmtrain extract``: per-video features written as
  feature files with an index
"""
