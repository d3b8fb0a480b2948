"""Recipes: one YAML file that says everything about a training run.

* :mod:`.schema`: the eight sections (``data``, ``model``, ``optim``, ``schedule``, ``dist``,
  ``train``, ``run``, ``cluster``) as pydantic models, :class:`Recipe` with its combination
  checks and its run directory, and :func:`dump_recipe` / :func:`with_absolute_paths`.
* :mod:`.loader`: :func:`load_recipe` (strict YAML: duplicate keys and alias bombs refused),
  ``--set`` overrides, the line of every key, the file checks.
* :mod:`.problems`: :class:`Problem` and :class:`RecipeError`: every problem of a recipe,
  each with file, line, key and value, raised together.

Loading collects *every* problem (unknown key, wrong type, missing file, impossible combination)
before raising one :class:`RecipeError`; the CLI prints them one per line and exits with status 2.
The learning rate a recipe gives on N ranks (the linear scaling rule) is
:func:`tsmtrain.optim.linear_scaling`; label maps (class-name files) are read by :mod:`.label_map`.

This package imports no torch: ``tsmtrain validate``, ``render`` and ``submit`` run without it.
"""

from .loader import apply_overrides, line_index, load_recipe, yaml_load
from .problems import Problem, RecipeError, closest, validation_problems
from .schema import (NARROWEST_SHIFTED_LAYER, PATH_FIELDS, ClusterConfig, DataConfig, DistConfig, ModelConfig,
                     OptimConfig, Recipe, RunConfig, ScheduleConfig, TrainConfig, dump_recipe, time_limit_seconds,
                     with_absolute_paths)

__all__ = ["Recipe", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "DistConfig", "TrainConfig",
           "RunConfig", "ClusterConfig", "NARROWEST_SHIFTED_LAYER", "PATH_FIELDS", "time_limit_seconds",
           "with_absolute_paths", "dump_recipe", "Problem", "RecipeError", "validation_problems", "closest",
           "load_recipe", "apply_overrides", "yaml_load", "line_index"]
