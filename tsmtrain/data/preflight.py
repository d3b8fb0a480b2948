"""The check before the first step: every file that the readers of a recipe's lists will open.

``tsmtrain run`` calls :func:`data_problems` on rank 0 after the dataset is built
(``data.generate``) and before the network is, and ``tsmtrain validate`` calls it after the recipe
check (``validate --no-files`` skips both, for a recipe meant for another machine). It covers
every list of the recipe, ``data.train_list`` and ``data.val_list``, and what their videos are
read from:

* a shard index (``data.root`` at ``DIR/index.json``, or at ``DIR`` that ``tsmtrain prepare
  --shards`` wrote: :func:`~tsmtrain.data.readers.tar.shard_index_file`): the index must load (well
  formed), every listed video must be in it, and every shard holding one must exist with the
  size the index records (one ``stat`` per shard; the samples' CRC-32 is checked as they are read);
* ``data.modality: flow``: every video's flow file (:func:`find_flows`) must exist and have been
  computed with the recipe's ``data.flow_method``, ``flow_preset`` and ``flow_bound``;
* with exact torchcodec seeking (``data.seek_mode: exact``), each prepared video's frame table;
* ``data.features``: the index of each list (``DIR/train``, ``DIR/val``) and every shard it names;
* otherwise ``data.decoder``'s package must be installed (a ``pip install tsmtrain`` without the
  decoder's extra; looked up, not imported).

Video files themselves are not looked at: a video that cannot be read is skipped and replaced in
training (counted in ``skipped_videos``), and counted as wrong in validation, never replaced.

Nothing here imports torch: ``validate`` runs on login nodes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .lists import VideoRecord, read_list
from .manifest import JOURNALS_DIR, ManifestError
from .readers.files import prepared_videos
from .readers.tar import INDEX, SHARDS_FOLDER, ShardIndex, shard_index_file

__all__ = ["data_problems", "one_line", "find_flows", "Flows"]

LISTS = ("data.train_list", "data.val_list")
"""The recipe keys of the lists checked, in order."""

DECODER_PACKAGES = {"torchcodec": ("torchcodec", "torchcodec"), "decord": ("decord", "decord"),
                    "pynvvideocodec": ("PyNvVideoCodec", "gpu")}
"""``data.decoder``: (the module it imports, the extra of ``pip install tsmtrain[EXTRA]`` that
installs it)."""


@dataclass
class Flows:
    """Where the flow of each video is (:func:`find_flows`).

    Attributes:
        found: ``{video path: flow file path}``.
        missing: the videos that have no flow (no manifest entry for it, no flow rendered beside
            a ``data.generate`` video).
        other: ``(video, (method, preset, bound))`` of each flow computed with other settings.
    """

    found: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    other: list[tuple[str, tuple]] = field(default_factory=list)


def find_flows(root: str | Path, records: list[VideoRecord], prepared: dict[str, dict], method: str, preset: str,
               bound: float) -> Flows:
    """Where the flow file of each video of ``records`` is. A prepared video's flow is the one its
    manifest record names (``tsmtrain prepare --flow``); a dataset that tsmtrain rendered
    (``data.generate``) keeps its flow beside each video, with the settings in
    ``root/.flow.json`` (:func:`tsmtrain.prep.flow_files.flow_of_dataset`), and a video whose flow file
    is not there has none. A manifest's flow file is not looked for here (:func:`data_problems` does)."""
    from .flow import flow_path, read_flow_marker

    def same(m, p, b):
        return m == method and (m != "dis" or p == preset) and float(b) == float(bound)

    marker = read_flow_marker(root)
    out = Flows()
    for r in records:
        entry = prepared.get(r.path) or {}
        if entry.get("flow"):
            path, settings = entry["flow"], (entry.get("flow_method"), entry.get("flow_preset"), entry.get("flow_bound"))
        elif marker is not None and not entry:
            path = flow_path(r.path)
            settings = (marker["method"], marker["preset"], marker["bound"])
            if not Path(path).is_file():
                out.missing.append(r.path)
                continue
        else:
            out.missing.append(r.path)
            continue
        if not same(*settings):
            out.other.append((r.path, settings))
        out.found[r.path] = path
    return out


def one_line(problems: list[str]) -> str:
    """The error line of :func:`data_problems`' list: the first problem and how many there are."""
    if len(problems) == 1:
        return f"{problems[0]} (found before training)"
    return f"{problems[0]} (the first of {len(problems)} problems with the data files, found before training)"


def data_problems(recipe) -> list[str]:
    """What is missing or wrong in the files that the readers of ``recipe``'s lists will open
    (see the module's docstring), one line each, in the order of the lists (training first).

    Args:
        recipe: a validated :class:`tsmtrain.recipe.Recipe`; with ``data.generate`` call it once
            the dataset is built.

    Returns:
        Problems, one line each (empty: everything is there): each names the file (shard, flow
        file, frame table, features index or shard, list file) and the list that needs it.
        :func:`one_line` makes them the one error line of ``run`` and ``validate``.

    Raises:
        tsmtrain.data.ListFileError: a list file is missing or malformed (one line per bad line, as ``run``
            reports it).
        tsmtrain.data.manifest.ManifestError: ``data.root``'s manifest is malformed.
    """
    d = recipe.data
    lists = [(key, getattr(d, key.split(".")[1])) for key in LISTS]
    lists = [(key, path) for key, path in lists if path is not None]
    if d.features is not None:  # the classifier alone: its features, not the videos, are read
        return _features_problems(Path(d.features), lists)
    missing = _missing_decoder(d.decoder)
    if missing:  # every video would fail in the loader workers
        return [missing]
    multi = recipe.model.loss == "sigmoid"
    records = [(key, read_list(path, d.root, recipe.model.num_classes, multi_label=multi)) for key, path in lists]
    index_file = shard_index_file(d.root)
    if index_file is not None:
        return _shard_problems(index_file, records, d)
    problems = []
    if (Path(d.root) / SHARDS_FOLDER).is_dir() and (Path(d.root) / JOURNALS_DIR).is_dir():
        problems.append(f"data.root: {d.root} holds tar shards but no {INDEX}: finish it with tsmtrain prepare ... "
                        f"--shards --merge (the videos are read from the index it writes)")
        return problems
    prepared = prepared_videos(d.root)
    if d.modality == "flow":
        problems += _flow_problems(d, records, prepared)
    if d.seek_mode == "exact" and d.decoder == "torchcodec":  # the frame tables are read at open
        for key, recs in records:
            for r in recs:
                table = (prepared.get(r.path) or {}).get("frame_mappings")
                if table and not Path(table).is_file():
                    problems.append(f"{table}: missing, the frame table of {r.path} ({key}, data.seek_mode: "
                                    "exact); restore it or prepare the video again")
    return problems


def _missing_decoder(decoder: str) -> str | None:
    """The problem line when ``decoder``'s package is not installed (found by name, not imported:
    no torch here), else None."""
    module, extra = DECODER_PACKAGES[decoder]
    if module in sys.modules:  # imported already (or blocked: None)
        found = sys.modules[module] is not None
    else:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
    if found:
        return None
    others = ", ".join(k for k in DECODER_PACKAGES if k != decoder)
    return (f"data.decoder: {decoder}: the {module} package is not installed; install it with "
            f"pip install 'tsmtrain[{extra}]', or set data.decoder to another decoder ({others})")


def _shard_problems(index_file: Path, records: list[tuple[str, list[VideoRecord]]], d) -> list[str]:
    """The problems of the shards that hold ``records``' videos (see :func:`data_problems`)."""
    try:
        index = ShardIndex.load(index_file)
    except ManifestError as err:  # ShardError: unreadable or malformed, named
        return [f"data.root: {line}" for line in str(err).splitlines()]
    problems = []
    if d.modality == "flow":
        problems.append(f"data.modality: flow: data.root {d.root} is a shard index, and flow is not stored in shards "
                        "yet: prepare files (tsmtrain prepare --flow, without --shards)")
    needed: dict[int, list[tuple[str, str]]] = {}  # shard -> (list key, video)
    for key, recs in records:
        absent = []
        for r in recs:
            sample = index.sample(r.path)
            if sample is None:
                absent.append(r.path)
            else:
                needed.setdefault(sample.shard, []).append((key, index.relative(r.path)))
        if absent:
            problems.append(f"{key}: {len(absent)} of its {len(recs)} videos are in no shard of {index_file}, first "
                            f"{absent[0]} (was the list prepared into this index?)")
    for shard in sorted(needed, key=lambda s: (needed[s][0][0] != LISTS[0], s)):  # the training list's first
        what = index.size_problem(shard)
        if what is None:
            continue
        held = needed[shard]
        keys = ", ".join(k for k in LISTS if any(key == k for key, _ in held))
        shown = ", ".join(v for _, v in held[:3]) + (", ..." if len(held) > 3 else "")
        problems.append(f"shard {index.shard_path(shard)}: {what}; it holds {len(held)} videos of {keys} ({shown}); "
                        "restore it or prepare it again")
    return problems


def _flow_problems(d, records: list[tuple[str, list[VideoRecord]]], prepared: dict[str, dict]) -> list[str]:
    """The flow files of ``records`` that are missing, absent from the manifest or made with
    other settings than the recipe's."""
    problems = []
    for key, recs in records:
        flows = find_flows(d.root, recs, prepared, d.flow_method, d.flow_preset, d.flow_bound)
        if flows.missing:  # as the loader words it (tsmtrain.data.loader.flow_files)
            problems.append(f"data.modality: flow: {len(flows.missing)} of {len(recs)} videos have no optical flow, "
                            f"first {flows.missing[0]} ({key}); prepare them with tsmtrain prepare --flow "
                            f"{d.flow_method} (the folder it writes is data.root)")
        problems += [f"{flow}: missing, the optical flow of {video} ({key}); restore it or prepare the video again "
                     f"(tsmtrain prepare --flow {d.flow_method})"
                     for video, flow in flows.found.items() if not Path(flow).is_file()]
        problems += [f"{video} ({key}): its flow was computed with --flow {m} --flow-preset {p} --flow-bound {b}; the "
                     f"recipe says data.flow_method: {d.flow_method}, data.flow_preset: {d.flow_preset}, "
                     f"data.flow_bound: {d.flow_bound} (set them to match, or prepare again)"
                     for video, (m, p, b) in flows.other]
    return problems


def _features_problems(folder: Path, lists: list[tuple[str, str]]) -> list[str]:
    """The features index of each list (``folder/train``, ``folder/val``) and the shards it names."""
    problems = []
    for key, list_file in lists:
        split = folder / ("train" if key == LISTS[0] else "val")
        index = split / INDEX
        try:
            doc = json.loads(index.read_text())
            shards = [str(name) for name in doc["shards"]]
        except FileNotFoundError:
            problems.append(f"data.features: {index}: missing, the features of {key} {list_file}; run tsmtrain "
                            f"extract RECIPE --out {folder} (an interrupted extraction resumes)")
            continue
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"data.features: {index}: not a features index ({type(err).__name__}: {err}); extract "
                            "again")
            continue
        problems += [f"data.features: {split / name}: missing, a features shard of {key} that {index} names; "
                     f"extract again (tsmtrain extract RECIPE --out {folder})"
                     for name in shards if not (split / name).is_file()]
    return problems

