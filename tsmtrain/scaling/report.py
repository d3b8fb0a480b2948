"""Reports of a scaling sweep: a table, a CSV file and three plots from ``SWEEP_DIR``.

A sweep directory (written by :mod:`tsmtrain.scaling.sweep`) holds ``sweep.json`` and one record
per point, ``points/workers-NNNN.json`` (:mod:`tsmtrain.scaling.records`). :func:`load_sweep`
reads them, :func:`table_rows` turns them into one row per point (plus model predictions, if
any), :func:`write_report` writes ``SWEEP_DIR/report/`` (``report.md``, ``report.csv``,
``throughput.png``, ``efficiency.png``, ``breakdown.png``) and :func:`print_report` prints the
table on the terminal. With predictions for both data layouts, :func:`filesystem_table` adds a
second table: the file opens/s and GB/s each layout asks of the file system.

Speed-up and efficiency of a measured point are relative to the *baseline*: the ok point with the
fewest workers, N0, with throughput X(N0) in clips/s. For N workers with throughput X(N)::

    speedup(N)    = X(N) / X(N0) * N0           "equivalent workers"; 1 at N0 = 1
    efficiency(N) = X(N) / (X(N0) * N / N0)     = speedup(N) / N, a fraction (1 = linear scaling)

For weak scaling (fixed batch per rank) this is the throughput ratio; for strong scaling (fixed
global batch) the throughput is global batch / step time, so the same ratio is the step-time
ratio. Predicted rows use the same baseline, so that a predicted point reads against the measured
ones (``efficiency`` then includes whatever the baseline had that the model's reference point
lacked, e.g. a rank alone on a shared host); ``model_efficiency`` is the model's own, against its
one-worker rate without communication (:func:`tsmtrain.scaling.model.predict`). Without an ok point
predicted rows give the model's efficiency and speedup = efficiency * N.

Plots use matplotlib's object API (no pyplot), so no display is needed.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..io import write_atomic, write_text
from .model import bus_bandwidth
from .records import BREAKDOWN, SweepError, point_files, read_meta, read_record

__all__ = ["ReportFiles", "COLUMNS", "FILESYSTEM_COLUMNS", "FileSystemTable", "load_sweep", "table_rows",
           "filesystem_table", "comparison_rows", "COMPARISON_HEADERS", "write_report", "print_report"]

PREDICTED_BREAKDOWN = ("compute", "data", "allreduce_exposed")
"""Phases of a predicted step (``breakdown_s`` of a :class:`tsmtrain.scaling.model.Prediction`).
A measured step has the phases of :data:`tsmtrain.scaling.records.BREAKDOWN`."""
LABELS = {"data": "data", "augment": "augment", "forward_backward": "forward+backward",
          "allreduce_wait": "allreduce wait", "optimizer": "optimizer", "other": "other",
          "compute": "compute", "allreduce_exposed": "exposed allreduce"}
COLORS = {"data": "C0", "augment": "C1", "forward_backward": "C2", "compute": "C2", "allreduce_wait": "C3",
          "allreduce_exposed": "C3", "optimizer": "C4", "other": "C7"}

COLUMNS = ("kind", "workers", "nodes", "global_batch", "batch_per_rank", "status", "clips_per_s",
           "clips_per_s_per_rank", "step_time_s", "speedup", "efficiency", "model_efficiency",
           *(f"{k}_s" for k in BREAKDOWN), "compute_s", "allreduce_exposed_s", "allreduce_s",
           "limited_by", "error")
"""Keys of a :func:`table_rows` row, in table order (``*_s``: seconds per optimizer step)."""
TIME_COLUMNS = tuple(c for c in COLUMNS if c.endswith("_s") and "_per_s" not in c)
"""Columns in seconds, shown in milliseconds in the Markdown and terminal tables."""
SHORT = {"workers": "N", "global_batch": "batch", "batch_per_rank": "b/rank", "clips_per_s": "clips/s",
         "clips_per_s_per_rank": "/rank", "step_time_s": "step", "efficiency": "eff.", "model_efficiency": "model eff.", "augment_s": "aug",
         "forward_backward_s": "fwd+bwd", "allreduce_wait_s": "ar wait", "optimizer_s": "optim",
         "allreduce_exposed_s": "ar exp.", "allreduce_s": "ar alone", "limited_by": "limit"}
"""Terminal headers (the table's caption says the times are ms per step)."""

FILESYSTEM_COLUMNS = ("workers", "layout", "clips_per_s", "epoch_s", "opens_per_s", "mean_opens_per_s",
                      "read_gb_per_s", "limited_by")
"""Keys of a :class:`FileSystemTable` row: ranks, ``files`` or ``shards``, predicted clips/s, seconds
per epoch, file opens/s (every epoch for files, the first epoch for shards), opens/s over the
whole run, read GB/s (1e9 bytes/s), what limits the point."""
FILESYSTEM_HEADERS = {"workers": "workers", "layout": "layout", "clips_per_s": "clips/s", "epoch_s": "epoch (s)",
                      "opens_per_s": "opens/s (peak)", "mean_opens_per_s": "opens/s (run mean)",
                      "read_gb_per_s": "read GB/s", "limited_by": "limited by"}


@dataclass
class FileSystemTable:
    """The file-system load of predicted points for both layouts (:func:`filesystem_table`):
    ``caption`` says what data it assumes, ``rows`` have the keys of :data:`FILESYSTEM_COLUMNS`."""

    caption: str
    rows: list[dict]


@dataclass
class ReportFiles:
    """The files :func:`write_report` wrote (all in ``SWEEP_DIR/report/``)."""

    markdown: Path
    csv: Path
    throughput: Path
    efficiency: Path
    breakdown: Path


def load_sweep(sweep_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read a sweep directory: ``sweep.json`` and every ``points/workers-*.json``.

    Returns:
        ``(meta, records)``: the contents of ``sweep.json`` and the point records sorted by
        workers (an empty list while no point has been written).
    Raises:
        SweepError: ``sweep_dir`` or its ``sweep.json`` is missing ("not a sweep directory: ..."),
            a file is not valid JSON (file and line named), ``sweep.json`` or a record lacks a
            key, a record has an unknown status, an ok record lacks a measured value
            (:func:`tsmtrain.scaling.records.check_record`), or two records have the same
            worker count (both files named).
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"not a sweep directory: {sweep_dir} (no such directory)")
    meta_file = sweep_dir / "sweep.json"
    if not meta_file.is_file():
        raise SweepError(f"not a sweep directory: {sweep_dir} (no sweep.json; make one with tsmtrain sweep)")
    meta = read_meta(meta_file)
    records, seen = [], {}
    for path in point_files(sweep_dir):
        record = read_record(path)
        if record["workers"] in seen:
            raise SweepError(f"{path}: workers = {record['workers']} again (also in {seen[record['workers']]})")
        seen[record["workers"]] = path
        records.append(record)
    return meta, sorted(records, key=lambda r: r["workers"])


def _as_dict(prediction) -> dict:
    return dataclasses.asdict(prediction) if dataclasses.is_dataclass(prediction) else dict(prediction)


def table_rows(meta: dict, records: list[dict], predictions: list | None = None) -> list[dict]:
    """One row per point: the measured records in workers order, then the predictions.

    Each row has the keys of :data:`COLUMNS`: ``kind`` ("measured" or "predicted"), workers,
    nodes, global batch and batch per rank (clips), ``status`` (ok, failed, submitted; "predicted"
    for predictions), ``clips_per_s`` and ``clips_per_s_per_rank`` (clips/s), ``step_time_s``
    (seconds per optimizer step), ``speedup`` (equivalent workers) and ``efficiency`` (a fraction,
    1 = linear) as defined in the module docstring, the breakdown in seconds per step
    (``data_s`` ... ``other_s`` for measured points; ``compute_s``, ``data_s``,
    ``allreduce_exposed_s`` for predictions), ``allreduce_s`` (one standalone gradient
    allreduce, seconds), ``limited_by`` (predictions) and ``error``. Values a point does not
    have are ``None``; failed and submitted points keep their row, with no numbers.

    Args:
        meta: the contents of ``sweep.json`` (unused today; kept for symmetry with the report).
        records: point records as :func:`load_sweep` returns them.
        predictions: :class:`tsmtrain.scaling.model.Prediction` objects or their ``dataclasses.asdict``.
    """
    ok = [r for r in records if r["status"] == "ok"]
    base = min(ok, key=lambda r: r["workers"]) if ok else None
    rows = []
    for r in records:
        row = dict.fromkeys(COLUMNS)
        row.update(kind="measured", **{k: r.get(k) for k in ("workers", "nodes", "global_batch", "batch_per_rank",
                                                             "status", "error", "allreduce_s")})
        if r["status"] == "ok":
            row.update({k: r[k] for k in ("clips_per_s", "clips_per_s_per_rank", "step_time_s")})
            row.update({f"{k}_s": r["breakdown_s"][k] for k in BREAKDOWN})
            if base is not None and base["clips_per_s"] > 0:
                ratio = r["clips_per_s"] / base["clips_per_s"]
                row["speedup"] = ratio * base["workers"]
                row["efficiency"] = ratio * base["workers"] / r["workers"]
        rows.append(row)
    for p in sorted((_as_dict(p) for p in predictions or []), key=lambda p: p["workers"]):
        row = dict.fromkeys(COLUMNS)
        row.update({k: p.get(k) for k in COLUMNS if k in p}, kind="predicted", status="predicted", error=None)
        row.update({f"{k}_s": p["breakdown_s"].get(k) for k in PREDICTED_BREAKDOWN})
        row["model_efficiency"] = p["efficiency"]
        if base is not None and base["clips_per_s"] > 0:  # the same yardstick as the measured rows
            ratio = p["clips_per_s"] / base["clips_per_s"]
            row["speedup"], row["efficiency"] = ratio * base["workers"], ratio * base["workers"] / p["workers"]
        else:
            row["speedup"], row["efficiency"] = p["efficiency"] * p["workers"], p["efficiency"]
        rows.append(row)
    return rows


COMPARISON_HEADERS = {
    "workers": "workers", "nodes": "nodes",
    "allreduce_measured_s": "allreduce measured (ms)", "allreduce_predicted_s": "allreduce predicted (ms)",
    "allreduce_diff": "diff", "busbw_measured_gb_per_s": "busbw measured (GB/s)",
    "step_measured_s": "step measured (ms)", "step_predicted_s": "step predicted (ms)", "step_diff": "diff",
}
"""Columns of the model-vs-measured table (:func:`comparison_rows`) and their headers."""


def comparison_rows(records: list[dict], predictions: list | None) -> list[dict]:
    """The model against the sweep at every worker count both have (an ok measured point and a
    prediction): one row each with the keys of :data:`COMPARISON_HEADERS`.

    ``allreduce_measured_s`` is the point's standalone gradient allreduce (seconds, the
    ``train.allreduce_benchmark`` median), ``allreduce_predicted_s`` the model's
    (:func:`tsmtrain.scaling.model.allreduce_seconds`); ``busbw_measured_gb_per_s`` its bus
    bandwidth as nccl-tests defines it (:func:`tsmtrain.scaling.model.bus_bandwidth`, GB =
    1e9 bytes; ``None`` for one worker); ``step_*`` the seconds per optimizer step; each ``*_diff``
    is (predicted - measured) / measured, a fraction (``None`` where the measured value is 0, and
    for the allreduce of one worker, which sends nothing).
    """
    predicted = {p["workers"]: p for p in map(_as_dict, predictions or [])}
    rows = []
    for r in records:
        p = predicted.get(r["workers"])
        if r["status"] != "ok" or p is None:
            continue
        n, measured_ar = r["workers"], r.get("allreduce_s") or 0.0
        busbw = (bus_bandwidth(r["gradient_bytes"] / measured_ar, n) / 1e9
                 if n > 1 and measured_ar > 0 and r.get("gradient_bytes") else None)
        rows.append({"workers": n, "nodes": r.get("nodes"),
                     "allreduce_measured_s": measured_ar, "allreduce_predicted_s": p["allreduce_s"],
                     "allreduce_diff": _diff(p["allreduce_s"], measured_ar) if n > 1 else None,
                     "busbw_measured_gb_per_s": busbw,
                     "step_measured_s": r["step_time_s"], "step_predicted_s": p["step_time_s"],
                     "step_diff": _diff(p["step_time_s"], r["step_time_s"])})
    return rows


def _diff(predicted: float, measured: float) -> float | None:
    return (predicted - measured) / measured if measured else None


def _cmp_fmt(column: str, value) -> str:
    if value is None:
        return "-"
    if column.endswith("_diff"):
        return f"{value:+.0%}"
    if isinstance(value, int):
        return str(value)
    seconds = column.endswith("_s") and not column.endswith("_per_s")
    return _number(value * 1e3 if seconds else value)


def filesystem_table(data, by_layout: dict[str, list]) -> FileSystemTable:
    """The file-system table of predictions made for each layout of ``data``.

    Args:
        data: the :class:`tsmtrain.scaling.model.DataSpec` the predictions were made with (its
            ``layout`` aside), for the caption.
        by_layout: ``{"files": predictions, "shards": predictions}``, each a list of
            :class:`tsmtrain.scaling.model.Prediction` (or its ``asdict``) with its ``filesystem``
            load. Rows come by workers, then layout, each with the clips/s and ``limited_by`` of
            its own layout's prediction (a file-system limit may bind for one layout only).
    """
    rows = []
    for layout, predictions in by_layout.items():
        for p in map(_as_dict, predictions):
            load = p["filesystem"]
            rows.append({"workers": p["workers"], "layout": layout, "clips_per_s": p["clips_per_s"],
                         "limited_by": p["limited_by"], **{k: load[k] for k in FILESYSTEM_COLUMNS if k in load}})
    rows.sort(key=lambda r: (r["workers"], list(by_layout).index(r["layout"])))
    opens = "1 open" if data.sidecar_reads == 0 else f"{1 + data.sidecar_reads} opens (video and frame table)"
    caption = (f"{data.videos:,} videos x {data.epochs} epochs, {data.video_bytes:,.0f} bytes per video, "
               f"{data.workers_per_rank} loader workers per rank. files: {opens} per clip, every epoch. "
               f"shards: {data.shards:,} of {data.shard_bytes / 2 ** 30:.3g} GiB, each opened once by every worker that "
               f"reads from it and kept open; peak = the first epoch (what file-system limits are checked "
               f"against). GB/s = clips/s x bytes per video (for files an upper bound: a seeking decoder may "
               f"read less).")
    return FileSystemTable(caption=caption, rows=rows)


# --------------------------------------------------------------------------- text output

def _columns(rows: list[dict]) -> list[str]:
    """COLUMNS without those no row has a value for (but always the identifying ones)."""
    keep = ("kind", "workers", "status", "clips_per_s", "speedup", "efficiency", "error")
    return [c for c in COLUMNS if c in keep or any(r[c] is not None for r in rows)]


def _fmt(column: str, value) -> str:
    """Compact text: efficiency in %, breakdown and step time in ms, others 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if column in ("efficiency", "model_efficiency"):
        return f"{100 * value:.1f}%"
    if column in TIME_COLUMNS:
        value = value * 1000
    if isinstance(value, int):
        return str(value)
    return _number(value)


def _number(value: float) -> str:
    """4 significant digits, whole from 1,000 up."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _fs_fmt(value) -> str:
    """A file-system table cell: 3 significant digits, whole numbers with thousands separators
    from 1,000 up."""
    if value is None or isinstance(value, str):
        return value or ""
    return f"{value:,.0f}" if isinstance(value, int) or abs(value) >= 1000 else f"{value:.3g}"


def _header(column: str) -> str:
    if column == "allreduce_s":
        return "standalone allreduce (ms)"
    if column in TIME_COLUMNS:
        return f"{LABELS.get(column[:-2], column[:-2].replace('_', ' '))} (ms/step)"
    return {"clips_per_s": "clips/s", "clips_per_s_per_rank": "clips/s/rank", "global_batch": "global batch",
            "batch_per_rank": "batch/rank", "limited_by": "limited by", "model_efficiency": "model eff."}.get(column, column)


def _title(meta: dict) -> str:
    recipe = Path(str(meta["recipe"])).name
    return f"{meta.get('model') or 'model'} ({recipe}), {meta['mode']} scaling"


def _markdown(meta: dict, rows: list[dict], filesystem: FileSystemTable | None = None,
              comparison: list[dict] | None = None) -> str:
    base = next((r for r in rows if r["kind"] == "measured" and r["status"] == "ok"), None)
    batch = (f"{meta.get('batch_per_rank')} clips per rank" if meta["mode"] == "weak"
             else f"global batch {meta.get('global_batch')} clips")
    lines = [f"# Scaling sweep: {_title(meta)}", "",
             f"- recipe: `{meta['recipe']}`", f"- mode: {meta['mode']} scaling ({batch})",
             f"- steps: {meta['steps']} measured after {meta['warmup_steps']} warm-up steps",
             f"- baseline N0: {str(base['workers']) + ' worker(s)' if base else 'none (no ok point)'}", "",
             "Speed-up = X(N) / X(N0) * N0 and efficiency = X(N) / (X(N0) * N / N0), X in clips/s; "
             "predicted rows are measured against the same N0; `model eff.` is the model's own efficiency "
             "(against its one-worker rate without communication). "
             "Breakdown columns are milliseconds per optimizer step.", ""]
    columns = _columns(rows)
    lines.append("| " + " | ".join(_header(c) for c in columns) + " |")
    lines.append("|" + "|".join("---" if c in ("kind", "status", "error", "limited_by") else "---:"
                                for c in columns) + "|")
    for r in rows:
        cells = [_fmt(c, r[c]).replace("|", "\\|").replace("\n", " ") for c in columns]
        if r["kind"] == "predicted":
            cells[0] = "*predicted*"
        lines.append("| " + " | ".join(cells) + " |")
    if comparison:
        lines += ["", "## Model vs measured", "", "At the worker counts both have; diff = (predicted - measured) / "
                  "measured.", "", "| " + " | ".join(COMPARISON_HEADERS.values()) + " |",
                  "|" + "|".join("---:" for _ in COMPARISON_HEADERS) + "|"]
        lines += ["| " + " | ".join(_cmp_fmt(c, r[c]) for c in COMPARISON_HEADERS) + " |" for r in comparison]
    if filesystem is not None:
        lines += ["", "## File system", "", filesystem.caption, "",
                  "| " + " | ".join(FILESYSTEM_HEADERS[c] for c in FILESYSTEM_COLUMNS) + " |",
                  "|" + "|".join("---" if c in ("layout", "limited_by") else "---:" for c in FILESYSTEM_COLUMNS) + "|"]
        lines += ["| " + " | ".join(_fs_fmt(r[c]) for c in FILESYSTEM_COLUMNS) + " |" for r in filesystem.rows]
    lines += ["", "![throughput](throughput.png)", "![efficiency](efficiency.png)", "![breakdown](breakdown.png)", ""]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Full precision (``repr`` of floats), seconds per step, efficiency as a fraction."""
    with write_atomic(path) as part, open(part, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                             for c in COLUMNS])


def print_report(meta: dict, rows: list[dict], console=None, filesystem: FileSystemTable | None = None,
                 comparison: list[dict] | None = None) -> None:
    """Print ``rows`` (from :func:`table_rows`) as a rich table: clips/s, efficiency in %,
    step time and breakdown in ms per step; failed rows in red with their error, predicted rows
    dimmed; then ``comparison`` (from :func:`comparison_rows`), if not empty, as the model against
    the measured points; then ``filesystem`` (from :func:`filesystem_table`), if given.
    ``console`` defaults to a new :class:`rich.console.Console` (stdout)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=escape(f"Scaling sweep: {_title(meta)}"),
                  caption="times in ms per optimizer step; speed-up and efficiency relative to the smallest ok point")
    columns = [c for c in _columns(rows) if c != "kind"]  # the status says "predicted"
    for c in columns:
        text = c in ("status", "error", "limited_by")
        table.add_column(SHORT.get(c, c.removesuffix("_s")), justify="left" if text else "right",
                         no_wrap=c != "error", overflow="fold")
    for r in rows:
        style = "red" if r["status"] == "failed" else "dim" if r["kind"] == "predicted" else None
        table.add_row(*(escape(_fmt(c, r[c])) for c in columns), style=style)  # errors may hold [...]
    console.print(table)
    if comparison:
        cmp = Table(title="Model vs measured", caption="diff = (predicted - measured) / measured")
        for header in COMPARISON_HEADERS.values():
            cmp.add_column(header, justify="right")
        for r in comparison:
            cmp.add_row(*(_cmp_fmt(c, r[c]) for c in COMPARISON_HEADERS))
        console.print(cmp)
    if filesystem is not None:
        fs = Table(title="File system: what the predicted points ask of it", caption=escape(filesystem.caption))
        for c in FILESYSTEM_COLUMNS:
            fs.add_column(FILESYSTEM_HEADERS[c], justify="left" if c in ("layout", "limited_by") else "right")
        for r in filesystem.rows:
            fs.add_row(*(_fs_fmt(r[c]) for c in FILESYSTEM_COLUMNS))
        console.print(fs)


# --------------------------------------------------------------------------- plots

def _log2_axis(ax, workers: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    if workers and min(workers) > 0 and max(workers) >= 4 * min(workers):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    if workers:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(workers))))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("workers (ranks)")


def _line_plots(meta: dict, rows: list[dict], throughput: Path, efficiency: Path) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["kind"] == "measured" and r["status"] == "ok"]
    pred = [r for r in rows if r["kind"] == "predicted"]
    bad = [r for r in rows if r["kind"] == "measured" and r["status"] != "ok"]
    workers = [r["workers"] for r in rows]
    for path, key, scale, ylabel, what in ((throughput, "clips_per_s", 1, "throughput (clips/s, all ranks)",
                                            "throughput"),
                                           (efficiency, "efficiency", 100, "scaling efficiency (%)", "efficiency")):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        if ok:
            ax.plot([r["workers"] for r in ok], [r[key] * scale for r in ok], "o-", color="C0", label="measured")
        if pred:
            ax.plot([r["workers"] for r in pred], [r[key] * scale for r in pred], "s--", color="C1",
                    markerfacecolor="none", label="predicted")
        if key == "clips_per_s" and ok:
            n0, x0 = ok[0]["workers"], ok[0]["clips_per_s"]
            xs = sorted(set(workers))
            ax.plot(xs, [x0 * n / n0 for n in xs], ":", color="0.5", label=f"ideal (linear from N0={n0})")
        if key == "efficiency":
            ax.axhline(100, linestyle=":", color="0.5", label="100% (linear)")
        for i, r in enumerate(bad):
            ax.plot(r["workers"], 0, "x", color="red", markersize=10, mew=2, label=None if i else "failed / not run")
            ax.annotate(r["status"], (r["workers"], 0), textcoords="offset points", xytext=(0, 8), ha="center",
                        color="red", fontsize=8)
        if not ok and not pred:
            ax.text(0.5, 0.5, "no completed point", transform=ax.transAxes, ha="center", color="0.4")
        _log2_axis(ax, workers)
        ax.set_ylim(bottom=0, top=None if ok or pred else 1)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{what}: {_title(meta)}")
        ax.grid(True, alpha=0.3)
        if ok or pred or bad:
            ax.legend(fontsize=8)
        with write_atomic(path) as part, open(part, "wb") as f:
            fig.savefig(f, dpi=120, format="png")


def _breakdown_plot(meta: dict, rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8, 0.7 * len(rows) + 4), 4.5), layout="constrained")
    ax = fig.add_subplot()
    totals = [sum(r[f"{k}_s"] or 0 for k in (*BREAKDOWN, *PREDICTED_BREAKDOWN)) * 1000 for r in rows]
    top = max(totals, default=0) or 1.0
    labelled = set()
    for x, r in enumerate(rows):
        predicted = r["kind"] == "predicted"
        if not predicted and r["status"] != "ok":
            ax.bar(x, top, fill=False, edgecolor="red", linestyle="--")
            ax.text(x, top / 2, r["status"], rotation=90, ha="center", va="center", color="red")
            continue
        bottom = 0.0
        for k in PREDICTED_BREAKDOWN if predicted else BREAKDOWN:
            height = (r[f"{k}_s"] or 0) * 1000
            label = f"{LABELS[k]} (predicted)" if predicted else LABELS[k]
            ax.bar(x, height, bottom=bottom, color=COLORS[k], hatch="//" if predicted else None,
                   alpha=0.6 if predicted else 1.0, edgecolor="black" if predicted else None,
                   label=None if label in labelled else label)
            labelled.add(label)
            bottom += height
    ax.set_xticks(range(len(rows)),
                  [f"{r['workers']}\n(pred.)" if r["kind"] == "predicted" else str(r["workers"]) for r in rows])
    first_predicted = next((x for x, r in enumerate(rows) if r["kind"] == "predicted"), 0)
    if first_predicted:
        ax.axvline(first_predicted - 0.5, color="0.3", linewidth=1)
        ax.text(first_predicted - 0.45, top * 1.1, "predicted →", fontsize=8, va="top", color="0.3")
    ax.set_ylim(0, top * 1.12)
    if not rows:
        ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_xlabel("workers (ranks)")
    ax.set_ylabel("time per optimizer step (ms)")
    ax.set_title(f"step-time breakdown: {_title(meta)}")
    if labelled:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    with write_atomic(path) as part, open(part, "wb") as f:
        fig.savefig(f, dpi=120, format="png")


def write_report(sweep_dir: str | os.PathLike, predictions: list | None = None,
                 filesystem: FileSystemTable | None = None) -> ReportFiles:
    """Write ``SWEEP_DIR/report/``: ``report.md`` (sweep settings, the table and, given
    ``filesystem``, the file-system table under "File system"), ``report.csv``
    (the :data:`COLUMNS` at full precision: clips/s, seconds per step, efficiency as a fraction),
    ``throughput.png`` (clips/s against workers, with the linear ideal), ``efficiency.png``
    (% against workers) and ``breakdown.png`` (stacked ms per step).

    Args:
        sweep_dir: a directory made by ``tsmtrain sweep``.
        predictions: :class:`tsmtrain.scaling.model.Prediction` objects (or their ``asdict``) to add
            as predicted rows, points and hatched bars.
        filesystem: a :func:`filesystem_table` of the predictions.
    Raises:
        SweepError: as :func:`load_sweep`.
    """
    meta, records = load_sweep(sweep_dir)
    rows = table_rows(meta, records, predictions)
    out = Path(sweep_dir) / "report"
    out.mkdir(exist_ok=True)
    files = ReportFiles(*(out / name for name in ("report.md", "report.csv", "throughput.png", "efficiency.png",
                                                  "breakdown.png")))
    write_text(files.markdown, _markdown(meta, rows, filesystem, comparison_rows(records, predictions)))
    _write_csv(files.csv, rows)
    _line_plots(meta, rows, files.throughput, files.efficiency)
    _breakdown_plot(meta, rows, files.breakdown)
    return files
