"""A scaling model: predict step time and efficiency at any worker count from one sweep.

Inputs are what a scaling sweep measured (:mod:`tsmtrain.scaling.sweep`: compute time per step,
the exposed allreduce wait, a standalone allreduce, the gradient size) and a network description
(:class:`NetworkSpec`, read from YAML by :func:`load_network`). The model, point by point:

* allreduce time ``A(N)``: the ring algorithm's alpha-beta cost (Patarasuk & Yuan 2009, the
  algorithm Horovod uses: Sergeev & Del Balso 2018), flat or hierarchical (within a node, then
  across nodes), see :func:`ring_allreduce_seconds` and :func:`hierarchical_allreduce_seconds`;
* exposed allreduce: the part not hidden behind backward, from the overlap the sweep measured,
  see :func:`exposed_allreduce_seconds`;
* step time = compute (linear in clips per rank) + data wait (as measured) + exposed allreduce;
* clips/s = ranks x clips per rank / step time, capped by an optional data-loading ceiling per
  node and by optional file-system limits (opens/s, GB/s); efficiency = clips/s per rank over
  the model's own 1-worker clips/s (no communication);
* file-system load, given how the data lies (:class:`DataSpec`: one file per video, or indexed
  tar shards): file opens/s (the metadata servers' load) and read GB/s at the predicted clips/s,
  see :func:`filesystem_load`.

Units: seconds, bytes, bytes/s, clips/s, opens/s; the network file gives bandwidth in GB/s (1e9
bytes) and latency in microseconds. Not modelled: stragglers and jitter, evaluation, start-up,
checkpoints, epoch boundaries, contention with other jobs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tsmtrain.recipe import closest, line_index, yaml_load
from ..errors import UserError

__all__ = [
    "LinkSpec",
    "FileSystemSpec",
    "NetworkSpec",
    "NetworkError",
    "load_network",
    "ring_allreduce_seconds",
    "bus_bandwidth",
    "hierarchical_allreduce_seconds",
    "allreduce_seconds",
    "exposed_allreduce_seconds",
    "DataSpec",
    "LAYOUTS",
    "DEFAULT_SHARD_BYTES",
    "KINETICS400_TRAIN_VIDEOS",
    "PREPARED_VIDEO_BYTES",
    "file_opens_per_s",
    "shard_count",
    "expected_distinct_shards",
    "shard_opens_in_epoch",
    "opens_per_clip",
    "read_gb_per_s",
    "epoch_seconds",
    "FileSystemLoad",
    "filesystem_load",
    "ScalingBasis",
    "basis_from_sweep",
    "Prediction",
    "predict",
    "BACKWARD_SHARE",
    "NETWORK_BOUND_SHARE",
]

BACKWARD_SHARE = 2.0 / 3.0
"""Share of forward+backward time spent in backward (assumption: backward costs about twice the
forward). The gradient allreduce can hide only behind backward."""

NETWORK_BOUND_SHARE = 0.10
"""A predicted point is ``limited_by="network"`` when its exposed allreduce exceeds this share of
its step time."""


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """Bus bandwidth of an allreduce, as nccl-tests defines it (NVIDIA nccl-tests,
    doc/PERFORMANCE.md): ``algbw x 2(n-1)/n`` for ``n`` ranks, ``algbw`` = bytes / seconds; the
    rate each rank's link carries in a ring-allreduce, comparable with a link's bandwidth whatever
    the rank count; same unit as ``algbw``, 0 for one rank (nothing is sent)."""
    return algbw * 2 * (ranks - 1) / ranks


# --------------------------------------------------------------------------- network description


class LinkSpec(BaseModel):
    """One kind of link: bandwidth and per-message latency.

    ``bandwidth_gb_per_s`` is in gigabytes (1e9 bytes) per second; for ``inter_node`` it is the
    node's injection bandwidth (all its network rails together), not one rank's share. Use
    achieved figures where you have them (a measured allreduce or point-to-point bandwidth);
    nominal link rates make the prediction optimistic. ``latency_us`` is microseconds per
    message hop (one ring step).
    """

    model_config = ConfigDict(extra="forbid")

    bandwidth_gb_per_s: float = Field(gt=0, allow_inf_nan=False, description="GB/s (1e9 bytes/s), per node for inter_node")
    latency_us: float = Field(ge=0, allow_inf_nan=False, description="microseconds per message hop")

    @property
    def bandwidth(self) -> float:
        """Bandwidth in bytes/s."""
        return self.bandwidth_gb_per_s * 1e9

    @property
    def latency(self) -> float:
        """Latency in seconds."""
        return self.latency_us * 1e-6


class FileSystemSpec(BaseModel):
    """What the shared file system the training data lies on can give one job (the ``filesystem``
    section of a network file); either limit may be left out, not both.

    ``opens_per_s`` is file opens per second: on a parallel file system (Lustre, GPFS) every
    open is a request to the few metadata servers that every job shares, so use the rate your
    centre says a job may use, or a measured one, rather than the servers' peak. ``bandwidth_gb_per_s``
    is the read bandwidth in gigabytes (1e9 bytes) per second the job can get (aggregate over
    all its nodes). The model caps clips/s so that the job's demand (:func:`filesystem_load`)
    stays within both.
    """

    model_config = ConfigDict(extra="forbid")

    opens_per_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="file opens per second")
    bandwidth_gb_per_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="GB/s (1e9 bytes/s) of reads")

    @model_validator(mode="after")
    def _some_limit(self) -> "FileSystemSpec":
        if self.opens_per_s is None and self.bandwidth_gb_per_s is None:
            raise ValueError("set opens_per_s, bandwidth_gb_per_s or both (or leave the section out)")
        return self


class NetworkSpec(BaseModel):
    """A cluster's network as the model sees it: ranks per node, the link inside a node and the
    link between nodes, the allreduce algorithm, an optional data-loading ceiling per node
    (clips/s a node can decode and augment) and optional file-system limits
    (:class:`FileSystemSpec`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    ranks_per_node: int = Field(ge=1)
    intra_node: LinkSpec
    inter_node: LinkSpec
    algorithm: Literal["ring", "hierarchical"] = "hierarchical"
    data_clips_per_s_per_node: float | None = Field(None, gt=0, allow_inf_nan=False)
    cores_per_node: int | None = Field(None, ge=1)
    filesystem: FileSystemSpec | None = None
    description: str = ""

    def with_data_ceiling(self, clips_per_s_per_core: float) -> "NetworkSpec":
        """A copy whose data ceiling comes from a measured loader rate (``tsmtrain bench data``).

        ``data_clips_per_s_per_node = clips_per_s_per_core * (cores_per_node - ranks_per_node)``:
        every core but one per rank (the training process's own) runs a loader worker.

        Raises:
            NetworkError: the file sets no ``cores_per_node``, or no core is left for loading.
        """
        if self.cores_per_node is None:
            raise NetworkError(f"network {self.name!r}: cores_per_node is not set, so a measured rate per core "
                               f"cannot become a data ceiling per node")
        workers = self.cores_per_node - self.ranks_per_node
        if workers < 1:
            raise NetworkError(f"network {self.name!r}: cores_per_node ({self.cores_per_node}) leaves no core for "
                               f"loader workers beside {self.ranks_per_node} ranks")
        return self.model_copy(update={"data_clips_per_s_per_node": clips_per_s_per_core * workers})


class NetworkError(UserError):
    """A network file that cannot be used. The message names the file, the key and (where known)
    the line, one problem per line."""


def _network_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = NetworkSpec
    for part in loc:
        field_info = model.model_fields.get(str(part))
        annotation = None if field_info is None else field_info.annotation
        models = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:  # a section is a model, or an optional one (``FileSystemSpec | None``)
            return []
        model = models[0]
    return list(model.model_fields)


def load_network(path: str | os.PathLike) -> NetworkSpec:
    """Read and validate a network description (YAML, keys as in :class:`NetworkSpec`).

    Raises:
        NetworkError: the file cannot be read, is not valid YAML, is not a mapping, or has an
            unknown key, a missing key, a value of the wrong type or out of range (e.g. a
            bandwidth that is not positive). Each problem is one line
            ``FILE:LINE: KEY = VALUE: why``.
    """
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NetworkError(f"{file}: cannot read network file: {exc.strerror or exc}") from None
    try:
        doc = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NetworkError(f"{where}: not valid YAML: {reason}") from None
    if not isinstance(doc, dict):
        raise NetworkError(f"{file}: a network file is a mapping of keys (name, ranks_per_node, intra_node, inter_node, ...)")
    lines = line_index(text)
    try:
        return NetworkSpec.model_validate(doc)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(str(p) for p in e["loc"])
            key = ".".join(loc)
            line = lines.get(key)
            if e["type"] == "extra_forbidden":
                why = "unknown key"
                close = closest(loc[-1], _network_keys(loc[:-1]))
                if close:
                    why += f" (did you mean {close!r}?)"
            elif e["type"] == "missing":
                why = "required key is missing"
                line = lines.get(".".join(loc[:-1])) if len(loc) > 1 else None
            else:
                why = e["msg"]
            value = "" if e["type"] == "missing" or isinstance(e.get("input"), dict) else f" = {e.get('input')!r}"
            problems.append(f"{file}:{line}: {key}{value}: {why}" if line else f"{file}: {key}{value}: {why}")
        raise NetworkError("\n".join(problems)) from None


# --------------------------------------------------------------------------- allreduce cost


def ring_allreduce_seconds(workers: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` bytes among ``workers`` ranks.

    ``2(N-1)/N * nbytes / bandwidth + 2(N-1) * latency``: a reduce-scatter then an allgather,
    each ``N-1`` steps that move ``nbytes/N`` bytes over every ring edge (Patarasuk & Yuan 2009,
    "Bandwidth optimal all-reduce algorithms for clusters of workstations"; the algorithm of
    Horovod, Sergeev & Del Balso 2018). ``bandwidth`` is the bytes/s of the ring's slowest
    edge, ``latency`` the seconds per step. One worker costs 0.

    Raises:
        ValueError: ``workers < 1``, ``nbytes < 0``, ``bandwidth <= 0`` or ``latency < 0``.
    """
    if workers < 1 or nbytes < 0 or bandwidth <= 0 or latency < 0:
        raise ValueError(f"ring allreduce needs workers >= 1, nbytes >= 0, bandwidth > 0, latency >= 0 "
                         f"(got {workers}, {nbytes}, {bandwidth}, {latency})")
    n = workers
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def hierarchical_allreduce_seconds(workers: int, nbytes: float, ranks_per_node: int,
                                   intra: LinkSpec, inter: LinkSpec) -> float:
    """Seconds for a two-level allreduce of ``nbytes`` bytes among ``workers`` ranks.

    Within each node the ``g = ranks_per_node`` ranks reduce-scatter and later allgather over
    the intra-node links, ``2(g-1)/g * B / bw_intra + 2(g-1) * lat_intra``; in between, each
    local rank allreduces its ``B/g`` shard with its peers on the other ``M = ceil(N/g)`` nodes.
    The ``g`` rings share the node's injection bandwidth, so together they cost
    ``2(M-1)/M * B / bw_inter + 2(M-1) * lat_inter`` (Horovod's hierarchical allreduce;
    the ring cost of :func:`ring_allreduce_seconds` at each level). With ``N <= g`` only the
    intra-node part runs, among the ``N`` ranks. Assumes every node holds ``g`` ranks (a
    last, partly filled node is costed as full).

    Raises:
        ValueError: as :func:`ring_allreduce_seconds`, or ``ranks_per_node < 1``.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1 (got {ranks_per_node})")
    if workers <= ranks_per_node:
        return ring_allreduce_seconds(workers, nbytes, intra.bandwidth, intra.latency)
    nodes = math.ceil(workers / ranks_per_node)
    return (ring_allreduce_seconds(ranks_per_node, nbytes, intra.bandwidth, intra.latency)
            + ring_allreduce_seconds(nodes, nbytes, inter.bandwidth, inter.latency))


def allreduce_seconds(workers: int, nbytes: float, network: NetworkSpec) -> float:
    """Seconds for one allreduce of ``nbytes`` bytes among ``workers`` ranks on ``network``.

    ``hierarchical``: :func:`hierarchical_allreduce_seconds`. ``ring``: one flat ring over all
    ranks, nodes one after the other, so one ring edge per node crosses the network and the
    ring runs at its slowest edge: bandwidth ``min(intra, inter)`` and the larger latency
    (normally the inter-node one) once the ranks span several nodes; intra-node figures within
    one node.

    Raises:
        ValueError: as :func:`ring_allreduce_seconds`.
    """
    g = network.ranks_per_node
    if network.algorithm == "hierarchical":
        return hierarchical_allreduce_seconds(workers, nbytes, g, network.intra_node, network.inter_node)
    intra, inter = network.intra_node, network.inter_node
    if workers <= g:
        return ring_allreduce_seconds(workers, nbytes, intra.bandwidth, intra.latency)
    return ring_allreduce_seconds(workers, nbytes, min(intra.bandwidth, inter.bandwidth),
                                  max(intra.latency, inter.latency))


def exposed_allreduce_seconds(allreduce_s: float, overlap_fraction: float, forward_backward_s: float) -> float:
    """Seconds of an allreduce that the step waits for after backward.

    ``max((1 - overlap) * A, A - BACKWARD_SHARE * forward_backward_s, 0)``: the measured
    fraction ``overlap`` is hidden, but never more than the backward pass lasts (the allreduce
    starts as gradients become ready during backward; backward is taken as
    :data:`BACKWARD_SHARE` of forward+backward, an assumption).
    """
    return max((1.0 - overlap_fraction) * allreduce_s, allreduce_s - BACKWARD_SHARE * forward_backward_s, 0.0)


# --------------------------------------------------------------------------- file system


LAYOUTS = ("files", "shards")
"""How the training data can lie on the file system: ``files``, one file per video (``tsmtrain
prepare``); ``shards``, indexed tar shards (``tsmtrain prepare --shards``)."""

DEFAULT_SHARD_BYTES = 1 << 30
"""Bytes per shard by default: 1 GiB, the default ``--shard-size`` of ``tsmtrain prepare --shards``."""

KINETICS400_TRAIN_VIDEOS = 246_245
"""Videos in the Kinetics-400 training split (Kay et al. 2017: 306,245 clips, less 20,000 for
validation and 40,000 for test)."""

PREPARED_VIDEO_BYTES = 640_000
"""Mean bytes of one Kinetics video after ``tsmtrain prepare`` (H.264, short side 256, a keyframe
every 16 frames, ``-tune fastdecode``), an assumption: a 10-second clip (Kinetics clips last
about 10 s, Kay et al. 2017) at 64.0 kB/s, the rate of this project's 15 real clips of
``../shared/clips`` prepared by ``tsmtrain prepare configs/shared_clips.yaml`` (9,505,996 bytes
for 148.5 s of video: ``bytes_out`` over ``seconds`` of its ``manifest.jsonl``). Kinetics'
YouTube footage is not these clips; the frame tables (``.frames.json``) add about 2%. This is
GOP 16, ``prepare``'s default until December 2026 and the basis of docs/scaling.md's worked
example; at today's default GOP 4 the same clips take 1.60x the bytes (15,250,005), about
1,030,000 bytes per video: give that as ``--video-bytes`` for data prepared with GOP 4."""


@dataclass(frozen=True)
class DataSpec:
    """How a run's training data lies on the file system, as the model sees it. The defaults are
    Kinetics-400 prepared as ``configs/tsm_r50_kinetics400.yaml`` reads it.

    Attributes:
        videos: videos per epoch (the training list); every epoch reads one clip of each.
        epochs: epochs of the run (the recipe's ``schedule.epochs``).
        video_bytes: mean bytes read per clip: the whole video file (``files``) or the whole
            sample, video and frame table (``shards``). Default :data:`PREPARED_VIDEO_BYTES`.
        layout: one of :data:`LAYOUTS`, the one the file-system limits of :func:`predict` apply to.
        shard_bytes: bytes per shard (``shards``; default 1 GiB, :data:`DEFAULT_SHARD_BYTES`).
        sidecar_reads: files opened beside each video per clip, 0 or 1 (``files``): 1 where the
            loader reads the video's ``.frames.json`` frame table (``data.seek_mode: exact``),
            0 otherwise (``auto`` seeks prepared videos approximately). In a shard the frame
            table is part of the sample and costs no open.
        workers_per_rank: DataLoader worker processes per rank (``data.workers``; count loading
            in the training process, ``data.workers: 0``, as 1).

    Raises:
        ValueError: a count below 1, bytes not positive, an unknown layout, ``sidecar_reads``
            not 0 or 1.
    """

    videos: int = KINETICS400_TRAIN_VIDEOS
    epochs: int = 50
    video_bytes: float = PREPARED_VIDEO_BYTES
    layout: Literal["files", "shards"] = "files"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    sidecar_reads: int = 0
    workers_per_rank: int = 6

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {self.layout!r})")
        if self.sidecar_reads not in (0, 1):
            raise ValueError(f"sidecar_reads must be 0 or 1 (got {self.sidecar_reads!r})")
        for name in ("videos", "epochs", "workers_per_rank"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1 (got {getattr(self, name)!r})")
        if not (self.video_bytes > 0 and math.isfinite(self.video_bytes)) or not self.shard_bytes > 0:
            raise ValueError(f"video_bytes and shard_bytes must be positive bytes "
                             f"(got {self.video_bytes!r}, {self.shard_bytes!r})")

    @property
    def shards(self) -> int:
        """Shards the videos fill: :func:`shard_count`."""
        return shard_count(self.videos, self.video_bytes, self.shard_bytes)


def file_opens_per_s(clips_per_s: float, sidecar_reads: int = 0) -> float:
    """File opens per second of per-file data: ``clips/s x (1 + sidecar_reads)``.

    Every clip opens its video (one clip per video per epoch), and ``sidecar_reads`` (0 or 1)
    more files beside it (the ``.frames.json`` frame table in exact seek mode), every epoch:
    the loader keeps no file open from one clip to the next.
    """
    return clips_per_s * (1 + sidecar_reads)


def shard_count(videos: int, video_bytes: float, shard_bytes: float) -> int:
    """Shards ``S = ceil(videos x video_bytes / shard_bytes)``: the videos packed into shards of
    about ``shard_bytes`` bytes (a shard holds whole samples, so real shards fall a little short
    of the size and there may be one more). At least 1."""
    return max(1, math.ceil(videos * video_bytes / shard_bytes))


def expected_distinct_shards(shards: int, draws: float) -> float:
    """Distinct shards, in expectation, among ``draws`` samples drawn at random from ``shards``
    equally likely shards: ``S (1 - (1 - 1/S)^k)`` (each shard is missed by all ``k`` draws with
    probability ``(1 - 1/S)^k``). Near ``k`` while ``k << S``, near ``S`` once ``k >> S``.

    The formula is exact for independent draws. A loader worker's draws in an epoch are without
    replacement (the epoch is a permutation of the videos, a shard holds ``videos / S`` of them),
    which changes little while a worker draws a small part of the videos;
    ``tests/test_scaling.py`` checks the formula against simulations of both.
    """
    if shards < 1 or draws < 0:
        raise ValueError(f"need shards >= 1 and draws >= 0 (got {shards}, {draws})")
    return shards * (1.0 - (1.0 - 1.0 / shards) ** draws)


def shard_opens_in_epoch(epoch: int, shards: int, loader_workers: int, clips_per_worker: float) -> float:
    """Shard opens during epoch ``epoch`` (1, 2, ...) of a run, all ranks together.

    ``N W S [(1 - 1/S)^(k(e-1)) - (1 - 1/S)^(ke)]`` with ``N W = loader_workers`` (ranks x
    workers per rank) and ``k = clips_per_worker`` (``videos / (N W)`` per epoch): a worker
    opens a shard the first time it draws a sample from it and keeps it open for the rest of
    the run (persistent workers; tsmtrain's shard reader), so the opens of epoch ``e`` are the
    distinct shards (:func:`expected_distinct_shards`) it has touched after ``e`` epochs less
    those after ``e - 1``. The samples come in the same global random order as per-file data
    (bitwise-identical batches), so each draw falls on any shard alike. The sum over ``E``
    epochs is ``N W S (1 - (1 - 1/S)^(kE))``, at most ``N W S``.

    Assumes every worker keeps all ``S`` shards open: tsmtrain's reader closes the least recently
    read beyond 1,024 per process, and more shards than that would be opened again.
    """
    if epoch < 1 or loader_workers < 1 or clips_per_worker < 0:
        raise ValueError(f"need epoch >= 1, loader_workers >= 1, clips_per_worker >= 0 "
                         f"(got {epoch}, {loader_workers}, {clips_per_worker})")
    missed = 1.0 - 1.0 / shards
    return loader_workers * shards * (missed ** (clips_per_worker * (epoch - 1)) - missed ** (clips_per_worker * epoch))


def opens_per_clip(data: DataSpec, ranks: int) -> float:
    """File opens per clip read at the rate the file system must serve: what a limit on opens/s
    (:class:`FileSystemSpec`) caps.

    * ``files``: ``1 + sidecar_reads``, the same in every epoch (:func:`file_opens_per_s`);
    * ``shards``: the first epoch's shard opens (:func:`shard_opens_in_epoch`) over its
      ``videos`` clips. The first epoch is the peak (every shard is new to every worker; later
      epochs open only shards a worker has not drawn from yet), and it is what the metadata
      servers must serve at the start of the run, so a limit is checked against it rather than
      the run's mean: a run within the limit in the first epoch is within it in every epoch.
      The model predicts one clips/s for the whole run, so where the limit binds, the cap is
      pessimistic for the later epochs.
    """
    if data.layout == "files":
        return 1.0 + data.sidecar_reads
    loaders = ranks * data.workers_per_rank
    return shard_opens_in_epoch(1, data.shards, loaders, data.videos / loaders) / data.videos


def read_gb_per_s(clips_per_s: float, video_bytes: float) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): ``clips/s x video_bytes / 1e9``, for either layout.

    Whole samples are read from a shard (one ``pread`` of the video and its frame table); per
    file, a decoder that seeks to the sampled frames may read less than the whole file, so for
    ``files`` it is an upper bound.
    """
    return clips_per_s * video_bytes / 1e9


def epoch_seconds(videos: int, clips_per_s: float) -> float:
    """Seconds per epoch: ``videos / clips_per_s`` (one clip per video; the last, partial step is
    not rounded up)."""
    if clips_per_s <= 0:
        raise ValueError(f"clips_per_s must be positive (got {clips_per_s})")
    return videos / clips_per_s


@dataclass
class FileSystemLoad:
    """What a run asks of the file system at one worker count (:func:`filesystem_load`).

    Attributes:
        layout: ``files`` or ``shards``. shards: ``S`` (None for ``files``).
        clips_per_worker: clips per loader worker per epoch, ``videos / (ranks x workers_per_rank)``.
        epoch_s: seconds per epoch; run_s: ``epochs x epoch_s``.
        opens_per_s: file opens per second the file system must serve: every epoch's (``files``),
            the first epoch's, the peak (``shards``); see :func:`opens_per_clip`.
        mean_opens_per_s: total opens over ``run_s``.
        total_opens: file opens of the whole run.
        read_gb_per_s: GB/s (1e9 bytes/s) read, :func:`read_gb_per_s`.
    """

    layout: str
    shards: int | None
    clips_per_worker: float
    epoch_s: float
    run_s: float
    opens_per_s: float
    mean_opens_per_s: float
    total_opens: float
    read_gb_per_s: float


def filesystem_load(data: DataSpec, ranks: int, clips_per_s: float) -> FileSystemLoad:
    """The file-system load of ``ranks`` ranks training on ``data`` at ``clips_per_s`` (all ranks).

    ``files``: :func:`file_opens_per_s` in every epoch, so the mean is the same. ``shards``:
    ``S`` from :func:`shard_count`; the first epoch's opens per :func:`shard_opens_in_epoch`
    over its :func:`epoch_seconds`, and the run's mean, ``N W S (1 - (1 - 1/S)^(k x epochs))``
    over ``epochs x epoch_s``. Read GB/s by :func:`read_gb_per_s`, the same for both.

    Raises:
        ValueError: ``ranks < 1`` or ``clips_per_s <= 0``.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1 (got {ranks})")
    epoch = epoch_seconds(data.videos, clips_per_s)
    run = data.epochs * epoch
    loaders = ranks * data.workers_per_rank
    k = data.videos / loaders
    if data.layout == "files":
        shards = None
        total = data.epochs * data.videos * opens_per_clip(data, ranks)
    else:
        shards = data.shards
        total = loaders * expected_distinct_shards(shards, k * data.epochs)
    return FileSystemLoad(layout=data.layout, shards=shards, clips_per_worker=k, epoch_s=epoch, run_s=run,
                          opens_per_s=clips_per_s * opens_per_clip(data, ranks), mean_opens_per_s=total / run,
                          total_opens=total, read_gb_per_s=read_gb_per_s(clips_per_s, data.video_bytes))


def _filesystem_cap(network: NetworkSpec, data: DataSpec | None, ranks: int) -> float | None:
    """Clips/s the network's file-system limits allow ``ranks`` ranks reading ``data`` (None
    without limits or without ``data``): opens/s limit over :func:`opens_per_clip`, GB/s limit
    over the GB per clip, the smaller."""
    limits = network.filesystem
    if limits is None or data is None:
        return None
    caps = []
    if limits.opens_per_s is not None:
        caps.append(limits.opens_per_s / opens_per_clip(data, ranks))
    if limits.bandwidth_gb_per_s is not None:
        caps.append(limits.bandwidth_gb_per_s / read_gb_per_s(1.0, data.video_bytes))
    return min(caps)


# --------------------------------------------------------------------------- what a sweep measured


@dataclass
class ScalingBasis:
    """What a sweep measured, reduced to the model's inputs.

    Attributes:
        compute_s_per_clip: seconds per clip per rank of augmentation + forward/backward +
            optimizer + other work (everything but the data wait and the allreduce wait);
            compute per step is taken as linear in clips per rank.
        forward_backward_s_per_clip: the forward+backward part of it, seconds per clip (bounds
            how much of the allreduce backward can hide).
        data_s_per_step: seconds per step waiting for the DataLoader, added as measured at
            every worker count.
        overlap_fraction: fraction of the gradient allreduce hidden behind backward, in [0, 1].
        gradient_bytes: bytes sent into one gradient allreduce.
        mode: ``weak`` (clips per rank fixed) or ``strong`` (global batch fixed).
        batch_per_rank: clips per rank per step (weak mode).
        global_batch: clips per step over all ranks (strong mode).
        reference_workers: the sweep point the compute figures come from.
        notes: the assumptions used, in words.
    """

    compute_s_per_clip: float
    forward_backward_s_per_clip: float
    data_s_per_step: float
    overlap_fraction: float
    gradient_bytes: float
    mode: Literal["weak", "strong"] = "weak"
    batch_per_rank: int | None = None
    global_batch: int | None = None
    reference_workers: int = 1
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("weak", "strong"):
            raise ValueError(f"mode must be 'weak' or 'strong' (got {self.mode!r})")
        if self.mode == "weak" and not (self.batch_per_rank and self.batch_per_rank > 0):
            raise ValueError("weak mode needs batch_per_rank > 0")
        if self.mode == "strong" and not (self.global_batch and self.global_batch > 0):
            raise ValueError("strong mode needs global_batch > 0")
        if not 0.0 <= self.overlap_fraction <= 1.0:
            raise ValueError(f"overlap_fraction must lie in [0, 1] (got {self.overlap_fraction})")
        if self.compute_s_per_clip <= 0 or not 0 <= self.forward_backward_s_per_clip <= self.compute_s_per_clip:
            raise ValueError("need compute_s_per_clip > 0 and 0 <= forward_backward_s_per_clip <= compute_s_per_clip")
        if self.data_s_per_step < 0 or self.gradient_bytes < 0:
            raise ValueError("data_s_per_step and gradient_bytes must not be negative")


def _field(record: dict, key: str, where: str) -> Any:
    value = record.get(key)
    if value is None:
        raise ValueError(f"{where}: ok point without {key!r}")
    return value


def basis_from_sweep(meta: dict, records: list[dict], reference_workers: int | None = None) -> ScalingBasis:
    """Reduce a sweep (``sweep.json`` and its point records, as
    :func:`tsmtrain.scaling.report.load_sweep` returns them) to a :class:`ScalingBasis`.

    * reference point: the ok point with ``reference_workers`` workers, by default the one with
      the most (on a real cluster the most representative; where ranks share cores, as on the
      emulated cluster of ``scripts/slurm-local.sh``, a smaller one's compute is each rank's
      own); compute per clip =
      ``(augment + forward_backward + optimizer + other) / batch_per_rank`` seconds from its
      ``breakdown_s``, and its ``data`` wait per step;
    * overlap fraction: ``clip(1 - allreduce_wait / allreduce_s, 0, 1)`` at the ok point with
      the most workers (> 1) that measured a standalone allreduce (``allreduce_s > 0``);
      without one, 0 (every allreduce second exposed: pessimistic), said in ``notes``;
    * gradient bytes from the reference point; batch from ``meta`` (``batch_per_rank`` in weak
      mode, ``global_batch`` in strong mode), else from the reference point.

    Raises:
        ValueError: no ok point, no ok point with ``reference_workers``, an unknown mode, or an ok
            point missing a measured field.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise ValueError("no ok point in the sweep: nothing measured to build the scaling model on")
    mode = meta.get("mode")
    if mode not in ("weak", "strong"):
        raise ValueError(f"sweep mode must be 'weak' or 'strong' (got {mode!r})")
    if reference_workers is None:
        ref = max(ok, key=lambda r: r["workers"])
    else:
        ref = next((r for r in ok if r["workers"] == reference_workers), None)
        if ref is None:
            raise ValueError(f"--basis {reference_workers}: the sweep has no ok point with {reference_workers} "
                             f"workers (ok: {', '.join(str(r['workers']) for r in ok)})")
    where = f"point workers-{ref['workers']:04d}"
    bd = _field(ref, "breakdown_s", where)
    bpr = _field(ref, "batch_per_rank", where)
    try:
        work = bd["augment"] + bd["forward_backward"] + bd["optimizer"] + bd["other"]
        fb, data = bd["forward_backward"], bd["data"]
    except KeyError as exc:
        raise ValueError(f"{where}: breakdown_s without {exc.args[0]!r}") from None
    notes = [f"compute per clip from the {ref['workers']}-worker point, taken as linear in clips per rank",
             f"data wait {data:.4g} s per step as measured at {ref['workers']} workers, at every worker count"]

    measured = [r for r in ok if r["workers"] > 1 and (r.get("allreduce_s") or 0) > 0]
    if measured:
        m = max(measured, key=lambda r: r["workers"])
        wait = _field(m, "breakdown_s", f"point workers-{m['workers']:04d}").get("allreduce_wait", 0.0)
        overlap = min(1.0, max(0.0, 1.0 - wait / m["allreduce_s"]))
        notes.append(f"overlap fraction {overlap:.2f} from the {m['workers']}-worker point "
                     f"(wait {wait:.4g} s of a {m['allreduce_s']:.4g} s standalone allreduce)")
    else:
        overlap = 0.0
        notes.append("no multi-worker point with a measured allreduce: overlap fraction 0 "
                     "(pessimistic: every allreduce second is exposed)")
    if mode == "strong":
        notes.append("strong mode: clips per rank = global batch / workers, fractional where it does not divide")
    return ScalingBasis(
        compute_s_per_clip=work / bpr,
        forward_backward_s_per_clip=fb / bpr,
        data_s_per_step=data,
        overlap_fraction=overlap,
        gradient_bytes=float(_field(ref, "gradient_bytes", where)),
        mode=mode,
        batch_per_rank=(meta.get("batch_per_rank") or bpr) if mode == "weak" else None,
        global_batch=(meta.get("global_batch") or _field(ref, "global_batch", where)) if mode == "strong" else None,
        reference_workers=ref["workers"],
        notes=notes,
    )


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """The model's prediction at one worker count.

    Attributes:
        workers: ranks. nodes: ``ceil(workers / ranks_per_node)``.
        global_batch: clips per step over all ranks. batch_per_rank: clips per rank per step
            (fractional in strong mode where the global batch does not divide).
        step_time_s: seconds per optimizer step (compute + data + allreduce_exposed).
        clips_per_s: all ranks together. clips_per_s_per_rank: ``clips_per_s / workers``.
        efficiency: clips/s per rank over the model's 1-worker clips/s at the same clips per rank.
        breakdown_s: ``{"compute", "data", "allreduce_exposed"}`` seconds per step; ``data``
            includes any wait the data-loading ceiling or the file-system limits add.
        allreduce_s: seconds of one whole (not overlapped) gradient allreduce.
        limited_by: ``filesystem`` (the network file's file-system limits bind), ``data`` (the
            per-node data ceiling binds), ``network`` (the exposed allreduce is more than
            :data:`NETWORK_BOUND_SHARE` of the step) or ``compute``.
        filesystem: the file-system load at ``clips_per_s`` (:func:`filesystem_load`); None
            when :func:`predict` was given no :class:`DataSpec`.
    """

    workers: int
    nodes: int
    global_batch: int
    batch_per_rank: float
    step_time_s: float
    clips_per_s: float
    clips_per_s_per_rank: float
    efficiency: float
    breakdown_s: dict
    allreduce_s: float
    limited_by: Literal["compute", "network", "data", "filesystem"]
    filesystem: FileSystemLoad | None = None


def predict(basis: ScalingBasis, network: NetworkSpec, workers: list[int],
            data: DataSpec | None = None) -> list[Prediction]:
    """Predict step time, clips/s and efficiency at each worker count in ``workers``.

    Per point: clips per rank ``b`` (fixed in weak mode, ``global_batch / N`` in strong mode);
    compute ``b * compute_s_per_clip``; data wait as measured; allreduce ``A(N)`` from
    :func:`allreduce_seconds` and its exposed part from :func:`exposed_allreduce_seconds`;
    clips/s ``= N * b / step``, capped at ``nodes * data_clips_per_s_per_node`` when the
    network file sets a ceiling, and, with ``data``, at what the network file's
    ``filesystem`` limits allow (opens/s over :func:`opens_per_clip`, GB/s over the GB per
    clip). A cap makes the step last ``N * b / cap``, the extra counted as data wait.
    Efficiency divides clips/s per rank by the 1-worker clips/s ``b / (compute + data)`` (no
    communication, under the same caps for one node, one rank), so a 1-worker prediction has
    efficiency 1. With ``data`` every point carries its :func:`filesystem_load` for
    ``data.layout``; without it the file system is not modelled.

    Raises:
        ValueError: a worker count below 1.
    """
    out = []
    ceiling = network.data_clips_per_s_per_node
    for n in workers:
        if int(n) != n or n < 1:
            raise ValueError(f"worker counts must be whole numbers >= 1 (got {n})")
        n = int(n)
        nodes = math.ceil(n / network.ranks_per_node)
        b = float(basis.batch_per_rank) if basis.mode == "weak" else basis.global_batch / n
        compute = b * basis.compute_s_per_clip
        wait = basis.data_s_per_step
        full = allreduce_seconds(n, basis.gradient_bytes, network)
        exposed = exposed_allreduce_seconds(full, basis.overlap_fraction, b * basis.forward_backward_s_per_clip)
        step = compute + wait + exposed
        clips = n * b / step
        limited_by = "network" if exposed > NETWORK_BOUND_SHARE * step else "compute"
        caps = {"data": None if ceiling is None else nodes * ceiling, "filesystem": _filesystem_cap(network, data, n)}
        for name, cap in caps.items():
            if cap is not None and clips > cap:
                clips, limited_by = cap, name
        if limited_by in caps:
            step = n * b / clips
            wait = step - compute - exposed
        single = min(c for c in (b / (compute + basis.data_s_per_step), ceiling, _filesystem_cap(network, data, 1))
                     if c is not None)
        out.append(Prediction(
            workers=n, nodes=nodes, global_batch=round(n * b), batch_per_rank=b, step_time_s=step,
            clips_per_s=clips, clips_per_s_per_rank=clips / n, efficiency=clips / n / single,
            breakdown_s={"compute": compute, "data": wait, "allreduce_exposed": exposed},
            allreduce_s=full, limited_by=limited_by,
            filesystem=None if data is None else filesystem_load(data, n, clips),
        ))
    return out
