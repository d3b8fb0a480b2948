"""``tsmtrain bench data``, ``bench step`` and ``bench allreduce``: the data path, the training step
and the network.

* ``bench data RECIPE [--workers 1,2,4] [--json F]`` -> :func:`tsmtrain.bench.data.bench_data`,
  printed by :func:`~tsmtrain.bench.data.progress_line` and :func:`~tsmtrain.bench.data.summary_lines`
* ``bench step RECIPE [--json FILE]`` -> :func:`tsmtrain.bench.step.bench_step`, printed by
  :func:`tsmtrain.bench.step.format_step_report`
* ``bench allreduce [RECIPE] [--engine E] [--sizes 1MB,64MB] [--json F]`` (on every rank of a job) ->
  :func:`tsmtrain.bench.allreduce.allreduce_sizes`, printed by
  :func:`~tsmtrain.bench.allreduce.format_allreduce_row`
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .common import SET_HELP, fail, load
from ..errors import UserError

__all__ = ["bench_app", "bench_data", "bench_step", "bench_allreduce"]

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks of the data path, the training step and the allreduce.")


@bench_app.command("data")
def bench_data(
    recipe: str = typer.Argument(..., help="YAML recipe whose videos to read"),
    workers: str = typer.Option("1,2", "--workers", help="loader worker counts to measure, e.g. 1,2,4"),
    clips: int = typer.Option(64, "--clips", help="clips per measurement (cycles through a shorter list)"),
    rounds: int = typer.Option(3, "--rounds", help="alternating rounds of every measurement; figures are medians"),
    target: Optional[float] = typer.Option(None, "--target", help="clips/s one GPU trains at: print the cores "
                                                                  "per GPU it needs"),
    against: Optional[str] = typer.Option(None, "--against", help="an earlier --json record (e.g. of the source "
                                                                  "videos before tsmtrain prepare): print the ratio"),
    split: str = typer.Option("train", "--split", help="train (random offsets) or val (segment centres)"),
    json_file: Optional[str] = typer.Option(None, "--json", help="write the figures to this JSON file"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Measure clips/s of the recipe's loader per worker next to the raw decoder on the same
    frames, and the batched augmentation on the device."""
    from rich.console import Console

    from ..bench.data import check_split, header_line, load_data_bench, progress_line, summary_lines
    from ..bench.data import bench_data as run_bench
    from ..scaling.sweep import parse_workers

    try:
        check_split(split)
        counts = parse_workers(workers, "--workers")
        baseline = load_data_bench(against) if against else None
    except UserError as err:
        fail(str(err))
    cfg = load(recipe, sets)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(header_line(recipe, cfg.data, clips, rounds))
    try:
        result = run_bench(cfg, recipe, counts, clips=clips, target=target, split=split, rounds=rounds,
                           on_result=lambda stage, row: console.print(progress_line(stage, row)))
    except UserError as err:
        fail(str(err).splitlines())
    if baseline is not None:
        result.compare(baseline, against)
    for line in summary_lines(result):
        console.print(line)
    if json_file:
        result.write(json_file)
        console.print(f"wrote {json_file}")


@bench_app.command("step")
def bench_step(
    recipe: str = typer.Argument(..., help="YAML recipe (its data files need not exist)"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_file: Optional[str] = typer.Option(None, "--json", help="also write every measurement to this JSON file"),
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated, e.g. fp32,bf16,"
                                           "fp32+channels_last,fp32+compile (default: all that run on this device)"),
    steps: int = typer.Option(20, "--steps", min=1, help="measured rounds per variant"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed steps per network and variant first"),
    budget: float = typer.Option(300.0, "--budget", min=0, help="seconds per variant after which it stops early "
                                                                "(with at least 3 rounds)"),
) -> None:
    """Time forward+backward+optimizer of the recipe's network as TSM and TSN, in every precision,
    memory format and compile variant that runs here, on a synthetic batch; and the temporal
    shift against a copy of its input."""
    from ..bench.step import bench_step as run_bench
    from ..bench.step import format_step_report, parse_variants
    from ..io import write_json
    from ..train.setup import choose_device

    cfg = load(recipe, sets, check_files=False)
    try:
        device = choose_device(cfg.train.device, 0)
        chosen = parse_variants(variants, device) if variants is not None else None
    except UserError as err:
        fail(str(err))
    except ValueError as err:
        fail(f"--variants: {err}")
    try:
        result = run_bench(cfg, chosen, steps=steps, warmup=warmup, budget_s=budget,
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as err:
        fail(str(err).splitlines())
    print(format_step_report(result))
    if json_file:
        try:
            write_json(json_file, result)
        except UserError as err:
            fail(f"--json: {err}")
        print(f"wrote {json_file}")


@bench_app.command("allreduce")
def bench_allreduce(
    recipe: Optional[str] = typer.Argument(None, help="YAML recipe: its dist.engine and dist section (default: "
                                                      "--engine with default settings)"),
    engine_name: Optional[str] = typer.Option(None, "--engine", help="horovod or ddp (default: the recipe's, "
                                                                     "else horovod)"),
    sizes: str = typer.Option("1MB,4MB,16MB,64MB", "--sizes", help="allreduce sizes in bytes, e.g. 1MB,45MB,256MiB"),
    repeats: int = typer.Option(5, "--repeats", min=1, help="timed allreduces per size"),
    warmup: int = typer.Option(1, "--warmup", min=0, help="untimed allreduces per size first"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_file: Optional[str] = typer.Option(None, "--json", help="rank 0 also writes the table to this JSON file"),
) -> None:
    """Allreduce bandwidth across the ranks of a job, as nccl-tests reports it (time, algbw,
    busbw): run it on every rank, e.g. `srun --mpi=pmix tsmtrain bench allreduce` or
    `srun tsmtrain bench allreduce --engine ddp`."""
    from ..bench.allreduce import bench_allreduce as run_bench
    from ..bench.allreduce import parse_sizes
    from ..dist import create_engine
    from ..io import write_json

    cfg = load(recipe, sets, check_files=False) if recipe else None
    name = engine_name or (cfg.dist.engine if cfg else "horovod")
    if name not in ("horovod", "ddp"):
        fail(f"--engine: {name!r}: choose horovod or ddp (an allreduce needs ranks)")
    try:
        byte_sizes = parse_sizes(sizes)
        engine = create_engine(name, cfg.dist if cfg else None)
    except ImportError as err:
        fail(f"--engine {name}: {err}")
    except UserError as err:
        fail(str(err))
    record = run_bench(engine, byte_sizes, repeats=repeats, warmup=warmup, say=lambda line: print(line, flush=True))
    if engine.rank == 0 and json_file:
        try:
            write_json(json_file, record)
        except UserError as err:
            fail(f"--json: {err}")
        print(f"wrote {json_file}")
    engine.shutdown()
