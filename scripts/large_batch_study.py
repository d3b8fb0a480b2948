"""The large-batch study: does a larger global batch keep its accuracy with the large-batch
machinery (linear scaling rule, gradual warmup, LARS) and lose it without?

One recipe (default ``configs/large_batch_study.yaml``: TSM-ResNet18 from scratch on the
project's rendered study dataset, :func:`tsmtrain.prep.synthetic.generate_study_dataset`) is
trained at global batches B0, 4xB0 and 16xB0 (``--batches 1,4,16``, or up to 64xB0 and beyond:
multiples of B0 = ``train.batch_size``), from the same seed, for the same epochs unless
``--epochs-per-batch`` gives each multiple its own (``1:4,4:15,16:25,64:36``) or the recipe's
``schedule.epochs_per_batch_doubling`` adds epochs per doubling of the batch (``--set``). The larger batches
accumulate gradients on one process (``dist.engine: none``, ``dist.backward_passes_per_step``
= the multiple, ``train.batch_size`` unchanged), which is the arithmetic of that many ranks with
per-rank BatchNorm. The learning rate follows the recipe's linear scaling rule
(``lr = optim.base_lr * global_batch / optim.base_batch``, Goyal et al. 2017, section 2.1).
Three methods (``--methods``):

* ``sgd``: SGD with the linear scaling rule and no warmup (``schedule.warmup_epochs = 0``),
* ``sgd-warmup``: SGD with linear scaling and the recipe's gradual warmup (Goyal et al. 2017,
  section 2.2),
* ``lars-warmup``: LARS (You et al. 2017) with the recipe's warmup and trust coefficient,
* ``lars-knobs`` (not in the default ``--methods``): ``lars-warmup`` with the knobs of MLPerf's
  large-batch ResNet-50: label smoothing 0.1 (``train.label_smoothing``), no weight decay on
  BatchNorm and biases and LARS on the weights only (``optim.exclude_from_decay`` and
  ``optim.lars_exclude``: ``norm_and_bias``, the defaults, set explicitly).

Warmup and epochs that grow with the batch are the recipe's
``schedule.warmup_epochs_per_batch_doubling`` and ``schedule.epochs_per_batch_doubling``
(``--set``, for every method; ``sgd`` keeps no warmup at any batch).

Every run is a ``tsmtrain run`` of the recipe in a subprocess (the project's own training loop,
optimizers, schedule and accumulation), ``--parallel`` at a time. Writes, under ``--out``
(default ``runs/large_batch_study``):

* ``runs/METHOD-xK/``: each run's directory (``metrics.jsonl``, ``train.log``, ``recipe.yaml``),
* ``study.csv``: one row per run (method, global batch, learning rate, epochs, warmup epochs,
  optimizer steps, final and best validation top-1 in percent, difference to the method's B0
  in points, top-1 after every epoch, wall seconds, the seed of an extra ``--b0-seeds`` run),
* ``study.md``: the table of final top-1, method x global batch, with the difference to B0
  and the optimizer steps each run took, and the spread of B0 over ``--b0-seeds``,
* ``study.png``: left, final top-1 against the global batch, one line per method; right, the
  validation top-1 after every epoch of every run.

    python scripts/large_batch_study.py                       # the full study (docs/scaling.md: Large-batch study)
    python scripts/large_batch_study.py --batches 1,4 --methods lars-warmup --epochs 1 --clips 48
    python scripts/large_batch_study.py --batches 16 && python scripts/large_batch_study.py --report-only
    python scripts/large_batch_study.py --batches 1,4,16,64 --methods lars-warmup,lars-knobs \
        --epochs-per-batch 1:4,4:15,16:25,64:36 --b0-seeds 1   # >= 300 optimizer steps at 16xB0

Runs go in the order of ``--batches``, then ``--methods`` (extra seeds after their batch's runs):
name the longest first (``--batches 64,16,4,1``) so that the last runs to finish are short. A
second invocation with other ``--batches`` adds runs beside the earlier ones (``--report-only``
then tabulates them all).

Exit status 2 with one line on a bad option or recipe (or a dataset without one full global
batch at a multiple); a failed run stops the study with the tail of its log.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tsmtrain.optim import batch_scaled_schedule, linear_scaling  # noqa: E402
from tsmtrain.recipe import RecipeError, load_recipe  # noqa: E402

METHODS = {
    # name: (label, recipe overrides); warmup and trust coefficient come from the recipe
    "sgd": ("SGD, linear scaling, no warmup",
            ["optim.name=sgd", "schedule.warmup_epochs=0", "schedule.warmup_epochs_per_batch_doubling=0"]),
    "sgd-warmup": ("SGD, linear scaling + warmup (Goyal et al.)", ["optim.name=sgd"]),
    "lars-warmup": ("LARS + warmup (You et al.)", ["optim.name=lars"]),
    "lars-knobs": ("LARS + warmup + MLPerf's knobs (label smoothing 0.1)",
                   ["optim.name=lars", "train.label_smoothing=0.1", "optim.exclude_from_decay=norm_and_bias",
                    "optim.lars_exclude=norm_and_bias"]),
}
DEFAULT_METHODS = ("sgd", "sgd-warmup", "lars-warmup")


@dataclass
class Run:
    """One training run of the study and, once done, what it measured.

    Attributes:
        method: a key of :data:`METHODS`.
        multiple: global batch / B0, which is ``dist.backward_passes_per_step``.
        global_batch: clips per optimizer step.
        lr: peak learning rate by the linear scaling rule.
        warmup_epochs: gradual warmup length in epochs at this batch (0 for ``sgd``).
        overrides: the ``--set`` values of its ``tsmtrain run``.
        epochs: epochs at this batch (``--epochs-per-batch``, or the recipe's, grown by
            ``schedule.epochs_per_batch_doubling``).
        planned_steps: optimizer steps the run will take (``steps_per_epoch * epochs``).
        seed: ``train.seed`` of an extra run at the smallest batch (``--b0-seeds``); ``None``:
            the recipe's seed, a run of the main table.
        top1: validation top-1 in percent after every evaluated epoch.
        steps: optimizer steps taken.
        wall_s: seconds the run took.
    """

    method: str
    multiple: int
    global_batch: int
    lr: float
    warmup_epochs: float
    overrides: list[str]
    epochs: int = 0
    planned_steps: int = 0
    seed: int | None = None
    top1: list[float] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.method}-x{self.multiple}" + ("" if self.seed is None else f"-seed{self.seed}")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"error: {what}: expected positive integers, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    """``--b0-seeds`` as a list of seeds (``train.seed`` values, >= 0)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = [-1]
    if any(s < 0 for s in seeds):
        raise SystemExit(f"error: --b0-seeds: expected comma-separated seeds (integers >= 0), got {text!r}")
    return seeds


def _epochs_per_batch(text: str | None, batches: list[int]) -> dict[int, int]:
    """``--epochs-per-batch`` ``K:E,...`` as ``{multiple: epochs}``; every K must be in ``--batches``."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        k, sep, e = item.partition(":")
        try:
            k, e = int(k), int(e)
        except ValueError:
            k = e = 0
        if not sep or k < 1 or e < 1:
            raise SystemExit(f"error: --epochs-per-batch: expected MULTIPLE:EPOCHS pairs of positive integers, "
                             f"comma-separated, got {item!r}")
        if k not in batches:
            raise SystemExit(f"error: --epochs-per-batch: multiple {k} is not in --batches ({','.join(map(str, batches))})")
        mapping[k] = e
    return mapping


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "configs" / "large_batch_study.yaml"), help="the B0 recipe")
    p.add_argument("--out", default="runs/large_batch_study", help="folder for the runs, table and plot")
    p.add_argument("--batches", default="1,4,16", help="global batches as multiples of B0 (train.batch_size)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the recipe's)")
    p.add_argument("--epochs-per-batch", default=None, metavar="K:E,...",
                   help="epochs of the runs at multiple K, e.g. 1:4,4:15,16:25,64:36 (multiples not named: --epochs)")
    p.add_argument("--b0-seeds", default="", metavar="S,...",
                   help="extra runs at the smallest batch with these train.seed values, for the spread of B0 "
                        "(e.g. 1: a second seed; default: none)")
    p.add_argument("--clips", type=int, default=1536, help="training clips rendered (divided evenly among classes)")
    p.add_argument("--val-clips", type=int, default=480, help="validation clips rendered")
    p.add_argument("--data", default=None, help="folder to render the dataset into (default: the recipe's data.root)")
    p.add_argument("--parallel", type=int, default=3, help="runs at a time (each with the recipe's train.threads)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the table and plot from the finished runs under --out")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override for every run")
    args = p.parse_args(argv)
    args.batches = _ints(args.batches, "--batches")
    args.epochs_per_batch = _epochs_per_batch(args.epochs_per_batch, args.batches)
    args.b0_seeds = _seeds(args.b0_seeds)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise SystemExit(f"error: --methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    for name in ("epochs", "clips", "val_clips", "parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be at least 1, got {value}")
    return args


def plan(args: argparse.Namespace) -> tuple[list[Run], Path, dict]:
    """The runs of the study (after rendering nothing); returns ``(runs, data_root, base_overrides)``.

    Raises:
        SystemExit: the recipe or an override is invalid (one line per problem).
    """
    try:
        recipe = load_recipe(args.recipe, args.sets, check_files=False)
    except RecipeError as err:
        raise SystemExit("\n".join(f"error: {p}" for p in err.problems)) from None
    data_root = Path(args.data or recipe.data.root).resolve()
    out = Path(args.out).resolve()
    base = list(args.sets) + [
        f"data.root={data_root}", f"data.train_list={data_root / 'train.txt'}",
        f"data.val_list={data_root / 'val.txt'}", "data.generate=null",  # rendered here, with --clips
        "dist.engine=none", "dist.np=1", f"run.dir={out / 'runs'}",
    ]
    if args.epochs is not None:
        base.append(f"schedule.epochs={args.epochs}")
    runs = []
    for method in args.methods:
        runs += [_plan_run(args, recipe, base, method, k) for k in args.batches]
        runs += [_plan_run(args, recipe, base, method, min(args.batches), seed) for seed in args.b0_seeds]
    return runs, data_root, {"recipe": recipe}


def _plan_run(args: argparse.Namespace, recipe, base: list[str], method: str, k: int, seed: int | None = None) -> Run:
    """One run of the study: ``method`` at ``k`` x B0 (with ``train.seed`` = ``seed``: an extra
    seed of the smallest batch, for the spread)."""
    name = f"{method}-x{k}" + ("" if seed is None else f"-seed{seed}")
    overrides = base + METHODS[method][1] + [f"dist.backward_passes_per_step={k}", f"run.name={name}"]
    overrides += [] if seed is None else [f"train.seed={seed}"]
    r = _load(args.recipe, overrides, method, k)
    if k in args.epochs_per_batch:  # these epochs at this batch; the warmup as the recipe's rule has it
        overrides += [f"schedule.epochs={args.epochs_per_batch[k]}", "schedule.epochs_per_batch_doubling=0",
                      f"schedule.warmup_epochs={r.schedule.warmup_epochs!r}", "schedule.warmup_epochs_per_batch_doubling=0"]
        r = _load(args.recipe, overrides, method, k)
    scaling = linear_scaling(r, 1)
    per_epoch = _train_clips(args, recipe) // scaling.global_batch
    if per_epoch < 1:
        raise SystemExit(f"error: --clips {args.clips} gives {_train_clips(args, recipe)} training clips, "
                         f"fewer than one global batch of {scaling.global_batch} at {k}xB0")
    return Run(method, k, scaling.global_batch, scaling.lr, r.schedule.warmup_epochs, overrides,
               epochs=r.schedule.epochs, planned_steps=per_epoch * r.schedule.epochs, seed=seed)


def _load(recipe_path: str, overrides: list[str], method: str, k: int):
    """The recipe of one run, with the epochs and warmup of its batch
    (:func:`~tsmtrain.optim.batch_scaled_schedule` on one process).

    Raises:
        SystemExit: the overrides make an invalid recipe (one line per problem, naming the run).
    """
    try:
        return batch_scaled_schedule(load_recipe(recipe_path, overrides, check_files=False), 1)
    except RecipeError as err:
        raise SystemExit("\n".join(f"error: {method} x{k}: {p}" for p in err.problems)) from None


def _train_clips(args: argparse.Namespace, recipe) -> int:
    """Training clips rendered: ``--clips`` divided evenly among the classes."""
    k = recipe.model.num_classes
    return args.clips // k * k


def render(recipe, data_root: Path, clips: int, val_clips: int) -> float:
    """Render the study dataset for ``recipe.model.num_classes`` classes; returns seconds taken."""
    from tsmtrain.prep.synthetic import generate_study_dataset

    k = recipe.model.num_classes
    if clips < k or val_clips < k:
        raise SystemExit(f"error: --clips ({clips}) and --val-clips ({val_clips}) must give every one of the {k} "
                         "classes at least one clip")
    t0 = time.perf_counter()
    try:
        generate_study_dataset(data_root, num_classes=k, train_per_class=clips // k, val_per_class=val_clips // k)
    except ValueError as err:
        raise SystemExit(f"error: model.num_classes = {k}: {err}") from None
    return time.perf_counter() - t0


def train_one(run: Run, recipe_path: str, out: Path) -> Run:
    """Train one run with ``tsmtrain run`` in a subprocess and read its metrics.jsonl.

    Raises:
        RuntimeError: the run failed (with the tail of its log) or recorded no evaluation.
    """
    run_dir = out / "runs" / run.name
    if run_dir.exists():  # a study starts its runs afresh
        import shutil

        shutil.rmtree(run_dir)
    log_path = out / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tsmtrain", "run", recipe_path, "--no-resume"]
    cmd += [a for s in run.overrides for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    run.wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(True)[-15:])
        raise RuntimeError(f"{run.name} failed (exit status {proc.returncode}); the end of {log_path}:\n{tail}")
    (out / "logs" / f"{run.name}.json").write_text(json.dumps({"wall_s": run.wall_s}))
    return read_run(run, out)


def read_run(run: Run, out: Path) -> Run:
    """Fill ``run`` from its finished run directory under ``out`` (``metrics.jsonl``; the epochs
    and warmup it trained from its ``recipe.yaml``, where the run resolved them; and the wall
    time that :func:`train_one` wrote next to its log).

    Raises:
        RuntimeError: no metrics.jsonl, or no validation record in it.
    """
    metrics = out / "runs" / run.name / "metrics.jsonl"
    if not metrics.is_file():
        raise RuntimeError(f"{run.name}: {metrics} not found (not run yet?)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    run.top1 = [r["val_top1"] for r in records if "val_top1" in r]
    run.steps = max((r["step"] for r in records), default=0)
    if not run.top1:
        raise RuntimeError(f"{run.name}: no validation record in {metrics} (does the recipe have data.val_list?)")
    resolved = out / "runs" / run.name / "recipe.yaml"
    if resolved.is_file():
        schedule = yaml.safe_load(resolved.read_text())["schedule"]
        run.epochs, run.warmup_epochs = schedule["epochs"], schedule["warmup_epochs"]
    timing = out / "logs" / f"{run.name}.json"
    if timing.is_file():
        run.wall_s = json.loads(timing.read_text())["wall_s"]
    return run


def _b0(runs: list[Run], run: Run) -> Run | None:
    """The same method's run at the smallest global batch (at the recipe's seed)."""
    same = [r for r in runs if r.method == run.method and r.seed is None]
    return min(same, key=lambda r: r.global_batch) if same else None


def write_csv(runs: list[Run], path: Path) -> None:
    """One row per run; top-1 in percent, differences in points."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "multiple", "global_batch", "lr", "epochs", "warmup_epochs", "steps", "final_top1",
                    "delta_vs_b0", "best_top1", "top1_by_epoch", "wall_s", "seed"])
        for r in runs:
            b0 = _b0(runs, r)
            w.writerow([r.method, r.multiple, r.global_batch, f"{r.lr:.6g}", r.epochs, f"{r.warmup_epochs:g}", r.steps,
                        f"{r.top1[-1]:.2f}", f"{r.top1[-1] - b0.top1[-1]:+.2f}", f"{max(r.top1):.2f}",
                        ";".join(f"{x:.2f}" for x in r.top1), f"{r.wall_s:.0f}", "" if r.seed is None else r.seed])


def write_markdown(runs: list[Run], path: Path, b0: int) -> None:
    """Method x global batch table of final validation top-1 (difference to the method's B0 in
    points) and the optimizer steps each run took, the spread of B0 over seeds (``--b0-seeds``),
    then every run's learning rate, epochs, warmup and steps."""
    batches = sorted({(r.multiple, r.global_batch) for r in runs})
    head = ["method"] + [f"{'B0' if m == 1 else f'{m}xB0'} = {g}" for m, g in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r.method for r in runs):
        cells = [METHODS[method][0]]
        for m, _ in batches:
            r = next((x for x in runs if x.method == method and x.multiple == m and x.seed is None), None)
            if r is None:
                cells.append("")
                continue
            ref = _b0(runs, r)
            delta = "" if r is ref else f" ({r.top1[-1] - ref.top1[-1]:+.1f})"
            cells.append(f"{r.top1[-1]:.1f}%{delta}, {r.steps} steps")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    epochs = sorted({r.epochs for r in runs})
    after = f"the same {epochs[0]} epochs" if len(epochs) == 1 else "each run's epochs (below)"
    lines.append(f"Final validation top-1 after {after}, and the optimizer steps the run took; in brackets the "
                 f"difference in points to the same method at its smallest batch. B0 = {b0} clips.")
    for method in dict.fromkeys(r.method for r in runs if r.seed is not None):
        ref = _b0(runs, next(r for r in runs if r.method == method))
        finals = [ref.top1[-1]] + [r.top1[-1] for r in runs if r.method == method and r.seed is not None]
        lines.append("")
        lines.append(f"Spread of {method} at its smallest batch over {len(finals)} seeds: "
                     f"{', '.join(f'{x:.1f}%' for x in finals)} (range {max(finals) - min(finals):.1f} points).")
    lines.append("")
    lines.append("| run | global batch | peak lr | epochs | warmup epochs | optimizer steps | top-1 by epoch | wall s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        lines.append(f"| {r.name} | {r.global_batch} | {r.lr:.4g} | {r.epochs} | {r.warmup_epochs:g} | {r.steps} | "
                     f"{', '.join(f'{x:.1f}' for x in r.top1)} | {r.wall_s:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(runs: list[Run], path: Path) -> None:
    """Left: final top-1 against the global batch (log scale), one line per method (extra seeds:
    crosses); right: the validation top-1 after every epoch, colour by method, line style by batch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    colours = {"sgd": "tab:red", "sgd-warmup": "tab:blue", "lars-warmup": "tab:green", "lars-knobs": "tab:purple"}
    styles = ["-", "--", ":", "-."]
    multiples = sorted({r.multiple for r in runs})
    for method in dict.fromkeys(r.method for r in runs):
        mine = sorted((r for r in runs if r.method == method and r.seed is None), key=lambda r: r.global_batch)
        left.plot([r.global_batch for r in mine], [r.top1[-1] for r in mine], "o-", color=colours[method],
                  label=METHODS[method][0])
        seeds = [r for r in runs if r.method == method and r.seed is not None]
        left.plot([r.global_batch for r in seeds], [r.top1[-1] for r in seeds], "x", color=colours[method])
        for r in mine:
            right.plot(range(1, len(r.top1) + 1), r.top1, styles[multiples.index(r.multiple) % len(styles)],
                       color=colours[method], label=f"{method} x{r.multiple}")
    globals_ = sorted({r.global_batch for r in runs})
    left.set_xscale("log", base=2)
    left.set_xticks(globals_, [str(g) for g in globals_])
    left.set_xlabel("global batch (clips)")
    left.set_ylabel("final validation top-1 (%)")
    left.set_title("top-1 at equal epochs" if len({r.epochs for r in runs}) == 1 else "final top-1")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("epoch")
    right.set_ylabel("validation top-1 (%)")
    right.set_title("curves (line style: batch multiple)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[Run]:
    """Run the study; returns its runs with their results (see the module docstring)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    runs, data_root, info = plan(args)
    recipe = info["recipe"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    render_s = 0.0 if args.report_only else render(recipe, data_root, args.clips, args.val_clips)
    if not args.report_only:
        print(f"dataset: {data_root} ({args.clips // recipe.model.num_classes * recipe.model.num_classes} train, "
              f"{args.val_clips // recipe.model.num_classes * recipe.model.num_classes} val clips), "
              f"{render_s:.0f} s to render", flush=True)

    def one(run: Run) -> Run:
        print(f"start {run.name}: global batch {run.global_batch}, lr {run.lr:.4g}, {run.epochs} epochs with "
              f"{run.warmup_epochs:g} of warmup, {run.planned_steps} steps", flush=True)
        train_one(run, args.recipe, out)
        print(f"done  {run.name}: top-1 {run.top1[-1]:.2f}% after {run.steps} steps, {run.wall_s:.0f} s", flush=True)
        return run

    # in the order of --batches, then --methods
    order = sorted(runs, key=lambda r: (args.batches.index(r.multiple), r.seed is not None))
    try:
        if args.report_only:
            runs = [read_run(r, out) for r in runs]
        else:
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                list(pool.map(one, order))
    except RuntimeError as err:
        raise SystemExit(f"error: {err}") from None
    write_csv(runs, out / "study.csv")
    write_markdown(runs, out / "study.md", recipe.train.batch_size)
    plot(runs, out / "study.png")
    total = time.perf_counter() - t_start
    print((out / "study.md").read_text())
    print("per run: " + ", ".join(f"{r.name} {r.wall_s:.0f} s" for r in runs))
    if not args.report_only:
        print(f"total {total:.0f} s ({total / 60:.1f} min; rendering {render_s:.0f} s)")
    print(f"wrote {out / 'study.csv'}, {out / 'study.md'}, {out / 'study.png'}")
    return runs


if __name__ == "__main__":
    main()
