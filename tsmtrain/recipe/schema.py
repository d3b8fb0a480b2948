"""Recipes: one YAML file that says everything about a training run.

A recipe has eight sections (``data``, ``model``, ``optim``, ``schedule``, ``dist``, ``train``,
``run``, ``cluster``), each a pydantic model below. Every field has a type, a default where one makes sense
and a one-line description (``tsmtrain validate`` prints them resolved). Unknown keys are errors,
so a misspelt key never silently falls back to a default.

Loading goes through :func:`load_recipe`, which collects *every* problem (unknown key, wrong
type, missing file, impossible combination) before raising one :class:`RecipeError`; each
problem names the file, the key path, the line in the YAML file where it can be found, and the
offending value. The CLI prints them one per line and exits with status 2.

The YAML itself is read strictly: UTF-8 text only, each key once per mapping (a second
``model:`` section is an error, not a silent replacement), and anchors/aliases within a small
bound (an alias bomb is refused before it is expanded); no float is infinite or NaN, and no
boolean stands for a number.
"""

from __future__ import annotations

import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Recipe",
    "RecipeError",
    "Problem",
    "load_recipe",
    "apply_overrides",
    "derived_values",
    "with_absolute_paths",
    "dump_recipe",
    "time_limit_seconds",
    "read_class_names",
    "ClassNamesError",
]


def _takes_number(annotation: Any) -> bool:
    """Whether a field of this type takes an int or a float (alone, or in a union with None)."""
    if typing.get_origin(annotation) is Annotated:
        return _takes_number(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_number(a) for a in typing.get_args(annotation))
    return annotation in (int, float)


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field of this type takes a list or tuple of ints or floats."""
    if typing.get_origin(annotation) is Annotated:
        return _takes_numbers(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_numbers(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, tuple) and any(
        _takes_number(a) for a in typing.get_args(annotation) if a is not Ellipsis)


class _Section(BaseModel):
    # allow_inf_nan=False: no .inf or .nan in any float field (nested in tuples and lists too)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info) -> Any:
        """pydantic reads ``true`` as 1 in an int or float field; a recipe that says ``epochs: true``
        means something else, so a boolean is refused wherever a number (or numbers) go."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _takes_number(annotation):
            raise ValueError("a boolean is not a number")
        if (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)
                and _takes_numbers(annotation)):
            raise ValueError("a boolean is not a number")
        return value


_Positive = Annotated[float, Field(gt=0)]
_Pixels = Annotated[int, Field(ge=1)]


class DataConfig(_Section):
    """Where the videos are and how clips are sampled and augmented."""

    root: str = Field(".", description="folder that the paths in the list files are relative to")
    train_list: str = Field(..., description="training list file: one `relative/path.ext label` per line")
    val_list: str | None = Field(None, description="validation list file (same format); none: no evaluation")
    classes: str | None = Field(
        None, description="label map: one class name per line, line i naming label i-1 (as mmaction2's "
                          "label_map_k400.txt); as many as model.num_classes; none: classes shown by index")
    generate: Literal["demo", "study", "arrow_of_time"] | None = Field(
        None, description="build this dataset into `root` on first use: demo or study (rendered; study: the harder "
                          "one of the large-batch study) or arrow_of_time (from `source`)"
    )
    source: str = Field("../shared/clips", description="folder of the real clips that generate: arrow_of_time cuts")
    decoder: Literal["torchcodec", "decord"] = Field(
        "torchcodec", description="video decoding library: torchcodec (maintained, system FFmpeg), or decord (last "
                                  "release 2022)")
    seek_mode: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="torchcodec frame seeking: auto (approximate for videos tsmtrain prepare wrote, exact "
                            "for others), exact (scan each file at open), approximate (trust the header)")
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="cpu: decode in the loader workers; cuda: torchcodec decodes with NVDEC into the rank's "
                           "GPU, in the training process (falls back to cpu with a warning)")
    num_segments: int = Field(8, ge=1, description="T: segments per clip, one frame sampled from each (TSN)")
    frame_size: tuple[_Pixels, _Pixels] | None = Field(
        None, description="[H, W] the decoder resizes every frame to, so clips of any size batch together"
    )
    short_side: int | None = Field(
        None, ge=8, description="short side in pixels the decoder resizes each video to when data.frame_size is not "
                                "set (videos of any size and aspect ratio then batch together after a crop to "
                                "short_side x short_side); none: input_size * 256 / 224 (TSM, mmaction2)")
    input_size: int = Field(224, ge=8, description="side in pixels of the square crop fed to the network")
    scales: list[float] = Field(
        [1.0, 0.875, 0.75, 0.66], description="multi-scale crop: crop sides as fractions of the shorter side"
    )
    flip: bool = Field(True, description="random horizontal flip in training (turn off when left/right matters)")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="per-channel normalisation mean (RGB, 0..1)")
    std: tuple[_Positive, _Positive, _Positive] = Field(
        (0.229, 0.224, 0.225), description="per-channel normalisation std (RGB, 0..1; each > 0)")
    workers: int = Field(2, ge=0, description="data-loading worker processes per rank")
    max_retries: int = Field(10, ge=0, description="unreadable videos replaced in a row before the run stops")


NARROWEST_SHIFTED_LAYER = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 24}
"""Input channels of the narrowest layer that the temporal shift wraps, per backbone (ResNets:
the first block's ``conv1``; MobileNetV2: the first residual block's expansion). A ``shift_div``
above it shifts no channel there (``C // shift_div == 0``). Kept here, not computed from the
network, so that checking a recipe needs no torch; tests/test_model.py checks it against the
networks."""


class ModelConfig(_Section):
    """The network: a 2D backbone run on every frame, with or without temporal shift."""

    arch: Literal["resnet18", "resnet50", "mobilenet_v2"] = Field("resnet50", description="torchvision 2D backbone")
    num_classes: int = Field(400, ge=2, description="number of action classes")
    shift: bool = Field(True, description="residual temporal shift (TSM); false gives the TSN baseline")
    shift_div: int = Field(8, ge=2, description="1/shift_div of the channels shift each way in time; at most the "
                                                "narrowest shifted layer's width (64 in the ResNets, 24 in MobileNetV2)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout before the new classifier")
    pretrained: str | None = Field(None, description="local torchvision state_dict (.pth) to start from; never downloaded")
    sync_bn: bool = Field(
        False, description="synchronized BatchNorm: normalize with the statistics of the global batch, not each "
                           "rank's (advised below 8 clips per GPU)")


class OptimConfig(_Section):
    """Optimizer and the linear scaling rule (Goyal et al. 2017)."""

    name: Literal["sgd", "lars"] = Field("sgd", description="SGD with momentum, or LARS (You et al. 2017)")
    base_lr: float = Field(0.01, gt=0, description="learning rate for a global batch of base_batch clips")
    base_batch: int = Field(64, ge=1, description="global batch at which base_lr applies (linear scaling rule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay (not applied to biases and norm layers)")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only)")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient eta")
    lars_eps: float = Field(1e-9, ge=0, description="LARS: added to the trust-ratio denominator")


class ScheduleConfig(_Section):
    """Learning-rate schedule: linear warmup per iteration, then decay."""

    epochs: int = Field(50, ge=1, description="training epochs")
    warmup_epochs: float = Field(0.0, ge=0, description="gradual linear warmup length in epochs (Goyal et al. 2017)")
    warmup_start_lr: float | None = Field(
        None, ge=0, description="learning rate at step 0 of warmup; none: base_lr or the scaled rate if lower"
    )
    decay: Literal["cosine", "step", "none"] = Field("cosine", description="decay after warmup")
    milestones: list[int] = Field([], description="step decay: epochs at which the rate is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="step decay factor")


class DistConfig(_Section):
    """Data parallelism: Horovod ring-allreduce, or torch.distributed's DistributedDataParallel."""

    engine: Literal["horovod", "ddp", "none"] = Field(
        "horovod", description="horovod, ddp (torch.distributed DistributedDataParallel: NCCL on GPUs, Gloo on "
                               "CPUs), or none for a single process")
    np: int = Field(1, ge=1, description="ranks to start on this host when not already under srun/mpirun")
    launcher: Literal["gloo", "mpi", "torchrun"] | None = Field(
        None, description="how --np starts ranks on this host: gloo (horovodrun --gloo) or mpi (mpirun) for horovod, "
                          "torchrun for ddp; none: the engine's own (gloo, torchrun)")
    fp16_allreduce: bool = Field(False, description="compress gradients to fp16 for the allreduce")
    backward_passes_per_step: int = Field(1, ge=1, description="gradient accumulation: backward passes per optimizer step")
    master_addr: str | None = Field(
        None, description="ddp under srun/mpirun: host where rank 0 listens; none: MASTER_ADDR, else the first host "
                          "of the Slurm allocation")
    master_port: int | None = Field(
        None, ge=1024, le=65535, description="ddp under srun/mpirun: port where rank 0 listens; none: MASTER_PORT, "
                                             "else 20000 + Slurm job id % 12000")

    @field_validator("master_addr")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:%-]+", v):
            raise ValueError("not a host name or IP address")
        return v


class TrainConfig(_Section):
    """The training loop."""

    batch_size: int = Field(8, ge=1, description="clips per rank per backward pass")
    eval_every: int = Field(1, ge=1, description="evaluate every this many epochs (and after the last)")
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics.jsonl records")
    breakdown: bool = Field(
        True, description="time each step's phases (data wait, augmentation, forward+backward, allreduce wait, "
                          "optimizer) into metrics.jsonl; on a GPU with CUDA events read once per logging interval, "
                          "so steps do not wait for the device"
    )
    tensorboard: bool = Field(
        True, description="rank 0 also writes metrics.jsonl's numbers (loss, lr, clips/s, data wait, step "
                          "breakdown, validation) as TensorBoard scalars into the run directory's tensorboard/"
    )
    allreduce_benchmark: int = Field(
        0, ge=0, description="after the last step, time this many standalone allreduces of all gradients "
                             "(benchmark runs of tsmtrain sweep; 0: none)"
    )
    checkpoint_every: int = Field(1, ge=1, description="write a checkpoint every this many epochs (and after the last)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run directory")
    stop_after_steps: int | None = Field(
        None, ge=1, description="stop with a checkpoint after this many optimizer steps (schedule unchanged)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (sampling, augmentation, initialisation)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the rank's GPU when there is one")
    threads: int | None = Field(None, ge=1, description="CPU threads per rank; none: cores / ranks on the host")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="forward and loss under autocast in this dtype (fp32: none); fp16 with a gradient "
                            "scaler, for GPUs; bf16 also on CPUs"
    )
    channels_last: bool = Field(False, description="model and input in channels_last (NHWC) memory format")
    compile: bool = Field(
        False, description="torch.compile the model for training (evaluation runs it uncompiled); a compiler "
                           "failure stops the run before its first step"
    )


class RunConfig(_Section):
    """Where the run's files go."""

    name: str = Field("run", min_length=1, description="run name: the run directory is dir/name (letters, digits, "
                                                        "'.', '_' and '-')")
    dir: str = Field("runs", description="folder holding run directories")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if v in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError("not a plain name (letters, digits, '.', '_', '-'; not '.' or '..'): the run directory "
                             "is run.dir/run.name, and a '/' or '..' would put it somewhere else")
        return v


_TIME_LIMIT = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def time_limit_seconds(limit: str) -> float:
    """Seconds in a Slurm time limit already matched by the schema (``MM``, ``MM:SS``,
    ``HH:MM:SS``, ``D-HH[:MM[:SS]]``; ``UNLIMITED``/``INFINITE`` give infinity)."""
    if limit in ("UNLIMITED", "INFINITE"):
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        h, m, sec = parts + [0] * (3 - len(parts))
    else:  # minutes | minutes:seconds | hours:minutes:seconds
        h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _one_line(value: str | None, what: str) -> str | None:
    if value is not None and ("\n" in value or "\r" in value or "\0" in value):
        raise ValueError(f"{what} must be one line (a line break would end the #SBATCH line)")
    return value


class ClusterConfig(_Section):
    """The Slurm job that ``tsmtrain render`` / ``tsmtrain submit`` write (ignored by ``tsmtrain run``)."""

    nodes: int = Field(1, ge=1, description="nodes (sbatch --nodes)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (sbatch --gpus-per-node); 0: a CPU-only job")
    tasks_per_node: int | None = Field(
        None, ge=1, description="ranks per node (sbatch --ntasks-per-node); none: gpus_per_node, one rank per GPU (1 without GPUs)"
    )
    cpus_per_task: int | None = Field(None, ge=1, description="CPU cores per rank (sbatch --cpus-per-task); none: Slurm's default")
    mem: str | None = Field(None, description="memory per node, e.g. 64G (sbatch --mem; 0: all of it); none: Slurm's default")
    time: str = Field("01:00:00", description="time limit: minutes, [days-]hours:minutes:seconds, ... (sbatch --time)")
    partition: str | None = Field(None, description="partition (sbatch --partition)")
    account: str | None = Field(None, description="account charged (sbatch --account)")
    qos: str | None = Field(None, description="quality of service (sbatch --qos)")
    constraint: str | None = Field(None, description="node features (sbatch --constraint), e.g. volta")
    reservation: str | None = Field(None, description="reservation (sbatch --reservation)")
    job_name: str | None = Field(None, description="job name (sbatch --job-name); none: run.name")
    sbatch: list[str] = Field([], description="extra #SBATCH options, one per item, e.g. --exclusive")
    setup: list[str] = Field(
        [], description="shell lines run before the launch, verbatim (module load ..., source venv/bin/activate)"
    )
    env: dict[str, str] = Field({}, description="environment variables exported for every rank (NCCL_*, HOROVOD_*)")
    launcher: Literal["srun", "mpirun"] = Field("srun", description="srun (ranks through PMIx), or mpirun inside the allocation")
    mpi: str = Field("pmix", description="srun --mpi plugin")
    python: str | None = Field(
        None, description="Python interpreter on the compute nodes that has tsmtrain (a wrapper script must "
                    "exec it: Slurm sends USR2 to every process of the step); none: the one running tsmtrain submit"
    )
    signal_seconds: int = Field(120, ge=1, description="USR2 this many seconds before the time limit: checkpoint and requeue")
    max_requeues: int = Field(3, ge=0, description="times the job requeues itself after a checkpoint on USR2")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not _TIME_LIMIT.match(v.strip()):
            raise ValueError("not a Slurm time limit: use minutes, minutes:seconds, hours:minutes:seconds, "
                             "days-hours, days-hours:minutes or days-hours:minutes:seconds")
        return v.strip() if isinstance(v, str) else v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not _MEMORY.match(v):
            raise ValueError("not a Slurm memory size: a whole number with an optional unit K, M, G or T (e.g. 64G)")
        return v

    @field_validator("partition", "account", "qos", "constraint", "reservation", "job_name", "python", "mpi")
    @classmethod
    def _single_line(cls, v: str | None, info) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return _one_line(v, info.field_name)

    @field_validator("sbatch")
    @classmethod
    def _sbatch_lines(cls, v: list[str]) -> list[str]:
        for line in v:
            _one_line(line, "each extra #SBATCH option")
            if not line.startswith("-"):
                raise ValueError(f"{_shown(line)}: an #SBATCH option starts with - (e.g. --exclusive)")
        return v

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, v: list[str]) -> list[str]:
        for line in v:
            _one_line(line, "each set-up line")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{_shown(name)} is not an environment variable name")
        return v

    def ranks_per_node(self) -> int:
        """Ranks on each node: ``tasks_per_node``, else one per GPU, else 1."""
        return self.tasks_per_node or self.gpus_per_node or 1


class Recipe(_Section):
    """A whole recipe. Build it with :func:`load_recipe` (which also checks files)."""

    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    dist: DistConfig = DistConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        problems: list[tuple[str, Any, str]] = []
        s = self.schedule
        if s.warmup_epochs > s.epochs:
            problems.append(("schedule.warmup_epochs", s.warmup_epochs, f"longer than schedule.epochs ({s.epochs})"))
        if s.decay == "step" and not s.milestones:
            problems.append(("schedule.milestones", s.milestones, "step decay needs at least one milestone"))
        if s.milestones and (sorted(s.milestones) != s.milestones or not all(0 < m < s.epochs for m in s.milestones)):
            problems.append(("schedule.milestones", s.milestones, f"must increase and lie in 1..{s.epochs - 1}"))
        if self.model.shift and self.data.num_segments < 2:
            problems.append(("model.shift", True, "temporal shift needs data.num_segments >= 2"))
        rendered = {"demo": 6, "study": 12}.get(self.data.generate or "")
        k = self.model.num_classes
        if rendered and (k % 2 or k > rendered):
            problems.append(("model.num_classes", k, f"data.generate: {self.data.generate} renders an even number "
                                                     f"of classes, 2..{rendered}"))
        narrowest = NARROWEST_SHIFTED_LAYER[self.model.arch]
        if self.model.shift and self.model.shift_div > narrowest:
            problems.append(("model.shift_div", self.model.shift_div,
                             f"leaves no channel to shift in {self.model.arch}'s narrowest shifted layer "
                             f"({narrowest} channels // {self.model.shift_div} = 0): that layer would train as TSN; "
                             f"use at most {narrowest}"))
        if self.dist.engine == "none" and self.dist.np > 1:
            problems.append(("dist.np", self.dist.np, "several ranks need dist.engine: horovod or ddp"))
        launchers = {"horovod": ("gloo", "mpi"), "ddp": ("torchrun",), "none": ("gloo", "mpi", "torchrun")}
        if self.dist.launcher is not None and self.dist.launcher not in launchers[self.dist.engine]:
            problems.append(("dist.launcher", self.dist.launcher,
                             f"dist.engine: {self.dist.engine} starts its ranks with "
                             f"{' or '.join(launchers[self.dist.engine])}"))
        if self.dist.engine == "none" and self.dist.fp16_allreduce:
            problems.append(("dist.fp16_allreduce", True, "there is no allreduce with dist.engine: none"))
        d = self.data
        if d.frame_size is not None and min(d.frame_size) < d.input_size:
            problems.append(("data.frame_size", list(d.frame_size),
                             f"smaller than data.input_size ({d.input_size}): the {d.input_size}x{d.input_size} "
                             "crop would not fit in the frame"))
        if d.short_side is not None and d.short_side < d.input_size:
            problems.append(("data.short_side", d.short_side,
                             f"smaller than data.input_size ({d.input_size}): the {d.input_size}x{d.input_size} "
                             "crop would not fit in the frame"))
        if any(not 0 < x <= 1 for x in self.data.scales) or not self.data.scales:
            problems.append(("data.scales", self.data.scales, "each scale must lie in (0, 1]"))
        if self.data.decode_device == "cuda" and self.data.decoder != "torchcodec":
            problems.append(("data.decode_device", "cuda", "GPU decoding needs data.decoder: torchcodec"))
        if self.data.decode_device == "cuda" and self.train.device == "cpu":
            problems.append(("data.decode_device", "cuda", "train.device is cpu: frames decoded on a GPU would be "
                                                           "copied back"))
        if self.optim.nesterov and self.optim.name != "sgd":
            problems.append(("optim.nesterov", True, "nesterov applies to optim.name: sgd only"))
        c = self.cluster
        if c.gpus_per_node and c.tasks_per_node and c.tasks_per_node > c.gpus_per_node:
            problems.append(("cluster.tasks_per_node", c.tasks_per_node,
                             f"more ranks than GPUs per node ({c.gpus_per_node}); each rank drives one GPU"))
        ranks = c.nodes * c.ranks_per_node()
        if ranks > 1 and self.dist.engine == "none":
            problems.append(("dist.engine", "none", f"the cluster section asks for {ranks} ranks; use dist.engine: "
                                                   "horovod or ddp"))
        if c.gpus_per_node and self.train.device == "cpu":
            problems.append(("cluster.gpus_per_node", c.gpus_per_node, "train.device is cpu: the GPUs would sit idle"))
        if c.signal_seconds >= time_limit_seconds(c.time):
            problems.append(("cluster.signal_seconds", c.signal_seconds, f"not shorter than the time limit {c.time!r}"))
        if problems:
            raise ValueError("\n".join(f"{k}\x1f{v!r}\x1f{why}" for k, v, why in problems))
        return self


# --------------------------------------------------------------------------- class names


class ClassNamesError(ValueError):
    """A label map (``data.classes``) cannot be read, is malformed, or does not match
    ``model.num_classes``; the message names the file (and line)."""


def read_class_names(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Read a label map: one class name per line, line ``i`` (1-based) naming label ``i - 1``, as
    mmaction2's ``tools/data/kinetics/label_map_k400.txt``. Surrounding spaces are stripped;
    blank lines at the end are ignored.

    Args:
        path: the file.
        num_classes: when given, the number of names it must hold (``model.num_classes``).

    Returns:
        The class names, in label order.

    Raises:
        ClassNamesError: the file cannot be read or is not UTF-8 text (the message names the
            byte, its offset and line); a blank line or a repeated name before the
            end (``FILE:LINE``); no name at all; or its length differs from ``num_classes``
            (the message names both numbers and the file).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClassNamesError(f"{path}: cannot read label map: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClassNamesError(f"{path}: {_not_utf8(data, exc)}") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name:
            raise ClassNamesError(f"{path}:{number}: blank line inside the label map (line i names label i-1)")
        if name in seen:
            raise ClassNamesError(f"{path}:{number}: class name {_shown(name)} repeats line {seen[name]}")
        seen[name] = number
    if not names:
        raise ClassNamesError(f"{path}: label map names no class")
    if num_classes is not None and len(names) != num_classes:
        raise ClassNamesError(f"{path} names {len(names)} classes but model.num_classes is {num_classes}")
    return names


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Why ``data`` is not UTF-8 text, in one line: the byte, its offset and its line."""
    line = data.count(b"\n", 0, exc.start) + 1
    return f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"


# --------------------------------------------------------------------------- errors


_SHOWN = 100
"""Characters of a value that a :class:`Problem` shows at most."""

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * _SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 20


def _shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`_SHOWN` characters (``...`` at the end when cut), so that
    no message about a huge value is huge itself."""
    try:
        text = _REPR.repr(value)
    except Exception:  # an int too long for str(), a failing __repr__: say what it is
        text = f"<{type(value).__name__}>"
    return _cut(text)


def _cut(text: str, limit: int = _SHOWN) -> str:
    """``text`` cut to ``limit`` characters, ``...`` at the end when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where it is and why. ``str()`` gives
    ``FILE:LINE: KEY = VALUE: why`` (no ``:LINE`` without a line, no ``KEY`` for a problem with
    the file as a whole, no ``= VALUE`` without a value; a long value is cut to 100 characters)."""

    file: str
    key: str
    value: Any
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        value = "" if self.value is _MISSING else f" = {_shown(self.value)}"
        what = f"{self.key}{value}: " if self.key else ""
        return f"{where}: {what}{self.message}"


_MISSING = object()


class RecipeError(Exception):
    """Raised by :func:`load_recipe` with every :class:`Problem` found; ``str()`` gives one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- loading


_MAX_ALIASES = 100
"""Aliases (``*name``) one YAML document may use: a recipe needs a handful."""
_MAX_DEPTH = 50
"""Levels of nesting, aliases expanded: a recipe has three or four."""
_MAX_NODES = 10_000
"""Nodes (mappings, sequences, scalars) of one YAML document once its aliases are expanded. An
alias bomb (each level naming the previous one many times) stays a few lines of text but
expands exponentially; it is measured on the composed node graph, in time linear in the text,
and refused before anything is expanded."""
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that tsmtrain refuses to read: too many aliases, nesting too deep,
    a recursive alias, more than :data:`_MAX_NODES` nodes once expanded, or a duplicate key.
    ``why`` says which, ``key`` is the dotted key path where there is one, ``line`` is 1-based."""

    def __init__(self, why: str, mark: yaml.Mark, key: str = ""):
        super().__init__(problem=f"{key}: {why}" if key else why, problem_mark=mark)
        self.why, self.key, self.line = why, key, mark.line + 1


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without base-60 numbers: YAML 1.1 reads ``time: 1:30:00`` as the
    integer 5400, which would turn a Slurm time limit into seconds. Here it stays a string.

    While composing, it refuses (:class:`_Refused`) more than :data:`_MAX_ALIASES` aliases and
    nesting deeper than :data:`_MAX_DEPTH`; a value that cannot be built (a timestamp with
    month 13, an integer of 5,000 digits) is a ``ConstructorError`` naming its line, not a
    ``ValueError``. Use it through :func:`_compose` and :func:`_construct`."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > _MAX_ALIASES:
                raise _Refused(f"more than {_MAX_ALIASES} aliases (*name); refused, as an alias bomb would exhaust "
                               "memory (a recipe needs a handful)",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)
        if self._depth >= _MAX_DEPTH:
            raise _Refused(f"nested more than {_MAX_DEPTH} levels deep (a recipe needs three or four)",
                           self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(value)} as {node.tag.rsplit(':', 1)[-1]}: {_cut(str(exc))}",
                node.start_mark) from None


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _compose(text: str) -> yaml.Node | None:
    """The node graph of the one YAML document in ``text`` (None when it is empty), aliases
    still shared, checked by :func:`_check_expansion`.

    Raises:
        yaml.YAMLError: not valid YAML, or (:class:`_Refused`) too many aliases, too deep, or
            too large once expanded.
    """
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        _check_expansion(root)
    return root


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that aliases would expand to more than :data:`_MAX_NODES` nodes or
    :data:`_MAX_DEPTH` levels, or that contains itself. Each distinct node's expanded size is
    computed once (memoised, iteratively), so a bomb is measured in time linear in its text.

    Raises:
        _Refused: naming the line of the first (innermost) node over a bound.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose children are being measured: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, measured = stack.pop()
        kids = _children(node)
        if measured:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            depth[id(node)] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[id(node)] > _MAX_NODES:
                raise _Refused(f"aliases (*name) expand this to more than {_MAX_NODES:,} values (an alias bomb?); "
                               "refused before expanding, as expanding would exhaust memory",
                               node.start_mark)
            if depth[id(node)] > _MAX_DEPTH:
                raise _Refused(f"aliases (*name) nest this more than {_MAX_DEPTH} levels deep (a recipe needs "
                               "three or four)", node.start_mark)
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            raise _Refused("an alias (*name) inside the node it names: a recursive structure",
                           node.start_mark)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def _scan(root: yaml.Node) -> tuple[dict[str, int], list[tuple[str, yaml.Node, int]]]:
    """Walk a graph that :func:`_compose` checked (so at most :data:`_MAX_NODES` nodes expanded).

    Returns:
        The 1-based line of every dotted key path (merged keys, ``<<: *base``, at the line
        where the base names them, unless the mapping names them itself), and every duplicate
        key as ``(key path, key node, line of its first occurrence)``, each mapping checked once.
    """
    index: dict[str, int] = {}
    duplicates: list[tuple[str, yaml.Node, int]] = []
    checked: set[int] = set()
    keys = _RecipeLoader("")

    def identity(key: yaml.Node) -> Any:
        """What the key becomes in the dict (``1`` and ``0x1`` collide; ``1`` and ``'1'`` do not)."""
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
            try:
                value = keys.construct_object(key)
                hash(value)
                return ("value", value)
            except Exception:
                return ("text", key.tag, key.value)
        return ("node", id(key)) if key.tag != _MERGE else ("merge",)

    def name(key: yaml.Node) -> str:
        return str(key.value) if isinstance(key, yaml.ScalarNode) else "(complex key)"

    def walk(node: yaml.Node, prefix: str, indexed: bool) -> None:
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.", False)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        if id(node) not in checked:
            checked.add(id(node))
            first: dict[Any, int] = {}
            for key, _ in node.value:
                ident = identity(key)
                if ident in first:
                    duplicates.append((prefix + name(key), key, first[ident]))
                else:
                    first[ident] = key.start_mark.line + 1
        for key, value in node.value:  # merged keys first: the mapping's own keys override them
            if key.tag == _MERGE:
                for base in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    walk(base, prefix, indexed)
        for key, value in node.value:
            if key.tag != _MERGE:
                path = prefix + name(key)
                if indexed:
                    index[path] = key.start_mark.line + 1
                walk(value, path + ".", indexed)

    try:
        walk(root, "", True)
    finally:
        keys.dispose()
    duplicates.sort(key=lambda d: d[1].start_mark.index)
    return index, duplicates


def _construct(root: yaml.Node) -> Any:
    """The Python value of a node graph that :func:`_compose` checked.

    Raises:
        yaml.YAMLError: a value that cannot be built (unhashable key, impossible timestamp).
    """
    loader = _RecipeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _yaml_load(text: str) -> Any:
    """Read one YAML document as recipes are read (no base-60 numbers; aliases, nesting and
    expanded size bounded; duplicate keys refused).

    Raises:
        yaml.YAMLError: not valid YAML, or refused (:class:`_Refused`, naming the first
            duplicate key or the bound exceeded and its line).
    """
    root = _compose(text)
    if root is None:
        return None
    _, duplicates = _scan(root)
    if duplicates:
        key, node, first = duplicates[0]
        raise _Refused(f"duplicate key (first at line {first})", node.start_mark, key)
    return _construct(root)


def _line_index(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML document to their 1-based line numbers ({} when the text
    is not YAML that :func:`_yaml_load` reads; never expands more than :data:`_MAX_NODES` nodes)."""
    try:
        root = _compose(text)
    except yaml.YAMLError:
        return {}
    return _scan(root)[0] if root is not None else {}


def _set_path(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KeyError(path)
        node = child
    node[parts[-1]] = value


def apply_overrides(doc: dict, overrides: list[str], source: str = "--set") -> list[Problem]:
    """Apply ``a.b=value`` overrides to a raw recipe dict in place.

    Values are parsed as YAML (``8`` is an int, ``false`` a bool, ``[1,2]`` a list; text that is
    not YAML stays a string). Returns the malformed overrides as problems (no ``=``, a value
    with a duplicate key or too many aliases); unknown keys are caught by validation.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(Problem(source, item, _MISSING, "expected KEY.PATH=VALUE"))
            continue
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except _Refused as exc:
            problems.append(Problem(source, key, _MISSING, f"value refused: {exc.problem}"))
            continue
        except yaml.YAMLError:
            value = raw
        try:
            _set_path(doc, key, value)
        except KeyError:
            problems.append(Problem(source, key, value, "a parent of this key is not a section"))
    return problems


def _from_validation_error(err: ValidationError, file: str, lines: dict[str, int], overridden: dict[str, str]) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "value_error" and "\x1f" in str(e.get("ctx", {}).get("error", "")):
            for row in str(e["ctx"]["error"]).split("\n"):
                key, value, why = row.split("\x1f")
                src = overridden.get(key, file)
                problems.append(Problem(src, key, value, why, lines.get(key) if src == file else None))
            continue
        # drop pydantic's union/tuple sub-locations for readability
        key = loc
        while key and key not in lines and "." in key and key.rsplit(".", 1)[1].isdigit():
            key = key.rsplit(".", 1)[0]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            known = _known_keys(parent)
            close = _closest(key.rsplit(".", 1)[-1], known)
            if close:
                msg += f" (did you mean {close!r}?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        value = _MISSING if e["type"] == "missing" else e.get("input", _MISSING)
        if isinstance(value, dict):
            value = _MISSING
        src = overridden.get(key, file)
        problem = Problem(src, key, value, msg, lines.get(key) if src == file else None)
        if problem not in problems:  # std: [0, 0, 0] is one problem, not three
            problems.append(problem)
    return problems


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return hits[0] if hits else None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True,
                flags: dict[str, tuple[str, Any]] | None = None) -> Recipe:
    """Read, override, validate and check a recipe file.

    Args:
        path: the YAML recipe.
        overrides: ``a.b=value`` strings applied on top of the file (``--set``).
        check_files: also check that the list files and checkpoint the recipe names exist
            (list files are not required when ``data.generate`` will create them).
        flags: typed values from command-line flags, ``{"cluster.nodes": ("--nodes", 4)}``,
            applied last; a problem with one names the flag.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: with one :class:`Problem` per unknown key, wrong type, missing file or
            impossible combination, all collected before raising. Before any of those: one
            problem when the file cannot be read, is not UTF-8 text (the byte, its offset and
            line), is not valid YAML, or uses aliases (``*name``) beyond a small bound (more than
            100, or expanding to more than 10,000 values: an alias bomb); one per duplicate key
            (naming both lines).
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeError([Problem(file, "(file)", _MISSING, f"cannot read recipe: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(file, "", _MISSING, _not_utf8(data, exc))]) from None
    try:
        root = _compose(text)
        lines, duplicates = _scan(root) if root is not None else ({}, [])
        if duplicates:
            raise RecipeError([Problem(file, key, _MISSING, f"duplicate key (first at line {first}); a recipe "
                                                            "names each key once", node.start_mark.line + 1)
                               for key, node, first in duplicates])
        doc = (_construct(root) if root is not None else None) or {}
    except _Refused as exc:
        raise RecipeError([Problem(file, "(yaml)", _MISSING, exc.why, exc.line)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([Problem(file, "(yaml)", _MISSING, f"not valid YAML: {reason}", line)]) from None
    if not isinstance(doc, dict):
        raise RecipeError([Problem(file, "(top level)", _MISSING, "a recipe is a mapping of sections")])
    overrides = list(overrides or [])
    problems = apply_overrides(doc, overrides)
    overridden = {o.partition("=")[0].strip(): "--set" for o in overrides}
    for key, (flag, value) in (flags or {}).items():
        _set_path(doc, key, value)
        overridden[key] = flag
    if check_files:
        problems += _check_files(doc, file, lines, overridden)
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as err:
        raise RecipeError(problems + _from_validation_error(err, file, lines, overridden)) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def _check_files(doc: dict, file: str, lines: dict[str, int], overridden: dict[str, str]) -> list[Problem]:
    """Missing files and folders the recipe names. Works on the raw document, so that it can
    run even when the schema found problems (every problem is reported in one go)."""
    problems = []

    def get(key: str) -> Any:
        node: Any = doc
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            section, name = key.split(".")
            field = Recipe.model_fields[section].annotation.model_fields[name]
            node = None if field.is_required() else field.default
        return node if isinstance(node, str) else None

    def missing(key: str, value: str, what: str) -> None:
        src = overridden.get(key, file)
        problems.append(Problem(src, key, value, f"{what} not found", lines.get(key) if src == file else None))

    generate = get("data.generate")
    if generate == "arrow_of_time" and not Path(get("data.source")).is_dir():
        missing("data.source", get("data.source"), "clips folder")
    if generate is None:
        if not Path(get("data.root")).is_dir():
            missing("data.root", get("data.root"), "folder")
        for key in ("data.train_list", "data.val_list"):
            if get(key) is not None and not Path(get(key)).is_file():
                missing(key, get(key), "list file")
    if get("model.pretrained") and not Path(get("model.pretrained")).is_file():
        missing("model.pretrained", get("model.pretrained"), "checkpoint file")
    classes = get("data.classes")
    if classes is not None:
        if not Path(classes).is_file():
            missing("data.classes", classes, "label map file")
        else:
            num_classes = (doc.get("model") or {}).get("num_classes") if isinstance(doc.get("model"), dict) else None
            if num_classes is None:
                num_classes = ModelConfig.model_fields["num_classes"].default
            try:
                read_class_names(classes, num_classes if isinstance(num_classes, int) else None)
            except ClassNamesError as err:
                src = overridden.get("data.classes", file)
                problems.append(Problem(src, "data.classes", classes, str(err),
                                        lines.get("data.classes") if src == file else None))
    return problems


# --------------------------------------------------------------------------- derived values


def derived_values(recipe: Recipe, world_size: int | None = None) -> dict[str, Any]:
    """Values that follow from the recipe and the number of ranks.

    ``global_batch = batch_size * world_size * backward_passes_per_step`` clips per optimizer
    step, and the learning rate by the linear scaling rule (Goyal et al. 2017, section 2.1):
    ``lr = base_lr * global_batch / base_batch``.
    """
    ws = world_size or recipe.dist.np
    global_batch = recipe.train.batch_size * ws * recipe.dist.backward_passes_per_step
    return {
        "world_size": ws,
        "global_batch": global_batch,
        "lr": recipe.optim.base_lr * global_batch / recipe.optim.base_batch,
        "run_dir": str(Path(recipe.run.dir) / recipe.run.name),
    }


PATH_FIELDS = ("data.root", "data.train_list", "data.val_list", "data.classes", "data.source", "model.pretrained",
               "run.dir")


def with_absolute_paths(recipe: Recipe, base: str | os.PathLike | None = None) -> Recipe:
    """A copy of ``recipe`` whose file and folder fields (:data:`PATH_FIELDS`) are absolute.

    Relative paths in a recipe are relative to the directory ``tsmtrain`` runs in; a job
    script may start elsewhere, so ``tsmtrain submit`` writes the recipe with absolute paths,
    resolved against ``base`` (default: the current directory).
    """
    base = Path(base or os.getcwd()).resolve()
    doc = recipe.model_dump(mode="json")
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = doc[section][name]
        if value is not None:
            doc[section][name] = os.path.normpath(base / Path(value).expanduser())
    return Recipe.model_validate(doc)


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text that :func:`load_recipe` reads back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
