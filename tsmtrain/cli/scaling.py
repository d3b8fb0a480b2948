"""``tsmtrain sweep`` and ``tsmtrain report``: the scaling study.

* ``sweep RECIPE --workers 1,2,4 [--strong] [--local/--submit]`` ->
  :func:`tsmtrain.scaling.sweep.plan_sweep`, :func:`~tsmtrain.scaling.sweep.run_sweep`; exits 1
  when a point failed
* ``report SWEEP_DIR [--predict 256,1536 --network NET.yaml [--basis N] [--data-bench F] [--videos N --epochs E
  --video-bytes B --layout files|shards --shard-size 1GiB --sidecar-reads 0|1 --workers-per-rank W]]`` ->
  :func:`tsmtrain.scaling.report.write_report`, with the points of :func:`tsmtrain.scaling.model.predict`
  for both data layouts (:class:`tsmtrain.scaling.model.DataSpec`), their file-system table, and the
  model against the measured points (:func:`tsmtrain.scaling.report.comparison_rows`)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import SET_HELP, fail, load
from .cluster import TEMPLATE_HELP, with_cluster_flags
from ..errors import UserError

__all__ = ["sweep", "report", "point_line"]


@with_cluster_flags
def sweep(
    recipe: str = typer.Argument(..., help="YAML recipe"),
    workers: str = typer.Option(..., "--workers", help="worker counts (ranks), e.g. 1,2,4,8"),
    strong: bool = typer.Option(False, "--strong", help="strong scaling: keep the global batch (default: weak "
                                                        "scaling, keep the clips per rank)"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", min=1,
                                               help="with --strong: the global batch (default: the recipe's)"),
    local: bool = typer.Option(True, "--local/--submit", help="run each point here (tsmtrain run --np N), or "
                                                               "submit one Slurm job per point"),
    array: bool = typer.Option(False, "--array", help="with --submit: one job array per node count"),
    steps: int = typer.Option(20, "--steps", help="measured optimizer steps per point"),
    warmup: int = typer.Option(5, "--warmup", help="optimizer steps before measuring"),
    out: Optional[str] = typer.Option(None, "--out", help="sweep directory (default RUN_DIR/sweeps/NAME-weak|strong)"),
    rerun: bool = typer.Option(False, "--rerun", help="measure points again that the sweep directory already has"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds after which a local point is killed"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    template: Optional[str] = typer.Option(None, "--template", help=TEMPLATE_HELP),
    cluster: dict = None,
) -> None:
    """Benchmark a recipe at several worker counts (short runs, no evaluation) into a sweep
    directory; run it again to resume or extend it. Then: tsmtrain report SWEEP_DIR."""
    from rich.console import Console

    from ..scaling.sweep import parse_workers, plan_sweep, run_sweep
    from ..prep.datasets import prepare_sweep_data

    if array and local:
        fail("--array: job arrays are for --submit")
    cfg = load(recipe, sets, flags=cluster)
    console = Console(stderr=True, soft_wrap=True)
    launch = "local" if local else "submit"
    try:
        plan = plan_sweep(cfg, recipe, parse_workers(workers), out, strong=strong, global_batch=global_batch,
                          launch=launch, steps=steps, warmup=warmup, rerun=rerun, videos=prepare_sweep_data(cfg))
    except UserError as err:
        fail(str(err))
    console.print(f"sweep {plan.sweep_dir}: {plan.meta['mode']} scaling of {plan.meta['model']}, "
                  f"{warmup} warm-up + {steps} measured steps per point")
    if plan.skipped:
        console.print(f"kept from earlier: workers {', '.join(map(str, plan.skipped))} (--rerun measures them again)")
    try:
        records = run_sweep(plan, launch=launch, array=array, timeout=timeout, template=template,
                            on_point=lambda r: console.print(point_line(r), highlight=False if r["status"] == "failed"
                                                             else None))
    except UserError as err:
        fail(str(err))
    console.print(f"records in {plan.sweep_dir / 'points'}; table and plots: tsmtrain report {plan.sweep_dir}")
    if any(r["status"] == "failed" for r in records):
        raise typer.Exit(1)


def point_line(r: dict) -> str:
    """The line ``sweep`` prints when a point is measured, submitted or failed (rich markup: a
    failure in red, printed without highlighting)."""
    if r["status"] == "ok":
        return (f"workers {r['workers']:>5}: {r['clips_per_s']:.1f} clips/s, {r['step_time_s']:.3f} s/step "
                f"(global batch {r['global_batch']}) in {r['seconds']:.0f} s")
    if r["status"] == "submitted":
        return f"workers {r['workers']:>5}: submitted job {r['job_id']}"
    return f"workers {r['workers']:>5}: [red]failed[/red]: {r['error']}"


def report(
    sweep_dir: str = typer.Argument(..., help="a directory written by tsmtrain sweep"),
    predict: Optional[str] = typer.Option(None, "--predict", help="worker counts to predict, e.g. 256,1536"),
    network: Optional[str] = typer.Option(None, "--network", help="network description (YAML) for --predict, "
                                                                 "e.g. configs/networks/summit.yaml"),
    data_bench: Optional[str] = typer.Option(None, "--data-bench", help="a tsmtrain bench data --json record: its "
                                             "clips/s per core x the network's cores per node is the data ceiling"),
    videos: Optional[int] = typer.Option(None, "--videos", min=1, help="with --predict: training videos per epoch "
                                         "(default 246,245: Kinetics-400's training split)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="with --predict: epochs of the run (default 50)"),
    video_bytes: Optional[float] = typer.Option(None, "--video-bytes", min=1, help="with --predict: mean bytes per "
                                                "video (default 640000: a 10 s clip prepared at short side 256)"),
    layout: Optional[str] = typer.Option(None, "--layout", help="with --predict: files (one per video, the default) "
                                         "or shards (prepare --shards): the layout the network file's filesystem "
                                         "limits cap; both are printed"),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="with --predict: bytes per shard, e.g. 1GiB "
                                             "(the default), 512MiB"),
    sidecar_reads: Optional[int] = typer.Option(None, "--sidecar-reads", min=0, max=1, help="with --predict: files "
                                                "opened beside each video per clip: 1 with data.seek_mode exact (its "
                                                ".frames.json), 0 otherwise (the default)"),
    basis: Optional[int] = typer.Option(None, "--basis", min=1, help="with --predict: the measured point (workers) "
                                        "whose compute per clip the model uses (default: the one with the most)"),
    workers_per_rank: Optional[int] = typer.Option(None, "--workers-per-rank", min=1, help="with --predict: loader "
                                                   "workers per rank, data.workers (default 6)"),
) -> None:
    """Write the sweep's table (Markdown, CSV) and plots into SWEEP_DIR/report and print the table;
    with --predict, add the scaling model's points and the file opens/s and GB/s they ask of the
    file system, for data in files and in shards."""
    from rich.console import Console

    from ..scaling.report import comparison_rows, load_sweep, print_report, table_rows, write_report
    from ..scaling.sweep import collect

    data_options = {"videos": videos, "epochs": epochs, "video_bytes": video_bytes, "layout": layout,
                    "shard_bytes": shard_size, "sidecar_reads": sidecar_reads, "workers_per_rank": workers_per_rank}
    if (predict is None) != (network is None):
        fail("--predict and --network go together: the model needs worker counts and a network")
    if basis is not None and predict is None:
        fail("--basis goes with --predict and --network: it picks the point the model's compute comes from")
    if data_bench is not None and predict is None:
        fail("--data-bench goes with --predict and --network: it sets the model's data ceiling")
    if predict is None and any(v is not None for v in data_options.values()):
        fail("--videos, --epochs, --video-bytes, --layout, --shard-size, --sidecar-reads and --workers-per-rank go "
             "with --predict and --network: they describe the data the predicted run reads")
    try:
        collect(sweep_dir) if (Path(sweep_dir) / "sweep.json").exists() else None
        meta, records = load_sweep(sweep_dir)
        predictions, filesystem = (None, None) if predict is None else _predictions(
            meta, records, predict, network, data_bench, data_options, basis)
        files = write_report(sweep_dir, predictions, filesystem)
        # a pipe or log file gets the whole table rather than 80 squeezed columns
        print_report(meta, table_rows(meta, records, predictions), Console(width=None if sys.stdout.isatty() else 220),
                     filesystem=filesystem, comparison=comparison_rows(records, predictions))
    except UserError as err:
        fail(str(err))
    for path in (getattr(files, name) for name in vars(files)):
        print(f"wrote {path}")


def _data_spec(options: dict):
    """The :class:`tsmtrain.scaling.model.DataSpec` of the ``--videos`` ... ``--workers-per-rank``
    options given (the others at its defaults); a bad one exits 2."""
    from ..scaling.model import LAYOUTS, DataSpec

    given = {k: v for k, v in options.items() if v is not None}
    if given.get("layout", "files") not in LAYOUTS:
        fail(f"--layout {given['layout']!r}: one of {', '.join(LAYOUTS)}")
    if "shard_bytes" in given:
        from ..prep.tar_writer import parse_size

        try:
            given["shard_bytes"] = parse_size(given["shard_bytes"])
        except UserError as err:
            fail(str(err))
    try:
        return DataSpec(**given)
    except ValueError as err:
        fail(f"data: {err}")


def _predictions(meta: dict, records: list[dict], predict: str, network: str, data_bench: str | None,
                 data_options: dict, basis_workers: int | None = None):
    """``(points, table)``: the scaling model's points (dicts) for ``--predict`` on ``--network``
    (with ``--data-bench``'s ceiling; compute from the ``--basis`` point) for the data ``data_options`` describe (:func:`_data_spec`),
    and the :class:`tsmtrain.scaling.report.FileSystemTable` of both layouts; notes on stderr. A
    bad network, benchmark record, data option or basis exits 2; a bad ``--predict`` raises
    SweepError."""
    from dataclasses import asdict, replace

    from ..scaling.model import LAYOUTS, basis_from_sweep, load_network
    from ..scaling.model import predict as model_predict
    from ..scaling.report import filesystem_table
    from ..scaling.sweep import parse_workers

    counts = parse_workers(predict, "--predict")
    data = _data_spec(data_options)
    try:
        net = load_network(network)
        if data_bench is not None:
            from ..bench.data import load_data_bench

            try:
                rate = load_data_bench(data_bench)["clips_per_s_per_core"]
            except UserError as err:
                fail(str(err))
            net = net.with_data_ceiling(rate)
            print(f"model: data ceiling {net.data_clips_per_s_per_node:.0f} clips/s per node = {rate:.2f} "
                  f"clips/s per core ({data_bench}) x {net.cores_per_node - net.ranks_per_node} loader cores",
                  file=sys.stderr)
        basis = basis_from_sweep(meta, records, basis_workers)
    except UserError as err:
        fail(str(err))
    except ValueError as err:
        fail(f"--predict: {err}")
    by_layout = {name: [asdict(p) for p in model_predict(basis, net, counts, replace(data, layout=name))]
                 for name in LAYOUTS}
    for note in basis.notes:
        print(f"model: {note}", file=sys.stderr)
    return by_layout[data.layout], filesystem_table(data, by_layout)
