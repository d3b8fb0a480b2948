"""``tsmtrain bench data``: how fast the recipe's own videos become training batches.

"Training Kinetics in 15 Minutes" (Lin, Gan, Han 2019) names data loading as the first of its
three bottlenecks. This benchmark measures the data path on the recipe's own videos, in one
run, in alternating rounds (medians), so that the figures can be compared with each other:

* **raw decoder**: in this process, on one core, open each sampled video and decode the T
  frames that segment sampling picks (the same indices, size, seek mode and backend as the
  loader): the ceiling of one loader worker, in clips/s. One video is opened first, untimed:
  the first open loads the decoder's libraries.
* **loader** at each worker count W: the recipe's DataLoader (workers, decoding, sampling,
  collate into ``(N, T, H, W, 3)`` batches) over the same clips; total clips/s and clips/s per
  worker, and the ratio of the latter to the raw decoder (1.0: the loader adds nothing).
* **augmentation** on the training device: the batched crop/resize/flip/normalise of
  :class:`~tsmtrain.data.transforms.VideoTransform` on one batch, in clips/s.
* **file opens** at each worker count: the files each loader worker opened over the benchmark
  (its warm-up pass and every round), and how many distinct files it read. From files, a clip
  opens its video (and, seeking exactly, its frame table) every time it is read; from shards
  (``data.root`` a shard index), a worker opens each shard it touches once and keeps it open,
  so its opens equal the shards it touched.

A worker is one process on one core, so clips/s per worker is clips/s per core; ``target``
(clips/s a GPU trains at) divided by it gives the cores each GPU needs to be fed. The JSON
record's ``clips_per_s_per_core`` is what ``tsmtrain report --data-bench`` multiplies by a
node's cores to get the scaling model's data ceiling (:mod:`tsmtrain.scaling`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.decoding import VideoDecodeError, choose_seek_mode
from ..data.lists import read_list
from ..data.decoding import GPU_ONLY
from ..data.loader import build_loader, clip_dataset
from ..data.sampling import segment_indices
from ..data.transforms import VideoTransform
from ..errors import UserError
from ..io import write_json

__all__ = ["DataBenchError", "DataBench", "bench_data", "load_data_bench", "check_split", "header_line",
           "progress_line", "summary_lines", "CLIPS_PER_S_PER_CORE", "SPLITS"]

CLIPS_PER_S_PER_CORE = "clips_per_s_per_core"
"""The key of the JSON record that ``tsmtrain report --data-bench`` reads."""


class DataBenchError(UserError):
    """The benchmark cannot run: no readable video, a bad worker count, ..."""


SPLITS = ("train", "val")
"""The lists :func:`bench_data` can read: ``train`` (random offsets) or ``val`` (segment centres)."""


def check_split(split: str) -> None:
    """Raises :class:`DataBenchError` when ``split`` is not one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise DataBenchError(f"--split: {split!r}: use train or val")


@dataclass
class DataBench:
    """What :func:`bench_data` measured. ``record()`` gives the JSON record.

    Attributes:
        raw_clips_per_s: raw decoder, clips/s on one core (median over the rounds).
        raw_seconds: seconds of one raw pass over the clips (median).
        loader: one dict per worker count: ``workers``, ``clips``, ``clips_per_s`` (median over
            the rounds), ``clips_per_s_per_worker``, ``ratio_to_raw``, ``rounds`` (each round's
            clips/s), ``files_opened_per_worker`` and ``distinct_files_per_worker`` (means over
            the workers, warm-up and every round included), ``clips_per_worker`` (clips each
            worker loaded, the same passes).
        layout: ``"files"`` or ``"shards"`` (``data.root`` a shard index).
        augment_clips_per_s: batched augmentation on ``augment_device``, clips/s.
        failed: videos that could not be decoded (path and reason); left out of every figure.
        against: set by :meth:`compare`: the earlier record's file, its clips/s per core, and
            the ratio of this run's to it.
    """

    recipe: str
    videos: int
    clips: int
    frames_per_clip: int
    frame_size: list[int] | None
    decoder: str
    seek_modes: dict[str, int]
    raw_clips_per_s: float
    raw_seconds: float
    rounds: int = 1
    raw_rounds: list[float] = field(default_factory=list)
    loader: list[dict] = field(default_factory=list)
    augment_clips_per_s: float = 0.0
    augment_device: str = "cpu"
    target_clips_per_s: float | None = None
    failed: list[str] = field(default_factory=list)
    against: dict | None = None
    layout: str = "files"

    @property
    def clips_per_s_per_core(self) -> float:
        """The loader's best clips/s per worker (= per core); the raw decoder's without a loader run."""
        rates = [row["clips_per_s_per_worker"] for row in self.loader]
        return max(rates) if rates else self.raw_clips_per_s

    def cores_per_gpu(self, target: float) -> float:
        """Cores (loader workers) needed to feed ``target`` clips/s."""
        return target / self.clips_per_s_per_core

    def record(self) -> dict:
        """The JSON record: every figure, the host and the library versions."""
        import torchvision

        versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
        for name in ("torchcodec", "decord"):
            try:
                versions[name] = __import__(name).__version__
            except Exception:  # not installed, or no __version__
                versions[name] = None
        rec = {
            "recipe": self.recipe, "videos": self.videos, "clips": self.clips,
            "frames_per_clip": self.frames_per_clip, "frame_size": self.frame_size, "decoder": self.decoder,
            "seek_modes": self.seek_modes, "layout": self.layout,
            "rounds": self.rounds,
            "raw": {"clips_per_s": self.raw_clips_per_s, "seconds": self.raw_seconds, "rounds": self.raw_rounds},
            "loader": self.loader,
            "augment": {"device": self.augment_device, "clips_per_s": self.augment_clips_per_s},
            CLIPS_PER_S_PER_CORE: self.clips_per_s_per_core,
            "failed": self.failed,
            "host": {"hostname": platform.node(), "cores": os.cpu_count(), "machine": platform.machine(),
                     "processor": _cpu_model()},
            "versions": versions,
        }
        if self.target_clips_per_s:
            rec["target_clips_per_s"] = self.target_clips_per_s
            rec["cores_per_gpu"] = self.cores_per_gpu(self.target_clips_per_s)
        if self.against is not None:
            rec["against"] = self.against
        return rec

    def compare(self, baseline: dict, path: str) -> float:
        """Compare with an earlier record (:func:`load_data_bench` of ``path``, e.g. of the source
        videos before ``tsmtrain prepare``); returns the ratio of the clips/s per core, this run's
        to the earlier one's, and notes it in :attr:`against` (and so in the record)."""
        ratio = self.clips_per_s_per_core / baseline[CLIPS_PER_S_PER_CORE]
        self.against = {"file": path, CLIPS_PER_S_PER_CORE: baseline[CLIPS_PER_S_PER_CORE], "ratio": ratio}
        return ratio

    def write(self, path: str | Path) -> None:
        """Write :meth:`record` to ``path`` as JSON (the folders it needs are made).

        Raises:
            FileWriteError: it cannot be written (names ``path`` and why; :func:`tsmtrain.io.write_json`).
        """
        write_json(path, self.record(), indent=2)


def header_line(recipe_path: str, data, clips: int, rounds: int) -> str:
    """The line ``tsmtrain bench data`` prints first: what is read (the recipe's ``data``
    section: decoder, frames per clip, frame size) and how often."""
    from ..data.readers.tar import is_shard_index

    return (f"{recipe_path}: {data.decoder}" + (" from tar shards" if is_shard_index(data.root) else "")
            + f", {data.num_segments} frames per clip"
            + (f" at {data.frame_size[0]}x{data.frame_size[1]}" if data.frame_size else " at the stored size")
            + f", {clips} clips per measurement, {rounds} rounds (medians)")


def progress_line(stage: str, row: dict) -> str:
    """One line for a measurement that :func:`bench_data` reports to ``on_result``."""
    if stage == "raw":
        return (f"raw decoder, 1 core: {row['clips_per_s']:.2f} clips/s ({row['clips']} clips"
                + (f", {row['failed']} failed" if row["failed"] else "") + ")")
    if stage == "loader":
        return (f"loader, {row['workers']} worker(s): {row['clips_per_s']:.2f} clips/s, "
                f"{row['clips_per_s_per_worker']:.2f} per worker, loader/raw {row['ratio_to_raw']:.2f}; "
                f"files opened per worker {row['files_opened_per_worker']:.1f} (distinct "
                f"{row['distinct_files_per_worker']:.1f}, for {row['clips_per_worker']:.0f} clips)")
    return f"augmentation on {row['device']}: {row['clips_per_s']:.1f} clips/s"


def summary_lines(result: DataBench) -> list[str]:
    """The lines ``tsmtrain bench data`` prints after the measurements (rich markup): the videos
    left out, the seek modes, clips/s per core, the cores per GPU at the target, and the ratio to
    an earlier record (:meth:`DataBench.compare`)."""
    lines = [f"[yellow]unreadable, left out:[/yellow] {line}" for line in result.failed]
    lines.append("seek modes: " + ", ".join(f"{k} {v}" for k, v in sorted(result.seek_modes.items())))
    lines.append(f"clips/s per core: {result.clips_per_s_per_core:.2f}")
    if result.target_clips_per_s:
        target = result.target_clips_per_s
        lines.append(f"cores per GPU at {target:g} clips/s: {result.cores_per_gpu(target):.1f}")
    if result.against is not None:
        lines.append(f"against {result.against['file']}: {result.against[CLIPS_PER_S_PER_CORE]:.2f} clips/s per "
                     f"core there, ratio {result.against['ratio']:.2f}x")
    return lines


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _keys(size: int, clips: int, seed: int) -> list[tuple[int, int]]:
    """``clips`` dataset keys ``(index, epoch)``: the list in a seeded order, cycled through
    epochs 0, 1, ... when it holds fewer videos than ``clips`` (other epochs sample other frames)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return [(order[i % size], i // size) for i in range(clips)]


class _SwappableSampler(list):
    """A sampler whose keys can be swapped between passes of a loader with persistent workers."""


def bench_data(recipe, recipe_path: str = "", workers: list[int] | tuple[int, ...] = (1, 2), clips: int = 64,
               target: float | None = None, split: str = "train", rounds: int = 3, on_result=None) -> DataBench:
    """Measure the data path of ``recipe`` (a :class:`tsmtrain.recipe.Recipe`) on its own videos.

    Args:
        recipe: the recipe; its ``data`` section says which videos, how many segments, the frame
            size, decoder and seek mode (videos ``tsmtrain prepare`` wrote are found through its
            manifest in ``data.root``).
        recipe_path: recorded in the result.
        workers: loader worker counts to measure, each >= 1.
        clips: clips decoded per measurement (raw decoder, and each worker count); more clips
            than videos cycle through the list with other sampled frames.
        target: clips/s one GPU trains at; adds the cores per GPU it needs.
        split: ``"train"`` (random offsets, as in training) or ``"val"`` (segment centres).
        rounds: times the raw decoder and each worker count are measured, alternately; each
            figure is the median over the rounds.
        on_result: called with ``(stage, dict)`` after each measurement (progress output).

    Returns:
        A :class:`DataBench`.

    Raises:
        DataBenchError: bad arguments (a ``split`` not in :data:`SPLITS`, ...), no validation list
            for ``split="val"``, or no video of the list could be decoded.
        tsmtrain.data.ListFileError: a malformed list file.
    """
    d = recipe.data
    check_split(split)
    if not workers or any(w < 1 for w in workers):
        raise DataBenchError(f"--workers: each worker count must be at least 1, got {list(workers)}")
    if clips < 2:
        raise DataBenchError(f"--clips: need at least 2 clips, got {clips}")
    if rounds < 1:
        raise DataBenchError(f"--rounds: need at least 1 round, got {rounds}")
    if split == "val" and not d.val_list:
        raise DataBenchError("the recipe has no data.val_list to benchmark")
    if d.decoder in GPU_ONLY:
        raise DataBenchError(f"data.decoder: {d.decoder} decodes on the GPU only, and bench data measures the CPU "
                             f"loader: add --set data.decoder=torchcodec (tsmtrain doctor measures NVDEC clips/s)")
    train = split == "train"
    records = read_list(d.train_list if train else d.val_list, d.root, recipe.model.num_classes,
                        multi_label=recipe.model.loss == "sigmoid")
    dataset = clip_dataset(recipe, records, train=train)
    keys = _keys(len(records), clips, recipe.train.seed)
    report = on_result or (lambda stage, values: None)

    # Rounds: the raw decoder, then the loader at each worker count, over the same clips, again
    # and again; each figure is the median over the rounds, so that a change in the machine's
    # load during the benchmark touches all of them alike.
    threads = torch.get_num_threads()
    good, failed, seek_modes = list(keys), [], {}
    raw_rates, raw_seconds, loader_rates, loaders = [], [], {w: [] for w in workers}, {}
    opened = {w: {} for w in workers}  # per worker count: {worker id: [files opened, files read, clips]}

    def note(w: int, batch: dict) -> None:
        count = opened[w].setdefault(batch["worker"], [0, set(), 0])
        count[0] += len(batch["opened"])
        count[1].update(batch["opened"])
        count[2] += len(batch["label"])

    batch = max(1, min(recipe.train.batch_size, len(keys) // 2))
    try:
        for r in range(rounds):
            # ---- raw decoder, one core, in this process
            torch.set_num_threads(1)
            if r == 0:
                try:  # warm-up, not counted: the first open loads the decoder's libraries (seconds)
                    dataset.open(records[keys[0][0]].path).frames([0])
                except VideoDecodeError:
                    pass
            seconds, decoded = 0.0, []
            for index, epoch in good:
                path = records[index].path
                rng = np.random.default_rng((recipe.train.seed, epoch, index)) if train else None
                t0 = time.perf_counter()
                try:
                    video = dataset.open(path)
                    video.frames(segment_indices(video.num_frames, d.num_segments, train, rng).tolist())
                except VideoDecodeError as exc:
                    failed.append(str(exc))
                    continue
                seconds += time.perf_counter() - t0
                decoded.append((index, epoch))
                if r == 0:
                    mode = ("decord" if d.decoder == "decord"
                            else choose_seek_mode(d.seek_mode, path in dataset.prepared))
                    seek_modes[mode] = seek_modes.get(mode, 0) + 1
            torch.set_num_threads(threads)
            if r == 0:
                good = decoded
                if len(good) < 2:
                    raise DataBenchError(f"{d.train_list if train else d.val_list}: fewer than 2 of {len(keys)} "
                                         f"clips could be decoded; first failure: {failed[0] if failed else 'none'}")
                batch = max(1, min(recipe.train.batch_size, len(good) // 2))
            raw_rates.append(len(decoded) / seconds)
            raw_seconds.append(seconds)
            # ---- the loader at each worker count, over the clips that decoded
            for w in workers:
                if w not in loaders:  # warm-up pass: starts the workers, loads the libraries
                    sampler = _SwappableSampler(good[: w * batch])
                    loaders[w] = (build_loader(dataset, sampler, batch, w, drop_last=False, persistent=True), sampler)
                    for b in loaders[w][0]:
                        note(w, b)
                    sampler[:] = good  # the measured passes, with the same (persistent) workers
                count, t0 = 0, time.perf_counter()
                for b in loaders[w][0]:
                    count += len(b["label"])
                    note(w, b)
                loader_rates[w].append(count / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
        loaders.clear()  # ends the worker processes
    raw = statistics.median(raw_rates)
    result = DataBench(recipe=recipe_path, videos=len(records), clips=len(good), frames_per_clip=d.num_segments,
                       frame_size=list(d.frame_size) if d.frame_size else None, decoder=d.decoder,
                       seek_modes=seek_modes, raw_clips_per_s=raw, raw_seconds=statistics.median(raw_seconds),
                       rounds=rounds, raw_rounds=raw_rates, target_clips_per_s=target, failed=sorted(set(failed)),
                       layout="files" if dataset.store is None else "shards")
    report("raw", {"clips_per_s": raw, "clips": len(good), "failed": len(set(failed))})
    for w in workers:
        rate = statistics.median(loader_rates[w])
        per_worker = list(opened[w].values())
        row = {"workers": w, "clips": len(good), "clips_per_s": rate, "clips_per_s_per_worker": rate / w,
               "ratio_to_raw": rate / w / raw, "rounds": loader_rates[w],
               "files_opened_per_worker": statistics.mean(c[0] for c in per_worker),
               "distinct_files_per_worker": statistics.mean(len(c[1]) for c in per_worker),
               "clips_per_worker": statistics.mean(c[2] for c in per_worker)}
        result.loader.append(row)
        report("loader", row)

    # ---- augmentation on the training device
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.train.device != "cpu" else "cpu")
    frames = torch.stack([dataset[k]["frames"] for k in good[:batch]]).to(device)
    transform = VideoTransform(train=train, input_size=d.input_size, scales=tuple(d.scales), flip=d.flip,
                               mean=d.mean, std=d.std, generator=torch.Generator().manual_seed(0)).to(device)
    transform(frames)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        transform(frames)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result.augment_clips_per_s = len(frames) / statistics.median(times)
    result.augment_device = str(device)
    report("augment", {"device": str(device), "clips_per_s": result.augment_clips_per_s})
    return result


def load_data_bench(path: str | Path) -> dict:
    """Read a ``tsmtrain bench data --json`` record.

    Returns:
        The record; ``record["clips_per_s_per_core"]`` is a positive number.

    Raises:
        DataBenchError: the file cannot be read, is not JSON, or lacks a positive
            ``clips_per_s_per_core`` (the message names the file).
    """
    try:
        record = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataBenchError(f"{path}: cannot read the data benchmark: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataBenchError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    rate = record.get(CLIPS_PER_S_PER_CORE) if isinstance(record, dict) else None
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
        raise DataBenchError(f"{path}: no positive {CLIPS_PER_S_PER_CORE!r}: not a record of tsmtrain bench data")
    return record
