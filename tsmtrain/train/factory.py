"""The parts of a run, built by :func:`tsmtrain.train.loop.train` in this order on every rank.

* :func:`start_rank`: logging, the run directory's leftovers, threads, the device;
* :func:`create_loaders`: the check of every file the lists need (:func:`check_data_files`),
  the training loader, its sampler and augmentation, the validation list (:class:`Loaders`);
* :func:`create_network`: the network with the recipe's initial weights, on the device,
  SyncBN if asked;
* then the loop builds the :class:`~tsmtrain.train.step.TrainStep` from the optimizer
  (:func:`tsmtrain.optim.create_optimizer`) and the schedule
  (:func:`tsmtrain.optim.create_schedule`);
* :func:`resume_run`: the latest checkpoint, if any, and rank 0's state broadcast;
* :func:`announce_run`: rank 0 writes ``recipe.yaml`` and logs what runs.

The order matters for exact runs: the global random generator is seeded before the network is
built and again, per rank, before the first step (:func:`tsmtrain.train.loop.train`).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import ListFileError, RankSampler, build_loader, clip_dataset, read_list
from ..data.readers.features import INDEX, FeatureDataset, collate_features, list_digest, read_index
from ..data.loader import DataError, ShapeBatchSampler, decoding_target
from ..data.modality import modality_of
from ..data.preflight import data_problems, one_line
from ..data.manifest import ManifestError
from ..data.transforms import VideoTransform
from ..dist.base import Engine
from ..dist.head_parallel import HeadParallel, class_shard
from ..dist.stop import PREEMPTED_FILE
from ..io import write_text
from ..models import FeatureClassifier, create_model, shard_classifier
from ..optim import LinearScaling, create_optimizer
from ..recipe import Recipe, dump_recipe
from . import checkpoint as ckpt
from .rundir import RunLock
from ..errors import TrainingError
from .multigrid import MultigridSchedule, multigrid_on
from .setup import choose_device, keep_freed_memory, log, set_threads, setup_logging
from ..prep.datasets import prepare_dataset
from .step import TrainStep, half_precision_note

__all__ = ["start_rank", "Loaders", "check_data_files", "create_loaders", "create_network", "resume_run",
           "announce_run"]


def start_rank(recipe: Recipe, engine: Engine, lock: RunLock | None) -> torch.device:
    """Start this rank in the run directory, which rank 0 holds (``lock``): logging (rank 0 also
    to ``train.log``); on rank 0, the lock's note, and the removal of killed checkpoint writes
    and of an earlier start's ``preempted.json``; the thread count, the host allocator, and one
    line per rank on stderr (rank, host, device, threads).

    Returns:
        This rank's training device (``train.device``).
    """
    t, run_dir = recipe.train, recipe.run_dir
    setup_logging(engine.rank, run_dir)
    if engine.rank == 0:
        if lock is not None and lock.note:
            log.warning("%s", lock.note)
        ckpt.remove_stale_temporaries(run_dir)  # killed checkpoint writes (no run writes here now)
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)  # a stop of an earlier start is history now
    threads = set_threads(t.threads, engine.local_size)
    kept = keep_freed_memory()  # steps reuse freed activations instead of page-faulting fresh ones
    device = choose_device(t.device, engine.local_rank)
    print(f"[rank {engine.rank}] rank {engine.rank} of {engine.size} ({engine.name}) on {socket.gethostname()}, "
          f"local rank {engine.local_rank} of {engine.local_size}, device {device}, {threads} threads"
          + (", freed memory kept (glibc mallopt)" if kept else ""),
          file=sys.stderr, flush=True)
    return device


@dataclass
class Loaders:
    """This rank's data of a run (:func:`create_loaders`).

    Attributes:
        train: the training loader: batches of ``frames`` uint8 ``(N, T, H, W, 3)``, ``label``
            int64 ``(N,)``, ``failed`` (videos that could not be decoded), N = ``train.batch_size``.
        sampler: its :class:`~tsmtrain.data.RankSampler` (this rank's part, the epoch and the
            position in it).
        train_tf: the training augmentation, on the device: uint8 ``(N, T, H, W, 3)`` -> float32
            ``(N, T, C_in, S, S)`` (C_in: 3 for RGB, :mod:`tsmtrain.data.modality`).
        val_tf: the evaluation transform (resize, centre crop, normalise).
        val_records: the validation videos (``data.val_list``; empty without one).
        transform_gen: the random generator of ``train_tf`` (saved in checkpoints).
        train_size: videos in the training list.
        steps_per_epoch: optimizer steps per epoch (multigrid: of the first epoch; see ``multigrid``).
        batch_shape: ``(N, T, C_in, S, S)`` of every augmented training batch (multigrid: of the
            base shape).
        multigrid: the multigrid schedule (``multigrid.long_cycle``/``short_cycle``): the loader's
            batches then follow its shapes (``shape_batches``, a
            :class:`~tsmtrain.data.loader.ShapeBatchSampler`); None without multigrid.
        train_records: the training videos (multigrid: precise BatchNorm statistics,
            :mod:`~tsmtrain.train.precise_bn`); empty when the data are extracted features.
    """

    train: torch.utils.data.DataLoader
    sampler: RankSampler
    train_tf: VideoTransform
    val_tf: VideoTransform
    val_records: list
    transform_gen: torch.Generator
    train_size: int
    steps_per_epoch: int
    batch_shape: tuple[int, int, int, int, int]
    multigrid: MultigridSchedule | None = None
    shape_batches: ShapeBatchSampler | None = None
    train_records: list = field(default_factory=list)

    def seek(self, epoch: int, micro: int) -> None:
        """Point the training loader at backward pass ``micro`` of ``epoch`` (the sampler's epoch
        and the clips to skip: ``micro`` batches' worth)."""
        if self.multigrid is not None:
            self.shape_batches.set_epoch(epoch, micro)
        else:
            self.sampler.set_epoch(epoch, skip=micro * self.batch_shape[0])

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch``."""
        return self.multigrid.steps_in(epoch) if self.multigrid is not None else self.steps_per_epoch


def check_data_files(recipe: Recipe, engine: Engine) -> None:
    """Before the network is built: rank 0 checks every file that the readers of the training
    and validation lists will open (:func:`tsmtrain.data.preflight.data_problems`: shards, flow
    files, features), once for the whole job, and every rank learns the verdict (one allreduce),
    so that a missing file stops every rank before the first step instead of after an epoch.

    Raises:
        tsmtrain.data.DataError: on rank 0, one line naming the first problem and how many there
            are; TrainingError on the other ranks, pointing at rank 0's line.
        tsmtrain.data.ListFileError, tsmtrain.data.manifest.ManifestError: a malformed list file
            or manifest (rank 0).
    """
    error: Exception | None = None
    if engine.rank == 0:
        try:
            problems = data_problems(recipe)
        except (ListFileError, ManifestError) as err:  # a malformed list or manifest: its own lines
            error = err
        else:
            error = DataError(one_line(problems)) if problems else None
    if engine.size > 1:  # every rank stops here, before the network, when rank 0 found something
        found = engine.allreduce(torch.tensor([float(error is not None)], dtype=torch.float64), average=False)
        if engine.rank != 0 and found.item() > 0:
            raise TrainingError("rank 0 found a problem with the data files before training (its error line names it)")
    if error is not None:
        raise error


def create_loaders(recipe: Recipe, engine: Engine, device: torch.device, scaling: LinearScaling) -> Loaders:
    """The training loader, sampler and augmentation, and the validation list, of ``recipe`` on
    this rank. With ``data.generate`` rank 0 first builds the dataset (every rank waits). Then
    every file the lists need is checked (:func:`check_data_files`). One
    loader serves the whole run: its workers persist across epochs (the sampler, which runs in
    this process, says which epoch and where in it).

    Args:
        recipe: the run's recipe (``data``, ``train.batch_size``, ``train.seed``).
        engine: this rank's place (the shard) and the barrier.
        device: the training device (pinned memory on a GPU; GPU decoding if asked).
        scaling: the run's linear scaling (the global batch, for the error message).

    Raises:
        TrainingError: the training list gives no full global batch.
        tsmtrain.data.ListFileError: a malformed list file.
        tsmtrain.data.DataError: a file that the lists need is missing (:func:`check_data_files`).
    """
    d, t = recipe.data, recipe.train
    if d.features is not None:  # the classifier alone, on extracted features
        check_data_files(recipe, engine)
        return _feature_loaders(recipe, engine, device, scaling)
    if d.generate is not None:
        if engine.rank == 0:
            prepare_dataset(recipe)
        engine.barrier()
    check_data_files(recipe, engine)
    multi = recipe.model.loss == "sigmoid"  # multi-label lists
    train_records = read_list(d.train_list, d.root, recipe.model.num_classes, multi_label=multi)
    val_records = read_list(d.val_list, d.root, recipe.model.num_classes, multi_label=multi) if d.val_list else []
    decoder, where = decoding_target(d.decoder, d.decode_device, device)
    train_set = clip_dataset(recipe, train_records, train=True, decode_device=where, decoder=decoder)
    sampler = RankSampler(len(train_set), engine.rank, engine.size, shuffle=True, pad=True, seed=t.seed)
    steps_per_epoch = len(sampler.indices()) // t.batch_size // recipe.dist.backward_passes_per_step
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{d.train_list}: {len(train_set)} videos give no full global batch of {scaling.global_batch} clips "
            f"(train.batch_size x ranks x dist.backward_passes_per_step); lower train.batch_size"
        )
    transform_gen = torch.Generator().manual_seed(t.seed * 1009 + engine.rank)
    modality = modality_of(d)
    multigrid = MultigridSchedule(recipe, len(sampler.indices())) if multigrid_on(recipe) else None
    batches = sampler if multigrid is None else ShapeBatchSampler(sampler, multigrid.micro_batches)
    return Loaders(
        train=build_loader(train_set, batches, t.batch_size, d.workers, drop_last=True,
                           pin_memory=device.type == "cuda", persistent=True),
        sampler=sampler,
        train_tf=VideoTransform(train=True, input_size=d.input_size, scales=tuple(d.scales), flip=d.flip,
                                generator=transform_gen, modality=modality),
        val_tf=VideoTransform(train=False, input_size=d.input_size, modality=modality),
        val_records=val_records, transform_gen=transform_gen, train_size=len(train_set),
        steps_per_epoch=steps_per_epoch if multigrid is None else multigrid.steps_in(0),
        batch_shape=(t.batch_size, d.num_segments, modality.in_channels, d.input_size, d.input_size),
        multigrid=multigrid, shape_batches=None if multigrid is None else batches, train_records=train_records,
    )


def feature_sets(recipe: Recipe) -> tuple[FeatureDataset, FeatureDataset | None]:
    """The training and validation features of ``data.features`` (:mod:`tsmtrain.data.readers.features`),
    checked against the recipe.

    Raises:
        TrainingError: no index, features of other lists (their SHA-256 differs), of another
            number of classes or of the other kind of labels (the message names the file and key).
        tsmtrain.data.DataError: a damaged shard.
    """
    d, k, multi = recipe.data, recipe.model.num_classes, recipe.model.loss == "sigmoid"
    sets = []
    for split, list_file in (("train", d.train_list), ("val", d.val_list)):
        if list_file is None:
            sets.append(None)
            continue
        index_file = Path(d.features) / split / INDEX
        try:
            found = FeatureDataset(index_file.parent)
        except DataError as err:
            raise TrainingError(f"data.features: {err}") from None
        index = found.index
        if index["list_sha256"] != list_digest(list_file):
            raise TrainingError(f"data.features: {index_file} holds the features of {index['list']}, not of "
                                f"{list_file} (their contents differ): extract them again")
        if (index["num_classes"], index["multi_label"]) != (k, multi):
            raise TrainingError(f"data.features: {index_file} was extracted for {index['num_classes']} classes "
                                f"({'multi' if index['multi_label'] else 'single'}-label), the recipe has {k} "
                                f"({'multi' if multi else 'single'}-label)")
        for line, error in found.unreadable:
            log.warning("data.features: %s line %d has no features (unreadable when extracted: %s)", list_file,
                        line + 1, error)
        sets.append(found)
    return sets[0], sets[1]


def _feature_loaders(recipe: Recipe, engine: Engine, device: torch.device, scaling: LinearScaling) -> Loaders:
    """:func:`create_loaders` for ``data.features``: batches of features ``(N, D)`` with the video
    loader's keys, identity transforms, the validation features as ``val_records``."""
    t = recipe.train
    train_set, val_set = feature_sets(recipe)
    sampler = RankSampler(len(train_set), engine.rank, engine.size, shuffle=True, pad=True, seed=t.seed)
    steps_per_epoch = len(sampler.indices()) // t.batch_size // recipe.dist.backward_passes_per_step
    if steps_per_epoch < 1:
        raise TrainingError(f"data.features: {len(train_set)} training videos give no full global batch of "
                            f"{scaling.global_batch} clips; lower train.batch_size")
    return Loaders(
        train=build_loader(train_set, sampler, t.batch_size, recipe.data.workers, drop_last=True,
                           collate=collate_features),
        sampler=sampler, train_tf=_as_float, val_tf=_as_float, val_records=val_set if val_set is not None else [],
        transform_gen=torch.Generator().manual_seed(t.seed * 1009 + engine.rank), train_size=len(train_set),
        steps_per_epoch=steps_per_epoch, batch_shape=(t.batch_size, train_set.dim))


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """The transform of features: none (float32 as they are)."""
    return x.float()


def create_network(recipe: Recipe, engine: Engine, device: torch.device) -> torch.nn.Module:
    """The recipe's network (:func:`tsmtrain.models.create_model`) on ``device``, its BatchNorm
    layers synchronized over all ranks with ``model.sync_bn``. Seeds the global generator with
    ``train.seed`` first: the same initial weights on every rank (rank 0's are broadcast anyway).
    """
    torch.manual_seed(recipe.train.seed)
    m = recipe.model
    if recipe.data.features is not None:  # the classifier alone on D-dimensional features
        dim = int(read_index(Path(recipe.data.features) / "train")["dim"])
        model = FeatureClassifier(dim, m.num_classes, m.head, m.num_mixtures, m.dropout)
    else:
        model = create_model(m, recipe.data.num_segments, modality_of(recipe.data).in_channels)
    if recipe.model.head_parallel:  # this rank's classes only, drawn as the whole head would be
        lo, hi = class_shard(recipe.model.num_classes, engine.rank, engine.size)
        shard_classifier(model, lo, hi, recipe.train.seed)  # on the CPU: the whole head never reaches the device
    model = model.to(device)
    if recipe.model.sync_bn:
        model = engine.sync_batchnorm(model)  # BatchNorm over the global batch
    return model


def create_optimizers(recipe: Recipe, engine: Engine, model: torch.nn.Module):
    """The optimizers of ``model`` (:func:`tsmtrain.optim.create_optimizer`) and, with
    ``model.head_parallel``, what its sharded head needs.

    Returns:
        ``(optimizer, head_optimizer, head_parallel)``: without ``head_parallel``, one optimizer
        of every parameter and ``None, None``; with it, the optimizer of all but ``model.fc``
        (``None`` when nothing else trains: a head on features), the head shard's own optimizer
        (LARS's norms summed over the ranks' shards) and the
        :class:`~tsmtrain.dist.head_parallel.HeadParallel` of this rank.
    """
    if not recipe.model.head_parallel:
        return create_optimizer(model, recipe.optim), None, None
    head_parallel = HeadParallel(engine, recipe.model.num_classes, recipe.model.loss)
    return (create_optimizer(model, recipe.optim, skip=model.fc),
            create_optimizer(model.fc, recipe.optim, sum_across=lambda t: engine.allreduce(t, average=False)),
            head_parallel)


def resume_run(recipe: Recipe, engine: Engine, step: TrainStep, loaders: Loaders, wanted: bool | None) -> ckpt.Position:
    """Continue from the run directory's latest intact checkpoint when there is one (rank 0's
    choice, :func:`~tsmtrain.train.checkpoint.resume_checkpoint`): the step's model, optimizer
    and gradient scaler, the augmentation's random stream and the position; then broadcast rank
    0's model and optimizer state, and (a checkpoint written by as many ranks) put back this
    rank's own BatchNorm statistics (written mid-epoch) and, under local SGD, its own parameters
    and optimizer state.

    Args:
        wanted: ``train(resume=...)``: ``None`` if there is one, ``True`` there must be one,
            ``False`` there must be none.

    Returns:
        Where the run continues (step 0 of epoch 0 on a fresh start).

    Raises:
        TrainingError: see :func:`~tsmtrain.train.checkpoint.resume_checkpoint` and
            :func:`~tsmtrain.train.checkpoint.restore_run`.
    """
    pos, own = ckpt.Position(), None
    path, state = ckpt.resume_checkpoint(engine, recipe.run_dir, wanted)  # rank 0's choice: the newest intact one
    if path is not None:
        pos, own = ckpt.restore_run(path, engine, step.model, step.optimizer, step, loaders.transform_gen,
                                             recipe, loaders.train_size, state=state)
        del state
    engine.broadcast_state(step.model, step.optimizer, **({"exclude": "fc."} if step.head_parallel else {}))
    if own is not None:  # mid-epoch: each rank's own BatchNorm statistics; local SGD: its model and momentum
        with torch.no_grad():
            for name, tensor in step.model.state_dict().items():
                if name in own["tensors"]:
                    tensor.copy_(own["tensors"][name])
        if own["optimizer"] is not None and step.optimizer is not None:
            step.optimizer.load_state_dict(own["optimizer"])
    return pos


def announce_run(recipe: Recipe, engine: Engine, device: torch.device, scaling: LinearScaling,
                 steps_per_epoch: int, epochs: int | None = None) -> None:
    """On rank 0: warn when the precision is slow on this CPU, write ``RUN_DIR/recipe.yaml`` (the
    resolved recipe) and log one line of what runs (network, ranks, device, precision, global
    batch, learning rate, steps; ``epochs``: the run's when not ``schedule.epochs``, multigrid's)."""
    if engine.rank != 0:
        return
    t = recipe.train
    note = half_precision_note(t.precision, device)
    if note:
        log.warning("%s", note)
    write_text(recipe.run_dir / "recipe.yaml", dump_recipe(recipe))
    log.info("run %s: %s, %d ranks (%s), device %s, %s%s%s, global batch %d, lr %.4g, %d steps/epoch x %d epochs",
             recipe.run_dir, f"the classifier on the features of {recipe.data.features}" if recipe.data.features
             else "TSM" if recipe.model.shift else "TSN", engine.size, engine.name, device, t.precision,
             ", channels_last" if t.channels_last else "", ", compiled" if t.compile else "",
             scaling.global_batch, scaling.lr, steps_per_epoch, epochs or recipe.schedule.epochs)
