"""The scaling study: measure a recipe at several worker counts, report it, and predict the rest.

Modules, in the order the study uses them:

* :mod:`.records`: the files of a sweep directory: the point record's keys (which a reader needs,
  which an ok point must hold), the step breakdown's phases :data:`BREAKDOWN`, the one
  :class:`SweepError`, and the JSON reader and atomic writer
* :mod:`.sweep`: ``tsmtrain sweep``: plan the points, run them here or submit them to Slurm,
  measure each from its ``metrics.jsonl``, settle submitted jobs (:func:`collect`)
* :mod:`.report`: ``tsmtrain report``: the table (Markdown, CSV, terminal) and three plots of a
  sweep directory, and the model against the measured points
* :mod:`.model`: the scaling model: a ring-allreduce cost on a described network
  (:class:`NetworkSpec`) and the step time, clips/s and efficiency it predicts at worker counts
  not run (:func:`predict`), with the file opens/s and GB/s the data asks of the file system
  (:class:`DataSpec`, :func:`filesystem_load`)

None of them imports torch, the training loop or the data pipeline at module level: reporting a
finished sweep and predicting from it need neither. What only running a sweep needs (building
the dataset, the launchers) is imported where a point is run. The training loop imports
:data:`BREAKDOWN` from :mod:`.records`.
"""

from .model import (BACKWARD_SHARE, DEFAULT_SHARD_BYTES, KINETICS400_TRAIN_VIDEOS, LAYOUTS, NETWORK_BOUND_SHARE,
                    PREPARED_VIDEO_BYTES, DataSpec, FileSystemLoad, FileSystemSpec, LinkSpec, NetworkError,
                    NetworkSpec, Prediction, ScalingBasis, allreduce_seconds, basis_from_sweep, epoch_seconds,
                    expected_distinct_shards, exposed_allreduce_seconds, file_opens_per_s, filesystem_load,
                    hierarchical_allreduce_seconds, load_network, opens_per_clip, predict, read_gb_per_s,
                    ring_allreduce_seconds, shard_count, shard_opens_in_epoch, bus_bandwidth)
from .records import (BREAKDOWN, META_KEYS, OK_KEYS, RECORD_FIELDS, RECORD_KEYS, REQUIRED_KEYS, STATUSES,
                      RecordField, SweepError, check_record, new_record, point_files, point_path, read_json,
                      read_meta, read_record)
from .report import (COLUMNS, COMPARISON_HEADERS, FILESYSTEM_COLUMNS, FileSystemTable, ReportFiles, comparison_rows,
                     filesystem_table, load_sweep, print_report, table_rows, write_report)
from .sweep import (ALLREDUCE_REPEATS, SweepPlan, benchmark_recipe, collect, measure_point, parse_workers,
                    plan_sweep, run_sweep)

__all__ = [
    # records
    "BREAKDOWN", "RecordField", "RECORD_FIELDS", "RECORD_KEYS", "REQUIRED_KEYS", "OK_KEYS", "META_KEYS", "STATUSES",
    "SweepError", "read_json", "point_path", "point_files", "new_record", "check_record",
    "read_record", "read_meta",
    # sweep
    "SweepPlan", "plan_sweep", "run_sweep", "collect", "measure_point", "parse_workers", "benchmark_recipe",
    "ALLREDUCE_REPEATS",
    # report
    "ReportFiles", "COLUMNS", "FILESYSTEM_COLUMNS", "FileSystemTable", "load_sweep", "table_rows",
    "filesystem_table", "comparison_rows", "COMPARISON_HEADERS", "write_report", "print_report",
    # model
    "LinkSpec", "FileSystemSpec", "NetworkSpec", "NetworkError", "load_network", "ring_allreduce_seconds",
    "hierarchical_allreduce_seconds", "allreduce_seconds", "exposed_allreduce_seconds", "bus_bandwidth", "ScalingBasis",
    "basis_from_sweep", "Prediction", "predict", "BACKWARD_SHARE", "NETWORK_BOUND_SHARE",
    # model: the file system
    "DataSpec", "LAYOUTS", "DEFAULT_SHARD_BYTES", "KINETICS400_TRAIN_VIDEOS", "PREPARED_VIDEO_BYTES",
    "file_opens_per_s", "shard_count", "expected_distinct_shards", "shard_opens_in_epoch", "opens_per_clip",
    "read_gb_per_s", "epoch_seconds", "FileSystemLoad", "filesystem_load",
]
