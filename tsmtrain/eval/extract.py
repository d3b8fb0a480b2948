"""``tsmtrain extract``: one feature vector per video, for training the classifier alone.

For every video of the recipe's training and validation lists: its views under a test
protocol (``--clips`` x ``--crops``, :class:`~tsmtrain.eval.protocols.Protocol`), the trained
network's features of each view (:meth:`~tsmtrain.models.networks.VideoNet.features`: the
backbone's pooled output averaged over the segments; evaluation mode, so no dropout), averaged
over the views: ``(D,)``, stored float16 by default in shards with an index
(:mod:`tsmtrain.data.readers.features`). The seed's "full-batch fine-tuning" of the classifier (Hwang et
al., KDD 2019) then trains the head on them (``data.features: DIR``) at batches a backbone
would not allow.

Ranks: shard s of a list is rank ``s mod world size``'s, so the ranks write different files
and never the same one. Resumable: a shard file is written under a temporary name and renamed,
so one that exists is complete; a rerun keeps every complete shard and extracts only the
others. A rerun with other settings (another checkpoint, protocol, dtype, shard size, list or
view settings: ``source.json``, :func:`~tsmtrain.data.readers.features.check_source`) is refused before
any work, on every rank alike, rather than mixing two extractions' shards. Rank 0 writes each
list's ``index.json`` last, once every rank has finished, after checking that every video of the
list is in exactly one shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import RankSampler, VideoRecord, build_loader, collate_views, multi_clip_dataset, read_list
from ..data.readers.features import check_source, file_digest, list_digest, feature_file_path, source_digest
from .feature_files import feature_file_is_complete, write_index, write_feature_file, write_source
from ..data.loader import decoding_target
from ..data.modality import modality_of
from ..data.transforms import TestViews
from ..dist.base import Engine
from ..io import read_json
from ..recipe import Recipe
from ..errors import TrainingError
from ..train.setup import choose_device, choose_engine, log, set_threads
from ..train.step import as_memory_format, autocast
from .protocols import Protocol, _console_logging, load_model

__all__ = ["extract_features", "ExtractReport", "SHARD_VIDEOS", "DTYPES"]

SHARD_VIDEOS = 1024
"""Videos per shard file (``--shard-videos``)."""

DTYPES = ("float16", "float32")


@dataclass
class ExtractReport:
    """What :func:`extract_features` did on this rank.

    Attributes:
        rank: this rank.
        out_dir: the features folder.
        splits: per list (``train``, ``val``): ``videos``, ``shards``, ``extracted`` (shards this
            rank wrote now), ``kept`` (complete shards found and kept), ``unreadable`` (rank 0,
            from the index), ``dim``.
        seconds: wall time of the extraction on this rank.
    """

    rank: int
    out_dir: Path
    splits: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def extract_features(recipe: Recipe, out_dir: str | Path, protocol: Protocol = Protocol(),
                     checkpoint: str | Path | None = None, engine: Engine | None = None,
                     shard_videos: int = SHARD_VIDEOS, dtype: str = "float16") -> ExtractReport:
    """Extract the features of the recipe's lists into ``out_dir/train`` and ``out_dir/val``, on
    every rank (see the module docstring).

    Args:
        recipe: the trained run's recipe (its checkpoint, lists, data settings).
        out_dir: the features folder (created).
        protocol: the views averaged per video.
        checkpoint: the checkpoint; ``None``: the run directory's latest.
        engine: the engine; ``None``: the recipe's.
        shard_videos: videos per shard.
        dtype: ``float16`` (half the bytes; plenty for a classifier's input) or ``float32``.

    Returns:
        An :class:`ExtractReport`.

    Raises:
        TrainingError: no checkpoint or one of another model (:func:`~tsmtrain.eval.protocols.load_model`),
            an unknown dtype, ``shard_videos < 1``.
        tsmtrain.data.ListFileError: a malformed list file.
        tsmtrain.data.DataError: ``out_dir`` holds features of other settings, or the shards do not
            cover the list exactly once (:func:`~tsmtrain.eval.feature_files.write_index`).
    """
    if dtype not in DTYPES:
        raise TrainingError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if shard_videos < 1:
        raise TrainingError(f"--shard-videos {shard_videos}: must be at least 1")
    t0 = time.perf_counter()
    engine = engine or choose_engine(recipe)
    _console_logging(engine.rank)
    set_threads(recipe.train.threads, engine.local_size)
    device = choose_device(recipe.train.device, engine.local_rank)
    model, path = load_model(recipe, checkpoint, device)
    weights = file_digest(path)
    report = ExtractReport(engine.rank, Path(out_dir))
    d = recipe.data
    for split, list_file in (("train", d.train_list), ("val", d.val_list)):
        if list_file is None:
            continue
        records = read_list(list_file, d.root, recipe.model.num_classes, multi_label=recipe.model.loss == "sigmoid")
        split_dir = Path(out_dir) / split
        source = _source(recipe, list_file, len(records), model.feature_dim, dtype, weights, protocol, shard_videos)
        check_source(split_dir, source)  # every rank reads the same file: all refuse alike, before any collective
        engine.barrier()
        if engine.rank == 0:
            write_source(split_dir, source)
        engine.barrier()
        report.splits[split] = _extract_list(model, records, recipe, protocol, engine, device, split_dir,
                                             shard_videos, dtype, source_digest(source))
        engine.barrier()  # every rank's feature files are on disk
        if engine.rank == 0:
            doc = write_index(split_dir, {**_index_doc(recipe, list_file, len(records), model.feature_dim, dtype, path,
                                                       protocol, shard_videos),
                                          "checkpoint_sha256": weights, "source": source_digest(source)},
                              shards=report.splits[split]["shards"])
            report.splits[split]["unreadable"] = len(read_json(doc, "features index")["unreadable"])
            log.info("%s: %d videos, %d shards, index %s", split, len(records), report.splits[split]["shards"], doc)
        engine.barrier()
    report.seconds = time.perf_counter() - t0
    return report


def _index_doc(recipe: Recipe, list_file: str, videos: int, dim: int, dtype: str, checkpoint: Path,
               protocol: Protocol, shard_videos: int) -> dict:
    """What ``index.json`` says of the features besides the shards (:func:`~tsmtrain.eval.feature_files.write_index`)."""
    return {"list": str(list_file), "list_sha256": list_digest(list_file), "videos": videos, "dim": dim,
            "dtype": dtype, "num_classes": recipe.model.num_classes, "multi_label": recipe.model.loss == "sigmoid",
            "shard_videos": shard_videos, "checkpoint": str(checkpoint),
            "protocol": {"clips": protocol.clips, "crops": protocol.crops},
            "model": recipe.model.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json")}


VIEW_FIELDS = ("root", "num_segments", "input_size", "short_side", "frame_size", "modality", "flow_length",
               "flow_method", "flow_preset", "flow_bound", "mean", "std")
"""The ``data`` fields that change a video's views, hence its features."""


def _source(recipe: Recipe, list_file: str, videos: int, dim: int, dtype: str, weights: str, protocol: Protocol,
            shard_videos: int) -> dict:
    """What makes a split's features (``source.json``): equal records, equal shards."""
    data = recipe.data.model_dump(mode="json")
    return {"checkpoint_sha256": weights, "protocol": [protocol.clips, protocol.crops], "dtype": dtype,
            "shard_videos": shard_videos, "list_sha256": list_digest(list_file), "videos": videos, "dim": dim,
            "num_classes": recipe.model.num_classes, "multi_label": recipe.model.loss == "sigmoid",
            "precision": recipe.train.precision, "data": {k: data[k] for k in VIEW_FIELDS}}


def _extract_list(model, records: list[VideoRecord], recipe: Recipe, protocol: Protocol, engine: Engine,
                  device: torch.device, split_dir: Path, shard_videos: int, dtype: str, source: str) -> dict:
    """This rank's feature files of one list: kept when complete, else extracted and written."""
    shards = (len(records) + shard_videos - 1) // shard_videos
    extracted = kept = 0
    for s in range(engine.rank, shards, engine.size):
        lines = list(range(s * shard_videos, min((s + 1) * shard_videos, len(records))))
        path = feature_file_path(split_dir, s)
        if feature_file_is_complete(path, lines, model.feature_dim, source):
            kept += 1
            continue
        features, index, failed = _features_of(model, [records[i] for i in lines], recipe, protocol, device)
        write_feature_file(path, features.astype(dtype), [lines[i] for i in index],
                    [records[lines[i]].labels for i in index], [(lines[i], e) for i, e in failed], source=source)
        extracted += 1
        log.info("%s: shard %d of %d written (%d videos%s)", split_dir.name, s + 1, shards, len(lines),
                 f", {len(failed)} unreadable" if failed else "")
    return {"videos": len(records), "shards": shards, "extracted": extracted, "kept": kept, "dim": model.feature_dim}


@torch.no_grad()
def _features_of(model, records: list[VideoRecord], recipe: Recipe, protocol: Protocol,
                 device: torch.device) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Features ``(n, D)`` float32 of the readable ones of ``records`` (every view's
    :meth:`features`, averaged), their positions in ``records``, and ``(position, error)`` of the
    unreadable ones (each also logged with its path)."""
    d = recipe.data
    decoder, where = decoding_target(d.decoder, d.decode_device, torch.device(device))
    dataset = multi_clip_dataset(recipe, records, protocol.clips, decode_device=where, decoder=decoder)
    sampler = RankSampler(len(dataset), 0, 1, shuffle=False, pad=False)
    n = max(1, recipe.train.batch_size // protocol.views)
    loader = build_loader(dataset, sampler, n, d.workers, drop_last=False, collate=collate_views)
    views = TestViews(d.input_size, protocol.crops, modality=modality_of(d)).to(device)
    model.eval()
    parts, index, failed = [], [], []
    for batch in loader:
        for i, _, error in batch["failed"]:
            log.warning("unreadable video, no features: %s", error)
            failed.append((i, str(error)))
        if batch["frames"] is None:
            continue
        x = views(batch["frames"].to(device))  # (N, V, T, C, S, S)
        with autocast(recipe.train.precision, device):
            f = model.features(as_memory_format(x.flatten(0, 1), recipe.train.channels_last))  # (N*V, D)
        parts.append(f.float().view(*x.shape[:2], -1).mean(dim=1).cpu().numpy())
        index += batch["index"].tolist()
    dim = model.feature_dim
    return (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)), index, failed
