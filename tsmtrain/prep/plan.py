"""``tsmtrain prepare --plan``: the encoding that feeds one GPU with the cores a cluster gives it.

How fast a prepared video decodes depends mostly on its keyframe interval (the GOP: a sampled
frame costs up to GOP decoded frames) and its size (the short side); both cost bytes. Which one
a cluster should use depends on its cores per GPU: a GPU that trains at ``target`` clips/s needs
``target / (clips/s per core)`` cores of decoding. The plan measures that on the user's own
videos instead of guessing:

1. **Sample.** ``sample`` videos of the list files (all when fewer), chosen deterministically
   and spread evenly over the de-duplicated list (:func:`sample_videos`; lists sorted by class
   give every part of the list a say). Their list is ``OUT/.plan/sample.txt``.
2. **Encode.** Each encoding (every GOP of ``gops`` at every short side of ``short_sides``, the
   other settings as given) is prepared by :mod:`tsmtrain.prep.encode` (``run_task`` and
   ``merge``: verified outputs, a manifest) into ``OUT/.plan/short<S>-gop<G>/``. The trial
   folders are kept: a second plan with the same settings encodes nothing again (``prepare``'s
   resume), and ``rm -r OUT/.plan`` removes them. They never mix with what ``tsmtrain prepare
   --out OUT`` writes (``OUT/<path>.mp4``, ``OUT/manifest.jsonl``, ``OUT/.shards/``). A video that
   fails at any encoding is left out of every measurement and named with its reason; fewer than
   2 videos left is an error.
3. **Measure.** Each encoding is read by :func:`tsmtrain.bench.data.bench_data` with one loader
   worker, i.e. on one core: the recipe's ``data`` section (decoder, segments, frame size, seek
   mode; ``auto`` chooses approximate seeking for prepared videos, as in training) in training
   mode (random offsets), over ``CLIPS_PER_VIDEO`` clips per sample video (the same clips at
   every encoding). Without a recipe: 8 segments, ``--decoder``, frames at the stored size
   (``data.short_side`` = the encoding's short side, so nothing is resized). The encodings are
   measured in turn, ``rounds`` times (in reverse order every other round), and each figure is
   the median over the rounds, so a change of the machine's load touches all of them alike.
   clips/s per core is the loader's clips/s per worker (what ``tsmtrain bench data`` reports
   and ``tsmtrain report --data-bench`` reads); the raw decoder's in-process rate on one core
   is recorded beside it.
4. **Choose.** :func:`choose_encoding`: the encoding with the fewest bytes per video whose
   clips/s per core times ``cores_per_gpu`` reaches ``target``; when none does, the fastest, how
   far it falls short and how many cores it would need.

Units: rates in clips/s (a clip is ``data.num_segments`` decoded frames), bytes per video the
mean size of the prepared sample videos in bytes, relative bytes against the default encoding
(GOP 4 at short side 256 when measured, else the largest GOP at the largest short side asked).

Errors: :class:`PlanError` (a bad option or too few usable videos; ``problems`` holds one line
each, naming the option); :mod:`tsmtrain.prep.encode`'s errors pass through.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data.manifest import MANIFEST, read_journal
from ..io import write_json, write_text
from .encode import Worklist, Settings, SourceVideo, merge, make_worklist, run_task
from ..errors import UserError

__all__ = ["PlanError", "Encoding", "Measurement", "Choice", "PlanResult", "PLAN_DIR", "SAMPLE_LIST",
           "MEASURED_LIST", "DEFAULT_GOPS", "DEFAULT_SAMPLE", "DEFAULT_ROUNDS", "CLIPS_PER_VIDEO", "parse_gops",
           "check_plan_options", "sample_videos", "encodings", "reference_encoding", "choose_encoding",
           "encode_sample", "measure_encodings", "plan_encoding", "prepare_command", "TABLE_COLUMNS",
           "table_rows", "choice_lines"]

PLAN_DIR = ".plan"
"""Folder in ``--out`` that holds the sample list and the trial encodings."""

SAMPLE_LIST = "sample.txt"
"""The sample's list file in :data:`PLAN_DIR` (paths relative to the source root, their labels)."""

MEASURED_LIST = "measured.txt"
"""Per trial folder: the videos prepared at every encoding, the ones measured (label 0)."""

DEFAULT_GOPS = (1, 2, 4, 8, 16)
"""GOP lengths (frames between keyframes) measured without ``--gops``."""

DEFAULT_SAMPLE = 12
"""Videos sampled without ``--sample``."""

DEFAULT_ROUNDS = 3
"""Alternating rounds without ``--rounds``."""

CLIPS_PER_VIDEO = 4
"""Clips per sample video in each measurement (other frames each time: epochs 0, 1, ...)."""


class PlanError(UserError):
    """The plan cannot run: a bad option, or fewer than 2 usable sample videos; ``problems``
    holds one line per problem, each naming the option or the videos."""



@dataclass(frozen=True)
class Encoding:
    """One trial encoding: ``gop`` (frames between keyframes) at ``short_side`` (pixels)."""

    gop: int
    short_side: int

    @property
    def folder(self) -> str:
        """Its trial folder's name in :data:`PLAN_DIR`."""
        return f"short{self.short_side}-gop{self.gop}"

    def settings(self, base: Settings) -> Settings:
        """``base`` with this GOP and short side."""
        return replace(base, gop=self.gop, short_side=self.short_side)


@dataclass
class Measurement:
    """What one encoding gave.

    Attributes:
        gop, short_side: the encoding (frames, pixels).
        clips_per_s_per_core: loader clips/s with one worker (median over the rounds).
        bytes_per_video: mean bytes of a prepared sample video.
        relative_bytes: ``bytes_per_video`` over the reference encoding's.
        raw_clips_per_s: the raw decoder in-process on one core, clips/s (median).
        rounds, raw_rounds: each round's clips/s (loader, raw).
        videos, clips: videos measured, clips per measurement.
        seek_modes: how the videos were opened (``{"approximate": 12}``).
        folder: the trial folder.
    """

    gop: int
    short_side: int
    clips_per_s_per_core: float
    bytes_per_video: float
    relative_bytes: float = 1.0
    raw_clips_per_s: float = 0.0
    rounds: list[float] = field(default_factory=list)
    raw_rounds: list[float] = field(default_factory=list)
    videos: int = 0
    clips: int = 0
    seek_modes: dict[str, int] = field(default_factory=dict)
    folder: str = ""

    def cores_needed(self, target: float) -> float:
        """Cores of decoding (loader workers) that feed ``target`` clips/s (inf at rate 0)."""
        return target / self.clips_per_s_per_core if self.clips_per_s_per_core > 0 else float("inf")

    def feeds(self, target: float, cores: float) -> bool:
        """Whether ``cores`` cores of this encoding reach ``target`` clips/s."""
        return self.clips_per_s_per_core * cores >= target


@dataclass
class Choice:
    """The answer of :func:`choose_encoding`.

    Attributes:
        target: clips/s per GPU asked for.
        cores_per_gpu: cores per GPU the cluster gives.
        chosen: the encoding with the fewest bytes that feeds the target; None: none does.
        fastest: the encoding with the most clips/s per core.
    """

    target: float
    cores_per_gpu: float
    chosen: Measurement | None
    fastest: Measurement

    @property
    def capacity(self) -> float:
        """clips/s the fastest encoding gives with ``cores_per_gpu`` cores."""
        return self.fastest.clips_per_s_per_core * self.cores_per_gpu

    @property
    def shortfall(self) -> float:
        """clips/s the fastest encoding misses the target by (0 when it feeds it)."""
        return max(0.0, self.target - self.capacity)

    def record(self) -> dict:
        """The choice as JSON-ready figures."""
        pick = self.chosen
        return {"feeds": pick is not None, "gop": pick.gop if pick else None,
                "short_side": pick.short_side if pick else None,
                "clips_per_s_per_gpu": pick.clips_per_s_per_core * self.cores_per_gpu if pick else None,
                "fastest": {"gop": self.fastest.gop, "short_side": self.fastest.short_side,
                            "clips_per_s_per_gpu": self.capacity,
                            "cores_needed": self.fastest.cores_needed(self.target)},
                "shortfall_clips_per_s": self.shortfall}


def parse_gops(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (frames between keyframes; order kept, repeats dropped).

    Raises:
        PlanError: not comma-separated whole numbers, or one below 1.
    """
    try:
        gops = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PlanError(f"--gops {text!r}: expected comma-separated frame counts, e.g. 1,2,4,8,16") from None
    if not gops:
        raise PlanError(f"--gops {text!r}: no GOP given")
    bad = [g for g in gops if g < 1]
    if bad:
        raise PlanError(f"--gops {text}: {bad[0]}: a GOP must be at least 1 frame")
    return list(dict.fromkeys(gops))


def check_plan_options(plan: bool, target: float | None, cores_per_gpu: float | None, gops: Sequence[int],
                       short_sides: Sequence[int], sample: int, rounds: int, shard: str | None = None,
                       merge: bool = False, shards: bool = False) -> None:
    """Check the options of ``tsmtrain prepare --plan`` together: ``target`` (clips/s per GPU)
    and ``cores_per_gpu`` given and positive, GOPs (frames) >= 1, short sides (pixels) even and
    >= 8, ``sample`` >= 2 videos, ``rounds`` >= 1, and none of ``--shard``, ``--merge``,
    ``--shards``. Called with ``plan`` False (an option of the plan given without ``--plan``),
    it raises for that.

    Raises:
        PlanError: one line per problem, each naming the option.
    """
    if not plan:
        raise PlanError("--target, --cores-per-gpu, --gops, --sample, --rounds and --json go with --plan")
    problems = []
    if target is None or cores_per_gpu is None:
        problems.append("--plan: give --target CLIPS_PER_S_PER_GPU and --cores-per-gpu C")
    if target is not None and not target > 0:
        problems.append(f"--target {target:g}: must be a positive number of clips/s per GPU")
    if cores_per_gpu is not None and not cores_per_gpu > 0:
        problems.append(f"--cores-per-gpu {cores_per_gpu:g}: must be a positive number of cores")
    problems += [f"--gops: {g}: a GOP must be at least 1 frame" for g in gops if g < 1][:1]
    problems += [f"--short-side {s}: must be an even number of pixels >= 8" for s in short_sides if s < 8 or s % 2]
    if sample < 2:
        problems.append(f"--sample {sample}: need at least 2 videos")
    if rounds < 1:
        problems.append(f"--rounds {rounds}: need at least 1 round")
    problems += [f"--plan with {name}: plan first, then prepare (the plan prints the command)"
                 for name, given in (("--shard", shard is not None), ("--merge", merge), ("--shards", shards))
                 if given]
    if problems:
        raise PlanError(problems)


def sample_videos(videos: Sequence[SourceVideo], count: int) -> list[SourceVideo]:
    """``count`` videos spread evenly over ``videos`` (the middle of each of ``count`` equal
    parts), in list order; all of them when there are no more than ``count``."""
    n = len(videos)
    if n <= count:
        return list(videos)
    return [videos[(2 * i + 1) * n // (2 * count)] for i in range(count)]


def encodings(gops: Sequence[int], short_sides: Sequence[int]) -> list[Encoding]:
    """Every GOP at every short side: short sides as given, GOPs ascending within each."""
    return [Encoding(g, s) for s in dict.fromkeys(short_sides) for g in sorted(set(gops))]


def reference_encoding(trials: Sequence[Encoding]) -> Encoding:
    """The encoding bytes are compared with: ``prepare``'s default (GOP 4, short side 256) when
    among ``trials``, else the largest GOP at the largest short side."""
    default = Encoding(Settings.gop, Settings.short_side)
    if default in trials:
        return default
    side = max(e.short_side for e in trials)
    return Encoding(max(e.gop for e in trials if e.short_side == side), side)


def choose_encoding(rows: Sequence[Measurement], target: float, cores_per_gpu: float) -> Choice:
    """The smallest encoding that feeds ``target`` clips/s per GPU with ``cores_per_gpu`` cores.

    Among the rows whose ``clips_per_s_per_core * cores_per_gpu >= target``, the one with the
    fewest ``bytes_per_video`` (ties: the faster, then the first); ``chosen`` is None when no row
    feeds the target, and ``fastest`` (the most clips/s per core) then says by how much it falls
    short (:attr:`Choice.shortfall`, clips/s) and the cores it needs
    (:meth:`Measurement.cores_needed`).

    Raises:
        PlanError: no rows, or a target or core count that is not positive.
    """
    if not rows:
        raise PlanError("no encoding was measured")
    if not target > 0 or not cores_per_gpu > 0:
        raise PlanError(f"target {target:g} clips/s and {cores_per_gpu:g} cores per GPU must be positive")
    feeding = [r for r in rows if r.feeds(target, cores_per_gpu)]
    chosen = min(feeding, key=lambda r: (r.bytes_per_video, -r.clips_per_s_per_core)) if feeding else None
    fastest = max(rows, key=lambda r: (r.clips_per_s_per_core, -r.bytes_per_video))
    return Choice(target, cores_per_gpu, chosen, fastest)


def _write_sample_list(plan: Worklist, sample: Sequence[SourceVideo], root: str | Path) -> Path:
    """Write :data:`SAMPLE_LIST` into ``plan.out_dir / PLAN_DIR``: the sample's paths relative
    to ``root`` with the label of each video's first list line."""
    labels: dict[int, int] = {}
    for _, lines in plan.lists:
        for index, label in lines:
            labels.setdefault(index, label)
    base = Path(root).expanduser().resolve()
    folder = plan.out_dir / PLAN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SAMPLE_LIST
    write_text(path, "".join(f"{Path(v.source).relative_to(base).as_posix()} {labels[v.index]}\n" for v in sample))
    return path


def encode_sample(plan: Worklist, sample: Sequence[SourceVideo], root: str | Path, trials: Sequence[Encoding],
                  settings: Settings, jobs: int | None = None, decoder: str = "torchcodec",
                  frame_mappings: bool = True, retry_failed: bool = False,
                  say: Callable[[str], None] = lambda line: None) -> tuple[dict[Encoding, dict[str, dict]], list[str]]:
    """Prepare ``sample`` (videos of ``plan``, sources under ``root``) at every encoding of
    ``trials`` (``settings`` otherwise) into ``plan.out_dir/.plan/<encoding>/``, and write each
    folder's :data:`MEASURED_LIST`: the videos prepared at every encoding.

    Returns:
        ``(records, left_out)``: per encoding, the ``ok`` manifest records of the measured videos
        by source path; and one line per video left out (source and reason).

    Raises:
        PlanError: fewer than 2 videos were prepared at every encoding (the reasons named).
        tsmtrain.prep.encode.PrepareError, ManifestError: as ``run_task`` and ``merge``.
    """
    sample_list = _write_sample_list(plan, sample, root)
    records: dict[Encoding, dict[str, dict]] = {}
    reasons: dict[str, str] = {}
    for trial in trials:
        folder = plan.out_dir / PLAN_DIR / trial.folder
        trial_plan = make_worklist([sample_list], root, folder)
        trial_settings = trial.settings(settings)
        done = run_task(trial_plan, trial_settings, (0, 1), jobs, decoder, frame_mappings, retry_failed,
                         progress=False)
        merge(trial_plan, trial_settings, 1)
        records[trial] = {}
        for record in read_journal(folder / MANIFEST):
            if record["status"] == "ok":
                records[trial][record["source"]] = record
            else:
                reasons.setdefault(record["source"], f"GOP {trial.gop}, short side {trial.short_side}: "
                                                     f"{record.get('reason')}")
        say(f"encoded GOP {trial.gop} at short side {trial.short_side}: {done.ok} now "
            f"({done.seconds:.1f} s), {done.done_before} already done, {done.failed} failed")
    usable = [v.source for v in sample if all(v.source in r for r in records.values())]
    left_out = [f"{source}: {reasons.get(source, 'not prepared')}" for source in
                (v.source for v in sample) if source not in usable]
    if len(usable) < 2:
        raise PlanError([f"fewer than 2 of the {len(sample)} sample videos could be prepared at every encoding"]
                        + [f"left out: {line}" for line in left_out])
    for trial, by_source in records.items():
        kept = {source: by_source[source] for source in usable}
        records[trial] = kept
        text = "".join(f"{record['output']} 0\n" for record in kept.values())
        write_text(plan.out_dir / PLAN_DIR / trial.folder / MEASURED_LIST, text)
    return records, left_out


def _measuring_recipe(recipe, folder: Path, trial: Encoding, decoder: str):
    """The recipe that reads ``folder``'s measured videos: ``recipe``'s data section (None: the
    default one at the stored size), no validation list, augmentation on the CPU."""
    from ..recipe import DataConfig, Recipe, TrainConfig

    where = {"root": str(folder), "train_list": str(folder / MEASURED_LIST), "val_list": None}
    if recipe is None:
        data = DataConfig(**where, decoder=decoder, short_side=trial.short_side,
                          input_size=min(224, trial.short_side))
        return Recipe(data=data, train=TrainConfig(device="cpu"))
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=where),
                                     "train": recipe.train.model_copy(update={"device": "cpu"})})


def measure_encodings(recipe, out_dir: str | Path, records: dict[Encoding, dict[str, dict]], rounds: int = 3,
                      decoder: str = "torchcodec",
                      say: Callable[[str], None] = lambda line: None) -> tuple[list[Measurement], list[str]]:
    """Measure clips/s per core of every encoding in ``records`` (from :func:`encode_sample`,
    folders in ``out_dir/.plan``) with :func:`tsmtrain.bench.data.bench_data` and one loader
    worker, in ``rounds`` alternating rounds (reversed every other round); figures are medians.

    Args:
        recipe: a :class:`tsmtrain.recipe.Recipe` whose ``data`` section reads the videos
            (its root and lists are replaced), or None: the default one (see the module).
        decoder: without a recipe, the decoder (``torchcodec`` or ``decord``).

    Returns:
        ``(rows, failed)``: one :class:`Measurement` per encoding (``relative_bytes`` against
        :func:`reference_encoding`), and the videos that could not be decoded (path and reason).

    Raises:
        PlanError: fewer than 2 clips of an encoding could be decoded.
    """
    from ..bench.data import DataBenchError, bench_data

    trials = list(records)
    benches: dict[Encoding, list] = {t: [] for t in trials}
    failed: set[str] = set()
    for r in range(rounds):
        for trial in trials if r % 2 == 0 else trials[::-1]:
            folder = Path(out_dir).absolute() / PLAN_DIR / trial.folder
            clips = CLIPS_PER_VIDEO * len(records[trial])
            try:
                bench = bench_data(_measuring_recipe(recipe, folder, trial, decoder), str(folder), workers=(1,),
                                   clips=clips, rounds=1)
            except DataBenchError as err:
                raise PlanError(f"GOP {trial.gop}, short side {trial.short_side}: {err}") from None
            failed.update(bench.failed)
            benches[trial].append(bench)
            say(f"round {r + 1}/{rounds}: GOP {trial.gop}, short side {trial.short_side}: "
                f"{bench.clips_per_s_per_core:.1f} clips/s per core (raw decoder {bench.raw_clips_per_s:.1f})")
    rows = []
    for trial in trials:
        runs = benches[trial]
        sizes = [record["bytes_out"] for record in records[trial].values()]
        rows.append(Measurement(
            trial.gop, trial.short_side, statistics.median(b.clips_per_s_per_core for b in runs),
            statistics.mean(sizes), raw_clips_per_s=statistics.median(b.raw_clips_per_s for b in runs),
            rounds=[b.clips_per_s_per_core for b in runs], raw_rounds=[b.raw_clips_per_s for b in runs],
            videos=len(sizes), clips=runs[0].clips, seek_modes=runs[0].seek_modes,
            folder=str(Path(out_dir).absolute() / PLAN_DIR / trial.folder)))
    reference = reference_encoding(trials)
    base = next(row.bytes_per_video for row in rows if (row.gop, row.short_side) == (reference.gop,
                                                                                       reference.short_side))
    for row in rows:
        row.relative_bytes = row.bytes_per_video / base if base else float("nan")
    return rows, sorted(failed)


@dataclass
class PlanResult:
    """What :func:`plan_encoding` found; :meth:`record` gives every figure as JSON.

    Attributes:
        target, cores_per_gpu: as asked (clips/s per GPU, cores).
        rows: one :class:`Measurement` per encoding, in table order.
        choice: :func:`choose_encoding` of the rows.
        reference: the encoding relative bytes compare with.
        sample: the sampled source videos; left_out: those left out, with reasons;
            decode_failed: videos the loader could not decode (left out of the figures).
        settings: the encoding settings besides GOP and short side.
        rounds: alternating rounds; folder: ``OUT/.plan``; command: the prepare command of the
            choice (None when none feeds the target).
    """

    target: float
    cores_per_gpu: float
    rows: list[Measurement]
    choice: Choice
    reference: Encoding
    sample: list[str]
    left_out: list[str]
    decode_failed: list[str]
    settings: dict
    rounds: int
    folder: str
    command: str | None = None

    def record(self) -> dict:
        """Every figure: the rows (with cores needed and whether each feeds the target), the
        choice, the sample and what was left out, the settings and the host."""
        rows = [{**asdict(row), "cores_needed": row.cores_needed(self.target),
                 "feeds": row.feeds(self.target, self.cores_per_gpu)} for row in self.rows]
        return {"target_clips_per_s_per_gpu": self.target, "cores_per_gpu": self.cores_per_gpu,
                "reference": asdict(self.reference), "encodings": rows, "choice": self.choice.record(),
                "command": self.command, "sample": self.sample, "left_out": self.left_out,
                "decode_failed": self.decode_failed, "settings": self.settings, "rounds": self.rounds,
                "clips_per_video": CLIPS_PER_VIDEO, "folder": self.folder,
                "host": {"hostname": platform.node(), "cores": os.cpu_count(), "machine": platform.machine()}}

    def write(self, path: str | Path) -> None:
        """Write :meth:`record` to ``path`` as JSON (the folders it needs are made).

        Raises:
            FileWriteError: it cannot be written (names ``path`` and why; :func:`tsmtrain.io.write_json`).
        """
        write_json(path, self.record(), indent=2)


def prepare_command(source: Sequence[str], out: str | Path, choice: Measurement, settings: Settings) -> str:
    """The ``tsmtrain prepare`` command line that makes ``choice`` for the whole dataset.

    Args:
        source: the arguments that name the videos (``[recipe, "--set", ...]`` or ``["--list",
            FILE, ..., "--root", ROOT]``).
        out: the output folder.
        choice: the encoding (its GOP and short side).
        settings: the other settings; those that differ from the defaults are added.
    """
    extra = []
    default = Settings()
    for name, option in (("fps", "--fps"), ("crf", "--crf"), ("preset", "--preset")):
        if getattr(settings, name) != getattr(default, name):
            extra += [option, str(getattr(settings, name))]
    if not settings.fastdecode:
        extra.append("--no-fastdecode")
    args = ["tsmtrain", "prepare", *source, "--out", str(out), "--gop", str(choice.gop), "--short-side",
            str(choice.short_side), *extra]
    return " ".join(shlex.quote(a) for a in args)


def plan_encoding(plan: Worklist, root: str | Path, recipe, target: float, cores_per_gpu: float,
                  gops: Sequence[int] = DEFAULT_GOPS, short_sides: Sequence[int] = (256,),
                  settings: Settings = Settings(), sample: int = DEFAULT_SAMPLE, rounds: int = DEFAULT_ROUNDS,
                  jobs: int | None = None, decoder: str = "torchcodec", frame_mappings: bool = True,
                  retry_failed: bool = False, source: Sequence[str] = (),
                  say: Callable[[str], None] = lambda line: None) -> PlanResult:
    """Sample, encode, measure and choose (the module's steps 1-4).

    Args:
        plan: :func:`tsmtrain.prep.encode.make_worklist` of the list files with ``--out``.
        root: the folder the lists' paths are relative to.
        recipe: the recipe whose ``data`` section reads the videos, or None (the default).
        target: clips/s one GPU trains at; cores_per_gpu: the cores each GPU gets.
        gops, short_sides: the encodings (frames between keyframes, pixels).
        settings: the other encoding settings (frame rate, quality, preset, fastdecode).
        sample, rounds: videos sampled, alternating rounds.
        jobs, decoder, frame_mappings, retry_failed: as :func:`tsmtrain.prep.encode.run_task`
            (``decoder`` also reads the videos without a recipe).
        source: the arguments naming the videos, for the printed command.
        say: called with a line of progress per encoding and per measurement.

    Raises:
        PlanError: bad options (see :func:`check_plan_options`), or too few usable videos.
        tsmtrain.prep.encode.PrepareError, ManifestError: as the preparation raises them.
    """
    check_plan_options(True, target, cores_per_gpu, gops, short_sides, sample, rounds)
    trials = encodings(gops, short_sides)
    chosen = sample_videos(plan.videos, sample)
    records, left_out = encode_sample(plan, chosen, root, trials, settings, jobs, decoder, frame_mappings,
                                      retry_failed, say)
    rows, failed = measure_encodings(recipe, plan.out_dir, records, rounds, decoder, say)
    choice = choose_encoding(rows, target, cores_per_gpu)
    others = {k: v for k, v in settings.key().items() if k not in ("gop", "short_side")}
    command = prepare_command(source, plan.out_dir, choice.chosen, settings) if choice.chosen else None
    return PlanResult(target, cores_per_gpu, rows, choice, reference_encoding(trials), [v.source for v in chosen],
                      left_out, failed, others, rounds, str(plan.out_dir / PLAN_DIR), command)


TABLE_COLUMNS = ("GOP", "short side", "clips/s per core", "raw clips/s", "kB per video", "bytes vs default",
                 "cores per GPU", "clips/s per GPU", "feeds")
"""The columns of :func:`table_rows`: the encoding (frames, pixels), clips/s per core (loader, one
worker) and of the raw decoder, kB (1000 bytes) per video, bytes relative to the reference, the
cores per GPU the target needs, the clips/s per GPU the plan's cores give, and whether that
reaches the target."""


def table_rows(result: PlanResult) -> list[list[str]]:
    """The plan's table as text cells, one row per encoding (:data:`TABLE_COLUMNS`)."""
    t, c = result.target, result.cores_per_gpu
    return [[str(r.gop), str(r.short_side), f"{r.clips_per_s_per_core:.1f}", f"{r.raw_clips_per_s:.1f}",
             f"{r.bytes_per_video / 1e3:,.0f}", f"{r.relative_bytes:.2f}x", f"{r.cores_needed(t):.1f}",
             f"{r.clips_per_s_per_core * c:.0f}", "yes" if r.feeds(t, c) else "no"] for r in result.rows]


def choice_lines(result: PlanResult) -> list[str]:
    """What the plan prints after its table (rich markup): the videos left out, then the
    choice and its prepare command, or by how much the fastest encoding falls short."""
    c, ref = result.choice, result.reference
    lines = [f"[yellow]left out:[/yellow] {line}" for line in result.left_out + result.decode_failed]
    where = f"{c.target:g} clips/s per GPU with {c.cores_per_gpu:g} cores per GPU"
    if c.chosen is not None:
        pick = c.chosen
        lines += [f"smallest encoding that feeds {where}: GOP {pick.gop} at short side {pick.short_side} "
                  f"({pick.clips_per_s_per_core:.1f} clips/s per core x {c.cores_per_gpu:g} = "
                  f"{pick.clips_per_s_per_core * c.cores_per_gpu:.0f} clips/s; {pick.relative_bytes:.2f}x the bytes "
                  f"of GOP {ref.gop} at {ref.short_side})",
                  f"prepare it with: {result.command}"]
    else:
        best = c.fastest
        lines.append(f"[red]no encoding feeds {where}[/red]: the fastest, GOP {best.gop} at short side "
                     f"{best.short_side}, gives {best.clips_per_s_per_core:.1f} x {c.cores_per_gpu:g} = "
                     f"{c.capacity:.0f} clips/s, {c.shortfall:.0f} clips/s ({c.shortfall / c.target:.0%}) short; "
                     f"it needs {best.cores_needed(c.target):.1f} cores per GPU")
    return lines
