"""The embedded datasets by name (``data.generate``: ``demo``, ``study``, ``multilabel``,
``arrow_of_time``), built in ``data.root`` before a run or a sweep, as SlowFast's
``datasets/build.py`` builds a dataset by name; with ``data.modality: flow``, their optical flow."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["prepare_dataset", "prepare_sweep_data"]

log = logging.getLogger("tsmtrain")


def prepare_dataset(recipe: Recipe) -> None:
    """Build the dataset a recipe's ``data.generate`` names (``demo``, ``study``: rendered with ffmpeg;
    ``arrow_of_time``: cut from ``data.source``) in ``data.root``, and with ``data.modality: flow``
    its videos' optical flow (:func:`tsmtrain.prep.flow_files.flow_of_dataset`); nothing when it is not
    set. Every builder skips what is already there."""
    d = recipe.data
    if d.generate is None:
        return
    log.info("preparing the %s dataset in %s", d.generate, d.root)
    if d.generate == "demo":
        from .synthetic import generate_demo_dataset

        generate_demo_dataset(d.root, num_classes=recipe.model.num_classes)
    elif d.generate == "multilabel":
        from .synthetic import generate_multilabel_dataset

        generate_multilabel_dataset(d.root)
    elif d.generate == "study":
        from .synthetic import generate_study_dataset

        generate_study_dataset(d.root, num_classes=recipe.model.num_classes)
    else:
        from .arrow_of_time import build_arrow_of_time

        build_arrow_of_time(d.source, d.root)
    if d.modality == "flow":
        from ..data import read_list
        from .flow_files import flow_of_dataset

        lists = [d.train_list] + ([d.val_list] if d.val_list else [])
        videos = [r.path for path in lists for r in read_list(path, d.root, recipe.model.num_classes,
                                                                       multi_label=recipe.model.loss == "sigmoid")]
        started = time.time()
        done = flow_of_dataset(d.root, videos, d.flow_method, d.flow_preset, d.flow_bound)
        if done:
            log.info("optical flow (%s) of %d videos computed in %.1f s", d.flow_method, done, time.time() - started)


def prepare_sweep_data(recipe: Recipe) -> int:
    """What a scaling sweep needs of the data before it plans its points: the dataset that
    ``data.generate`` names, built once (:func:`prepare_dataset`), and the number of videos in
    the training list, returned.

    Raises:
        tsmtrain.data.ListFileError: the training list is missing or malformed.
    """
    from ..data import read_list

    prepare_dataset(recipe)
    return len(read_list(recipe.data.train_list, recipe.data.root, recipe.model.num_classes,
                         multi_label=recipe.model.loss == "sigmoid"))
