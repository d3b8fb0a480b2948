"""The files of a sweep directory: what a point record holds, and how they are read and written.

A sweep directory (:mod:`tsmtrain.scaling.sweep` writes it, :mod:`tsmtrain.scaling.report`
reads it) holds ``sweep.json`` (what was swept, :data:`META_KEYS` at least) and one JSON record
per point, ``points/workers-NNNN.json``, with the keys of :data:`RECORD_FIELDS`. This module is
the one place that says which keys a record has, which of them a reader needs (:data:`REQUIRED_KEYS`)
and which must hold a value when the point is ok (:data:`OK_KEYS`); the phases of a step's
breakdown (:data:`BREAKDOWN`, also what the training loop writes to ``metrics.jsonl``); the
error of the whole package (:class:`SweepError`); and its JSON reader (:func:`read_json`, whose
messages name the sweep's files). Its files are written by :func:`tsmtrain.io.write_json`.

Imports only the standard library: the training loop imports :data:`BREAKDOWN` from here, and
``tsmtrain report`` never loads torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError

__all__ = ["BREAKDOWN", "RecordField", "RECORD_FIELDS", "RECORD_KEYS", "REQUIRED_KEYS", "OK_KEYS", "META_KEYS",
           "STATUSES", "SweepError", "read_json", "point_path", "point_files", "new_record",
           "check_record", "read_record", "read_meta"]

BREAKDOWN = ("data", "augment", "forward_backward", "allreduce_wait", "optimizer", "other")
"""The phases of an optimizer step in ``metrics.jsonl``'s ``breakdown_s`` and in a point record's
``breakdown_s`` (seconds per step, mean over ranks): waiting for the DataLoader; host-to-device
copy and batched augmentation; forward and backward (Horovod's gradient allreduce runs beside
backward); waiting for that allreduce after backward, i.e. the part backward did not hide; the
optimizer step; the rest (stop-request vote, bookkeeping). They add up to ``step_time_s``."""

STATUSES = ("ok", "failed", "submitted")
"""The ``status`` of a point: measured; failed (``error`` says why); a Slurm job not settled yet."""


class RecordField(NamedTuple):
    """One key of a point record.

    Attributes:
        key: the JSON key.
        need: ``"value"``: every record has the key and an ok record a value (not ``null``);
            ``"key"``: every record has the key (its value may be ``null``); ``""``: written by
            :mod:`tsmtrain.scaling.sweep`, but a reader does without it.
        meaning: what the value is, with its unit.
    """

    key: str
    need: str
    meaning: str


RECORD_FIELDS = (
    RecordField("workers", "key", "ranks of the point"),
    RecordField("status", "key", "one of STATUSES"),
    RecordField("error", "key", "why a failed point failed (one line), else null"),
    RecordField("launch", "", "'local' (tsmtrain run --np N here) or 'submit' (a Slurm job)"),
    RecordField("nodes", "value", "nodes the point ran on"),
    RecordField("ranks_per_node", "", "ranks on each node"),
    RecordField("global_batch", "value", "clips per optimizer step, all ranks together"),
    RecordField("batch_per_rank", "value", "clips per rank per optimizer step"),
    RecordField("lr", "", "the learning rate after the linear scaling rule"),
    RecordField("warmup_steps", "", "optimizer steps run before measuring"),
    RecordField("steps", "", "optimizer steps measured"),
    RecordField("step_time_s", "value", "seconds per optimizer step"),
    RecordField("clips_per_s", "value", "clips per second, all ranks together"),
    RecordField("clips_per_s_per_rank", "value", "clips per second per rank"),
    RecordField("breakdown_s", "value", "seconds per optimizer step of each BREAKDOWN phase"),
    RecordField("allreduce_s", "", "seconds of one standalone gradient allreduce (the median of the repeats)"),
    RecordField("gradient_bytes", "", "bytes in one gradient allreduce"),
    RecordField("parameters", "", "parameters of the model"),
    RecordField("run_dir", "", "the point's run directory"),
    RecordField("log", "", "the point's log file (point.log or slurm-JOBID.out)"),
    RecordField("job_id", "", "the Slurm job (JOBID or ARRAYID_TASK) of a submitted point, else null"),
    RecordField("seconds", "", "wall seconds the point took to run (local) or to submit"),
)
"""The schema of a point record, in the order the keys are written. Measured values are ``null``
for failed and submitted points."""

RECORD_KEYS = tuple(f.key for f in RECORD_FIELDS)
"""Every key of a point record, as :mod:`tsmtrain.scaling.sweep` writes it."""
REQUIRED_KEYS = tuple(f.key for f in RECORD_FIELDS if f.need)
"""The keys a record must have to be reported (:func:`check_record`)."""
OK_KEYS = tuple(f.key for f in RECORD_FIELDS if f.need == "value")
"""The keys an ok record must hold a value for (and ``breakdown_s`` every :data:`BREAKDOWN` phase)."""
META_KEYS = ("recipe", "mode", "steps", "warmup_steps")
"""The keys ``sweep.json`` must have to be reported (:func:`read_meta`)."""


class SweepError(UserError):
    """A sweep that cannot run, or a sweep directory that cannot be reported, as asked: a bad
    worker list, a directory of another sweep, a global batch that does not divide, a missing or
    malformed ``sweep.json`` or point record. The message names the option, point or file."""


def read_json(path: str | os.PathLike, advice: str = "") -> dict:
    """Read a JSON object from ``path``.

    Args:
        path: a JSON file (``sweep.json``, a point record).
        advice: appended to the message of a file that is not valid JSON (``"; remove ..."``).

    Returns:
        The object, as a dict.

    Raises:
        SweepError: the file cannot be read (``FILE: cannot be read (why)``), is not valid JSON
            (``FILE:LINE: not valid JSON (why)`` and ``advice``) or holds something other than an
            object.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SweepError(f"{path}:{err.lineno}: not valid JSON ({err.msg}){advice}") from None
    except OSError as err:
        raise SweepError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def point_path(sweep_dir: str | os.PathLike, workers: int) -> Path:
    """``SWEEP_DIR/points/workers-NNNN.json``, the record of the point with ``workers`` ranks."""
    return Path(sweep_dir) / "points" / f"workers-{workers:04d}.json"


def point_files(sweep_dir: str | os.PathLike) -> list[Path]:
    """The point records of a sweep directory, sorted by name (so by workers); ``[]`` when
    there are none yet."""
    return sorted((Path(sweep_dir) / "points").glob("workers-*.json"))


def new_record() -> dict:
    """A point record with every key of :data:`RECORD_KEYS`, all ``None``."""
    return dict.fromkeys(RECORD_KEYS)


def check_record(record: dict, path: str | os.PathLike) -> dict:
    """Check a point record against the schema; returns it unchanged.

    Raises:
        SweepError: a key of :data:`REQUIRED_KEYS` is missing, the status is not one of
            :data:`STATUSES`, or an ok record lacks a value of :data:`OK_KEYS` or a
            :data:`BREAKDOWN` phase (the message names ``path`` and the keys).
    """
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise SweepError(f"{path}: missing key(s) {', '.join(missing)}")
    if record["status"] not in STATUSES:
        raise SweepError(f"{path}: status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if record["status"] == "ok":
        empty = [k for k in OK_KEYS if record[k] is None]
        empty += [f"breakdown_s.{k}" for k in BREAKDOWN if k not in (record["breakdown_s"] or {})]
        if empty:
            raise SweepError(f"{path}: status ok but no value for {', '.join(empty)}")
    return record


def read_record(path: str | os.PathLike) -> dict:
    """Read and check (:func:`check_record`) one point record.

    Raises:
        SweepError: as :func:`read_json` (a file that is not valid JSON: remove it to measure
            the point again) and :func:`check_record`.
    """
    return check_record(read_json(path, "; remove the file to measure it again"), path)


def read_meta(path: str | os.PathLike) -> dict:
    """Read a sweep's ``sweep.json``.

    Raises:
        SweepError: as :func:`read_json`, or a key of :data:`META_KEYS` is missing.
    """
    meta = read_json(path)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SweepError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta
