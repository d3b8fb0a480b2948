"""The recipe schema: one YAML file that says everything about a training run.

A recipe has nine sections (``data``, ``model``, ``optim``, ``schedule``, ``dist``, ``train``,
``run``, ``cluster``, ``multigrid``), each a pydantic model below. Every field has a type, a default where one makes sense
and a one-line description (``tsmtrain validate`` prints them resolved). Unknown keys are errors,
so a misspelt key never silently falls back to a default; no float is infinite or NaN, no
boolean stands for a number, and no text holds a control character (a line break, a NUL, ...).
:class:`Recipe` also refuses impossible combinations of fields.

Build a recipe with :func:`tsmtrain.recipe.load_recipe` (:mod:`tsmtrain.recipe.loader`), which
also reads the YAML strictly and checks the files the recipe names.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .problems import COMBINATIONS, _shown

__all__ = [
    "Recipe",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DistConfig",
    "TrainConfig",
    "RunConfig",
    "ClusterConfig",
    "MultigridConfig",
    "NARROWEST_SHIFTED_LAYER",
    "PATH_FIELDS",
    "time_limit_seconds",
    "with_absolute_paths",
    "dump_recipe",
    "control_character",
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

    @field_validator("*", mode="before")
    @classmethod
    def _no_control_characters(cls, value: Any, info) -> Any:
        """One rule for every text value of a recipe (paths, names, environment variables, set-up
        lines, #SBATCH options, ...): no control character (U+0000 to U+001F, tab and line breaks
        included, and U+007F). Many reach the job script of ``tsmtrain render``; a line break there
        would start a shell line of its own. Sections are walked by their own fields."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return value
        why = control_character(value)
        if why:
            raise ValueError(why)
        return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL character"}


def control_character(value: Any) -> str | None:
    """Why ``value`` (text, or text in lists, tuples and mappings, keys included) cannot go into a
    recipe: it holds a control character, named with its code point and where it is (``item 2``,
    ``the name 'X'``); ``None`` when it holds none. :func:`tsmtrain.dist.slurm.render_sbatch` keeps
    the same rule for every value it writes."""
    if isinstance(value, str):
        found = _CONTROL.search(value)
        if found is None:
            return None
        char = found.group()
        return (f"holds {_CONTROL_NAMES.get(char, 'a control character')} (U+{ord(char):04X}) at character "
                f"{found.start() + 1}; a value must be one line of printable text (in a job script, what "
                "follows a line break runs as a command)")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            why = control_character(item)
            if why:
                return f"item {i + 1} {why}"
    if isinstance(value, dict):
        for key, item in value.items():
            why = control_character(key)
            if why:
                return f"the name {_shown(key)} {why}"
            why = control_character(item)
            if why:
                return f"the value of {_shown(key)} {why}"
    return None


_Positive = Annotated[float, Field(gt=0)]
_Pixels = Annotated[int, Field(ge=1)]


class DataConfig(_Section):
    """Where the videos are and how clips are sampled and augmented."""

    root: str = Field(".", description="folder that the paths in the list files are relative to, or the shard "
                                        "index (DIR/index.json) that tsmtrain prepare --shards wrote into DIR")
    train_list: str = Field(..., description="training list file: one `relative/path.ext label` per line")
    val_list: str | None = Field(None, description="validation list file (same format); none: no evaluation")
    features: str | None = Field(
        None, description="folder written by tsmtrain extract: train the classifier alone on its features (DIR/train, "
                          "DIR/val, of the same lists) instead of the videos, as YouTube-8M and Hwang et al. fine-tune "
                          "the classifier on extracted features")
    classes: str | None = Field(
        None, description="label map: one class name per line, line i naming label i-1 (as mmaction2's "
                          "label_map_k400.txt); as many as model.num_classes; none: classes shown by index")
    generate: Literal["demo", "study", "multilabel", "arrow_of_time"] | None = Field(
        None, description="build this dataset into `root` on first use: demo or study (rendered; study: the harder "
                          "one of the large-batch study), multilabel (rendered, 1-3 objects per clip, 6 classes, "
                          "model.loss: sigmoid) or arrow_of_time (from `source`)"
    )
    source: str = Field("../shared/clips", description="folder of the real clips that generate: arrow_of_time cuts")
    decoder: Literal["torchcodec", "decord", "pynvvideocodec"] = Field(
        "torchcodec", description="video decoding library: torchcodec (maintained, system FFmpeg; NVDEC when installed "
                                  "from the PyTorch index), decord (last release 2022), or pynvvideocodec (NVIDIA's "
                                  "NVDEC decoder from PyPI, GPU only: needs data.decode_device: cuda)")
    seek_mode: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="torchcodec frame seeking: auto (approximate for videos tsmtrain prepare wrote, exact "
                            "for others), exact (scan each file at open), approximate (trust the header)")
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="cpu: decode in the loader workers; cuda: data.decoder decodes with NVDEC into the "
                           "rank's GPU, one batch ahead on a CUDA stream, the workers reading the bytes (falls back "
                           "to cpu with a warning when the GPU cannot decode)")
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
    modality: Literal["rgb", "flow", "rgb_diff"] = Field(
        "rgb", description="what each segment holds: rgb (one frame), flow (data.flow_length optical-flow fields, "
                           "prepared by tsmtrain prepare --flow) or rgb_diff (differences of data.flow_length + 1 "
                           "frames, computed on the device; TSN)")
    flow_length: int = Field(5, ge=1, description="L: flow fields (flow) or frame differences (rgb_diff) per segment; "
                                                  "the first convolution takes 2L or 3L channels")
    flow_method: Literal["tvl1", "dis", "farneback"] = Field(
        "dis", description="the optical flow the model trains on: prepared videos' flow must have been computed "
                           "with it (tsmtrain prepare --flow); used to compute flow for data.generate datasets and "
                           "for tsmtrain predict on videos not prepared")
    flow_preset: Literal["ultrafast", "fast", "medium"] = Field("medium", description="DIS preset (flow_method: dis)")
    flow_bound: float = Field(20.0, gt=0, description="flow clipped to [-bound, bound] pixels before quantizing")
    mean: tuple[float, ...] | None = Field(
        None, description="per-channel normalisation mean, 0..1 units (3 values for rgb and rgb_diff, 2 for flow's x "
                          "and y); none: ImageNet's for rgb, 128/255 for flow (mmaction2)")
    std: tuple[_Positive, ...] | None = Field(
        None, description="per-channel normalisation std (each > 0; as many as data.mean); none: ImageNet's for rgb, "
                          "128/255 for flow (mmaction2)")
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
    pretrained: str | None = Field(
        None, description="local weights file to start from, never downloaded: a torchvision or timm ImageNet backbone, "
                          "or a TSM repository, mmaction2 or tsmtrain checkpoint (a classifier of another class count "
                          "starts fresh): docs/model-zoo.md")
    sync_bn: bool = Field(
        False, description="synchronized BatchNorm: normalize with the statistics of the global batch, not each "
                           "rank's (advised below 8 clips per GPU)")
    loss: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax: one label per video, cross-entropy; sigmoid: multi-label lists (`path "
                               "label label ...`), binary cross-entropy per class summed over classes, validation "
                               "reports mAP, GAP@20 and Hit@1")
    head: Literal["linear", "moe"] = Field(
        "linear", description="classifier: linear (per segment, averaged) or moe (YouTube-8M's Mixture of Experts on "
                              "the segment-averaged features; needs model.loss: sigmoid)")
    num_mixtures: int = Field(2, ge=1, description="experts per class of the moe head (plus a dummy expert)")
    head_parallel: bool = Field(
        False, description="split the classifier's classes across the ranks (model parallelism for the head, data "
                           "parallelism for the backbone): each rank holds num_classes / world size classes, scores "
                           "the gathered features of the global batch, and its head is left out of the allreduce; "
                           "checkpoints hold one head shard per rank")


class OptimConfig(_Section):
    """Optimizer and the linear scaling rule (Goyal et al. 2017)."""

    name: Literal["sgd", "lars"] = Field("sgd", description="SGD with momentum, or LARS (You et al. 2017)")
    base_lr: float = Field(0.01, gt=0, description="learning rate for a global batch of base_batch clips")
    base_batch: int = Field(64, ge=1, description="global batch at which base_lr applies (linear scaling rule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay (of the parameters exclude_from_decay leaves in)")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only)")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient eta")
    lars_eps: float = Field(1e-9, ge=0, description="LARS: added to the trust-ratio denominator")
    exclude_from_decay: Literal["norm_and_bias", "none"] = Field(
        "norm_and_bias", description="parameters without weight decay: norm_and_bias: the weights and biases of "
                                     "normalisation layers (BatchNorm) and every bias, as MLPerf's large-batch "
                                     "ResNet-50; none: weight decay on every parameter")
    lars_exclude: Literal["norm_and_bias", "none"] = Field(
        "norm_and_bias", description="LARS: parameters that take plain SGD steps without the trust ratio: "
                                     "norm_and_bias: BatchNorm weights and biases and every bias (LARS on the weights "
                                     "only, as MLPerf); none: the trust ratio for every parameter")


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
    epochs_per_batch_doubling: float = Field(
        0.0, ge=0, description="epochs added per doubling of the global batch over optim.base_batch: epochs + this x "
                               "log2(global batch / base_batch), rounded up (none below base_batch); 0: the same "
                               "epochs at every batch")
    warmup_epochs_per_batch_doubling: float = Field(
        0.0, ge=0, description="warmup epochs added per doubling of the global batch over optim.base_batch: "
                               "warmup_epochs + this x log2(global batch / base_batch); 0: the same warmup at every "
                               "batch")


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
    sync: Literal["allreduce", "local_sgd"] = Field(
        "allreduce", description="how the ranks' models stay together: allreduce (the gradients averaged at every "
                                 "optimizer step), or local_sgd (post-local SGD, Lin et al. 2020: after "
                                 "dist.local_sgd_start each rank steps on its own gradients and the parameters and "
                                 "BatchNorm statistics are averaged every dist.local_sgd_period steps and at epoch ends; "
                                 "momentum stays each rank's own)")
    local_sgd_period: int = Field(
        8, ge=1, description="dist.sync: local_sgd: optimizer steps between averagings of the ranks' models (H); 1 "
                             "averages after every step, which equals allreduce for SGD")
    local_sgd_start: float = Field(
        0.0, ge=0, description="dist.sync: local_sgd: epochs of synchronous allreduce before local SGD starts (the "
                               "post-local SGD warm-up), rounded to the nearest optimizer step; 0: local from the first step")
    master_addr: str | None = Field(
        None, description="ddp under srun/mpirun: host where rank 0 listens; none: MASTER_ADDR, else the first host "
                          "of the Slurm allocation")
    master_port: int | None = Field(
        None, ge=1024, le=65535, description="ddp under srun/mpirun: port where rank 0 listens; none: MASTER_PORT, "
                                             "else 20000 + Slurm job id % 12000")
    timeout_seconds: int = Field(
        30, ge=5, le=86400, description="the collective timeout: a rank whose process died, or that sent no "
                                        "heartbeat for this many seconds (its link is down, its node froze), is "
                                        "declared lost, and the whole job ends within about this time with one line "
                                        "naming the rank and host (tsmtrain's watchdog, beside the engine; a slow "
                                        "step, checkpoint or evaluation does not trigger it)")

    @field_validator("master_addr")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:%-]+", v):
            raise ValueError("not a host name or IP address")
        return v


class TrainConfig(_Section):
    """The training loop."""

    batch_size: int = Field(8, ge=1, description="clips per rank per backward pass")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="label smoothing eps of the training loss (Szegedy et al. 2016; 0.1 in MLPerf's "
                                     "ResNet-50): (1 - eps) x cross-entropy + eps x the mean over classes of -log p; "
                                     "model.loss: softmax only; validation's loss is never smoothed; 0: none")
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
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradients are inf or NaN (fp32, bf16): stop: the run ends with "
                            "one line naming the step, the last finite loss and the checkpoint to resume from; "
                            "skip: that step's update is skipped on every rank and training goes on (fp16 skips "
                            "such steps through its gradient scaler either way)"
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


class MultigridConfig(_Section):
    """Multigrid training (Wu et al., CVPR 2020): smaller clips with larger batches, PySlowFast's defaults.

    Wu, Girshick, He, Feichtenhofer, Krähenbühl, "A Multigrid Method for Efficiently Training Video
    Models"; the defaults are PySlowFast's (slowfast/config/defaults.py, MULTIGRID); the schedule is
    :mod:`tsmtrain.train.multigrid`, the user's guide docs/training.md#multigrid.
    """

    long_cycle: bool = Field(False, description="long cycle: train most epochs on clips of fewer segments and a "
                                                "smaller input_size with a proportionally larger batch")
    short_cycle: bool = Field(False, description="short cycle: every 3 optimizer steps, 2 at a smaller input_size "
                                                 "(short_cycle_factors) with a larger batch, then 1 at the long "
                                                 "cycle's shape")
    long_cycle_factors: list[tuple[_Positive, _Positive]] = Field(
        [(0.25, 0.5 ** 0.5), (0.5, 0.5 ** 0.5), (0.5, 1.0), (1.0, 1.0)],
        description="the long cycle's shapes in order, as (data.num_segments factor, data.input_size factor); "
                    "train.batch_size is multiplied by round(1 / (t * s^2)) (PySlowFast's LONG_CYCLE_FACTORS)")
    short_cycle_factors: tuple[_Positive, _Positive] = Field(
        (0.5, 0.5 ** 0.5), description="the short cycle's two smaller input sizes as data.input_size factors; the "
                                       "batch grows by round((S / size)^2), S the long cycle's size "
                                       "(PySlowFast's SHORT_CYCLE_FACTORS)")
    epoch_factor: float = Field(1.5, gt=0, description="multigrid trains this many times schedule.epochs "
                                                        "(PySlowFast's EPOCH_FACTOR)")
    base_shape_fraction: float | None = Field(
        None, ge=0, lt=1, description="the part of schedule.epochs trained at the base shape (data.num_segments, "
                                      "data.input_size) at the end, as PySlowFast's fine-tuning phase; none: the "
                                      "epochs after the last milestone with schedule.decay: step (PySlowFast's "
                                      "rule), else 0.2")
    bn_clips: int | None = Field(
        None, ge=1, description="clips each BatchNorm normalises over in training: a larger batch is split into "
                                "sub-batches of this many clips, each with its own statistics (PySlowFast's "
                                "BN_BASE_SIZE, 8 there: its clips per GPU); none: train.batch_size, what BatchNorm sees "
                                "without multigrid; not with model.sync_bn (the global batch's statistics)")
    precise_bn_clips: int = Field(
        64, ge=0, description="before each evaluation, BatchNorm's running mean and variance are recomputed at the base "
                              "shape from this many training clips (PySlowFast's BN.USE_PRECISE_STATS): the running "
                              "ones average the smaller shapes trained at; 0: evaluate with the running ones")


_TIME_LIMIT = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # Linux: at most IFNAMSIZ - 1 characters, no '/', ':' or space


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
    network_interface: str | None = Field(
        None, description="network interface the ranks talk over, e.g. eth0 or ib0: exported as GLOO_SOCKET_IFNAME, "
                          "NCCL_SOCKET_IFNAME, HOROVOD_GLOO_IFACE and OpenMPI's btl/oob_tcp_if_include; none: each "
                          "library's own choice (DDP avoids a host name that resolves to loopback)")
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
        # spaces only: a line break is refused (control characters), not stripped
        if isinstance(v, str) and not _TIME_LIMIT.match(v.strip(" ")):
            raise ValueError("not a Slurm time limit: use minutes, minutes:seconds, hours:minutes:seconds, "
                             "days-hours, days-hours:minutes or days-hours:minutes:seconds")
        return v.strip(" ") if isinstance(v, str) else v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not _MEMORY.match(v):
            raise ValueError("not a Slurm memory size: a whole number with an optional unit K, M, G or T (e.g. 64G)")
        return v

    @field_validator("partition", "account", "qos", "constraint", "reservation", "job_name", "python", "mpi")
    @classmethod
    def _not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("network_interface")
    @classmethod
    def _interface(cls, v: str | None) -> str | None:
        if v is not None and (v in (".", "..") or not _IFNAME.match(v)):
            raise ValueError(f"{_shown(v)} is not a network interface name (1 to 15 letters, digits, '.', '_' "
                             "or '-'; `ip link` lists them, without the @... after a name)")
        return v

    @field_validator("sbatch")
    @classmethod
    def _sbatch_lines(cls, v: list[str]) -> list[str]:
        for line in v:  # one line each: control characters are refused for every field
            if not line.startswith("-"):
                raise ValueError(f"{_shown(line)}: an #SBATCH option starts with - (e.g. --exclusive)")
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


def _local_sgd_problems(r: "Recipe") -> list[tuple[str, Any, str]]:
    """What ``dist.sync: local_sgd`` cannot run with (and its fields without it)."""
    d = r.dist
    if d.sync != "local_sgd":
        return [(f"dist.{key}", getattr(d, key), "applies to dist.sync: local_sgd only")
                for key in ("local_sgd_period", "local_sgd_start")
                if getattr(d, key) != DistConfig.model_fields[key].default]
    problems = []
    if d.engine == "none":
        problems.append(("dist.sync", "local_sgd", "there are no ranks to average with dist.engine: none"))
    if r.model.head_parallel:
        problems.append(("model.head_parallel", True, "dist.sync: local_sgd steps each rank alone, but a sharded "
                                                      "classifier is trained on the global batch by all ranks together"))
    if r.model.sync_bn:
        problems.append(("model.sync_bn", True, "synchronized BatchNorm allreduces in every forward pass, the "
                                                "communication dist.sync: local_sgd leaves out"))
    if d.local_sgd_start >= r.schedule.epochs:
        problems.append(("dist.local_sgd_start", d.local_sgd_start,
                         f"not shorter than schedule.epochs ({r.schedule.epochs}): local SGD would never start"))
    return problems


class Recipe(_Section):
    """A whole recipe. Build it with :func:`~tsmtrain.recipe.loader.load_recipe` (which also checks files).

    Raises:
        pydantic.ValidationError: on validation; the impossible combinations of fields are one
            error of type :data:`COMBINATIONS` whose ``ctx["rows"]`` holds a ``(key, value, why)``
            per combination.
    """

    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    dist: DistConfig = DistConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()
    multigrid: MultigridConfig = MultigridConfig()

    @model_validator(mode="after")
    def _impossible_combinations(self) -> "Recipe":
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
        if self.data.generate == "multilabel" and (k != 6 or self.model.loss != "sigmoid"):
            problems.append(("data.generate", "multilabel", "the multilabel dataset has 6 classes and several labels "
                                                            "per clip: set model.num_classes: 6 and model.loss: sigmoid"))
        if self.model.head == "moe" and self.model.loss == "softmax":
            problems.append(("model.head", "moe", "the Mixture-of-Experts head gives each class its own probability: "
                                                  "it needs model.loss: sigmoid (multi-label), not softmax"))
        if self.model.head_parallel and self.dist.np > k:
            problems.append(("model.head_parallel", True, f"{k} classes cannot be split over dist.np = {self.dist.np} "
                                                          f"ranks: every rank needs at least one class"))
        if self.dist.engine == "none" and self.dist.np > 1:
            problems.append(("dist.np", self.dist.np, "several ranks need dist.engine: horovod or ddp"))
        launchers = {"horovod": ("gloo", "mpi"), "ddp": ("torchrun",), "none": ("gloo", "mpi", "torchrun")}
        if self.dist.launcher is not None and self.dist.launcher not in launchers[self.dist.engine]:
            problems.append(("dist.launcher", self.dist.launcher,
                             f"dist.engine: {self.dist.engine} starts its ranks with "
                             f"{' or '.join(launchers[self.dist.engine])}"))
        if self.dist.engine == "none" and self.dist.fp16_allreduce:
            problems.append(("dist.fp16_allreduce", True, "there is no allreduce with dist.engine: none"))
        problems += _local_sgd_problems(self)
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
        channels = 2 if d.modality == "flow" else 3
        for key in ("mean", "std"):
            value = getattr(d, key)
            if value is not None and len(value) != channels:
                problems.append((f"data.{key}", list(value), f"data.modality: {d.modality} needs {channels} values "
                                 f"({'x, y' if channels == 2 else 'R, G, B'})"))
        if d.modality == "flow" and d.decode_device == "cuda":
            problems.append(("data.decode_device", "cuda", "flow is stored losslessly (FFV1), which NVDEC does not "
                             "decode: data.modality: flow reads on the CPU (data.decode_device: cpu)"))
        if self.data.decode_device == "cuda" and self.data.decoder == "decord":
            problems.append(("data.decode_device", "cuda", "decord decodes on the CPU only: GPU decoding needs "
                             "data.decoder: pynvvideocodec or torchcodec"))
        if self.data.decoder == "pynvvideocodec" and self.data.decode_device != "cuda":
            problems.append(("data.decoder", "pynvvideocodec", "pynvvideocodec decodes on the GPU only: set "
                             "data.decode_device: cuda (or data.decoder: torchcodec for the CPU)"))
        if self.data.decode_device == "cuda" and self.train.device == "cpu":
            problems.append(("data.decode_device", "cuda", "train.device is cpu: frames decoded on a GPU would be "
                                                           "copied back"))
        if self.train.label_smoothing and self.model.loss != "softmax":
            problems.append(("train.label_smoothing", self.train.label_smoothing,
                             "smooths the softmax cross-entropy only, not model.loss: sigmoid (multi-label)"))
        elif self.train.label_smoothing and self.model.head_parallel:
            problems.append(("train.label_smoothing", self.train.label_smoothing,
                             "not with model.head_parallel: the sharded head's cross-entropy has no smoothing"))
        if s.warmup_epochs_per_batch_doubling > s.epochs_per_batch_doubling:
            problems.append(("schedule.warmup_epochs_per_batch_doubling", s.warmup_epochs_per_batch_doubling,
                             f"larger than schedule.epochs_per_batch_doubling ({s.epochs_per_batch_doubling}): at "
                             "large batches the warmup would outgrow the schedule"))
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
        problems += _multigrid_problems(self)
        if problems:
            raise PydanticCustomError(COMBINATIONS, "{count} impossible combinations of fields",
                                      {"count": len(problems), "rows": [(k, repr(v), why) for k, v, why in problems]})
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory, ``run.dir/run.name`` (relative when ``run.dir`` is): checkpoints,
        ``metrics.jsonl``, the logs and the recipe a run was started with."""
        return Path(self.run.dir) / self.run.name


def _multigrid_problems(recipe: "Recipe") -> list[tuple[str, Any, str]]:
    """The combinations multigrid training cannot run (``multigrid.long_cycle`` or ``short_cycle`` on)."""
    mg = recipe.multigrid
    if not (mg.long_cycle or mg.short_cycle):
        return []
    key = "multigrid.long_cycle" if mg.long_cycle else "multigrid.short_cycle"
    if recipe.data.features is not None:
        return [(key, True, "data.features trains the classifier alone on fixed features: there is no clip shape "
                            "to vary")]
    if mg.long_cycle and not mg.long_cycle_factors:
        return [("multigrid.long_cycle_factors", [], "the long cycle needs at least one shape")]
    return []


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
    """The recipe as YAML text that :func:`~tsmtrain.recipe.loader.load_recipe` reads back to an
    equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
