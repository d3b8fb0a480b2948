"""``tsmtrain prepare --plan``: the encoding that feeds a GPU with a cluster's cores.

``prepare RECIPE|--list FILE --root ROOT --out DIR --plan --target T --cores-per-gpu C`` ->
:func:`tsmtrain.prep.plan.check_plan_options` and :func:`~tsmtrain.prep.plan.plan_encoding`
(trial encodings of a sample in ``DIR/.plan/``), printed as a table
(:func:`~tsmtrain.prep.plan.table_rows`) and :func:`~tsmtrain.prep.plan.choice_lines`.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .common import fail, load, set_args
from ..errors import UserError

__all__ = ["plan_command"]


def plan_command(plan: bool, recipe: Optional[str], lists: list[str], root: Optional[str], out: str,
                 short_sides: list[int], gops: Optional[str], target: Optional[float],
                 cores_per_gpu: Optional[float], sample: Optional[int], rounds: Optional[int],
                 json_file: Optional[str], encoding: dict, jobs: Optional[int], decoder: str, frame_mappings: bool,
                 retry_failed: bool, shard: Optional[str], merge: bool, tasks: Optional[int], shards: bool,
                 sets: list[str]) -> None:
    """Check the plan's options (one ``error:`` line each, exit 2), encode and measure the
    sample, print the table and the choice; ``encoding``: prepare's other settings (fps, crf,
    preset, fastdecode). Also called when an option of the plan comes without ``--plan``."""
    from ..prep.plan import (DEFAULT_GOPS, DEFAULT_ROUNDS, DEFAULT_SAMPLE, check_plan_options, parse_gops,
                             plan_encoding)
    from ..prep.encode import Settings, check_options, check_tools, make_worklist

    sample = DEFAULT_SAMPLE if sample is None else sample
    rounds = DEFAULT_ROUNDS if rounds is None else rounds
    settings = Settings(**encoding)
    try:
        gop_list = list(DEFAULT_GOPS) if gops is None else parse_gops(gops)
        check_plan_options(plan, target, cores_per_gpu, gop_list, short_sides, sample, rounds, shard, merge, shards)
        check_options(recipe, lists, root, None, False, tasks, settings)
    except UserError as err:
        fail(err.problems)
    cfg = load(recipe, sets) if recipe is not None else None
    if cfg is not None:
        root, lists = cfg.data.root, [cfg.data.train_list] + ([cfg.data.val_list] if cfg.data.val_list else [])
    source = [recipe, *set_args(sets)] if recipe is not None else [*_list_args(lists), "--root", root]
    try:
        check_tools(decoder)
        videos = make_worklist(lists, root, out)
        result = plan_encoding(videos, root, cfg, target, cores_per_gpu, gop_list, short_sides, settings, sample,
                               rounds, jobs, decoder, frame_mappings, retry_failed, source, say=_say)
    except UserError as err:
        fail(str(err).splitlines())
    except KeyboardInterrupt:
        _say("interrupted: run the same command again to continue (finished encodings are kept)")
        raise typer.Exit(130)
    _show(result)
    if json_file:
        result.write(json_file)
        print(f"wrote {json_file}")


def _list_args(lists: list[str]) -> list[str]:
    return [arg for path in lists for arg in ("--list", str(path))]


def _show(result) -> None:
    """Print the plan's table and its choice on stdout."""
    from rich.console import Console
    from rich.table import Table

    from ..prep.plan import TABLE_COLUMNS, choice_lines, table_rows

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"{result.rows[0].videos} sample videos, {result.rows[0].clips} clips per measurement, "
                        f"medians of {result.rounds} round(s); target {result.target:g} clips/s per GPU with "
                        f"{result.cores_per_gpu:g} cores")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in choice_lines(result):
        console.print(line)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
