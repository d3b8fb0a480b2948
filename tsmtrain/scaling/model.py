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
  node; efficiency = clips/s per rank over the model's own 1-worker clips/s (no communication).

Units: seconds, bytes, bytes/s, clips/s; the network file gives bandwidth in GB/s (1e9 bytes)
and latency in microseconds. Not modelled: stragglers and jitter, evaluation, start-up,
checkpoints, epoch boundaries, contention with other jobs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsmtrain.recipe import closest, line_index, yaml_load

__all__ = [
    "LinkSpec",
    "NetworkSpec",
    "NetworkError",
    "load_network",
    "ring_allreduce_seconds",
    "hierarchical_allreduce_seconds",
    "allreduce_seconds",
    "exposed_allreduce_seconds",
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


class NetworkSpec(BaseModel):
    """A cluster's network as the model sees it: ranks per node, the link inside a node and the
    link between nodes, the allreduce algorithm, and an optional data-loading ceiling per node
    (clips/s a node can decode and augment)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    ranks_per_node: int = Field(ge=1)
    intra_node: LinkSpec
    inter_node: LinkSpec
    algorithm: Literal["ring", "hierarchical"] = "hierarchical"
    data_clips_per_s_per_node: float | None = Field(None, gt=0, allow_inf_nan=False)
    cores_per_node: int | None = Field(None, ge=1)
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


class NetworkError(ValueError):
    """A network file that cannot be used. The message names the file, the key and (where known)
    the line, one problem per line."""


def _network_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = NetworkSpec
    for part in loc:
        field_info = model.model_fields.get(str(part))
        if field_info is None or not (isinstance(field_info.annotation, type) and issubclass(field_info.annotation, BaseModel)):
            return []
        model = field_info.annotation
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


def basis_from_sweep(meta: dict, records: list[dict]) -> ScalingBasis:
    """Reduce a sweep (``sweep.json`` and its point records, as
    :func:`tsmtrain.scaling.report.load_sweep` returns them) to a :class:`ScalingBasis`.

    * reference point: the ok point with the most workers; compute per clip =
      ``(augment + forward_backward + optimizer + other) / batch_per_rank`` seconds from its
      ``breakdown_s``, and its ``data`` wait per step;
    * overlap fraction: ``clip(1 - allreduce_wait / allreduce_s, 0, 1)`` at the ok point with
      the most workers (> 1) that measured a standalone allreduce (``allreduce_s > 0``);
      without one, 0 (every allreduce second exposed: pessimistic), said in ``notes``;
    * gradient bytes from the reference point; batch from ``meta`` (``batch_per_rank`` in weak
      mode, ``global_batch`` in strong mode), else from the reference point.

    Raises:
        ValueError: no ok point, an unknown mode, or an ok point missing a measured field.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise ValueError("no ok point in the sweep: nothing measured to build the scaling model on")
    mode = meta.get("mode")
    if mode not in ("weak", "strong"):
        raise ValueError(f"sweep mode must be 'weak' or 'strong' (got {mode!r})")
    ref = max(ok, key=lambda r: r["workers"])
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
            includes any wait the data-loading ceiling adds.
        allreduce_s: seconds of one whole (not overlapped) gradient allreduce.
        limited_by: ``data`` (the per-node data ceiling binds), ``network`` (the exposed
            allreduce is more than :data:`NETWORK_BOUND_SHARE` of the step) or ``compute``.
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
    limited_by: Literal["compute", "network", "data"]


def predict(basis: ScalingBasis, network: NetworkSpec, workers: list[int]) -> list[Prediction]:
    """Predict step time, clips/s and efficiency at each worker count in ``workers``.

    Per point: clips per rank ``b`` (fixed in weak mode, ``global_batch / N`` in strong mode);
    compute ``b * compute_s_per_clip``; data wait as measured; allreduce ``A(N)`` from
    :func:`allreduce_seconds` and its exposed part from :func:`exposed_allreduce_seconds`;
    clips/s ``= N * b / step``, capped at ``nodes * data_clips_per_s_per_node`` when the
    network file sets a ceiling (the step then lasts ``N * b / ceiling``, the extra counted as
    data wait). Efficiency divides clips/s per rank by the 1-worker clips/s
    ``b / (compute + data)`` (no communication, capped by one node's ceiling), so a
    1-worker prediction has efficiency 1.

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
        data = basis.data_s_per_step
        full = allreduce_seconds(n, basis.gradient_bytes, network)
        exposed = exposed_allreduce_seconds(full, basis.overlap_fraction, b * basis.forward_backward_s_per_clip)
        step = compute + data + exposed
        clips = n * b / step
        limited_by = "network" if exposed > NETWORK_BOUND_SHARE * step else "compute"
        if ceiling is not None and clips > nodes * ceiling:
            clips = nodes * ceiling
            step = n * b / clips
            data = step - compute - exposed
            limited_by = "data"
        single = b / (compute + basis.data_s_per_step)
        if ceiling is not None:
            single = min(single, ceiling)
        out.append(Prediction(
            workers=n, nodes=nodes, global_batch=round(n * b), batch_per_rank=b, step_time_s=step,
            clips_per_s=clips, clips_per_s_per_rank=clips / n, efficiency=clips / n / single,
            breakdown_s={"compute": compute, "data": data, "allreduce_exposed": exposed},
            allreduce_s=full, limited_by=limited_by,
        ))
    return out
