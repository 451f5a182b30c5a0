"""Step 6: train the embedding network with online triplet mining on P x K batches; resumable.

One optimizer step: a P x K batch (P identities x K images, P x K sampling)
-> embeddings [P*K, D] on the unit sphere -> triplet loss mined inside the
batch (`config.loss`: batch_all, batch_hard or semi_hard; squared or plain L2
distances) -> Adam. The learning rate rises linearly over `warmup_steps`
(lr * (step + 1) / warmup_steps) and then stays constant or follows a cosine
from the peak down to 1% of it at `max_steps`. The margin-softmax objectives
(arcface, cosface, softmax; `margin_losses`) instead compare each embedding
with a head of one centre per training identity (labels 0..C-1 in label-id
order, `train_classes`), on P x K batches or on P*K images drawn uniformly
(train.sampling).

The parts: `trainer` (the Keras model that trains: schedule, loss, devices,
precision), `monitor` (fail fast, log lines, validation, the callback) and
`checkpoints` (checkpoints, resume provenance, the folder's lock); this
module reads each backend's inputs and runs Keras's `fit`, and re-exports what
callers use.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp.checkpoints import (  # noqa: F401  (re-exported: the trainer's API)
    CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINTS_KEPT, HISTORY_JSON, PROVENANCE_JSON, RESUMABLE_CHANGES,
    TF_CHECKPOINT_NAME, TRAIN_LOCK, _checkpoint_errors, _remove_stale_temps_in, _restore,
    checkpoint_arrays, checkpoint_provenance, checkpoint_steps, code_fingerprint, default_checkpoint_dir,
    load_checkpoint, provenance_differences, restore_latest, save_checkpoint, training_lock)
from facenet_kfp import multiprocess, objectives
from facenet_kfp.config import TrainConfig, to_dict
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import check_replaceable, is_uri, join, no_space_named, remove_stale_temps, write_json_any
from facenet_kfp.monitor import (  # noqa: F401  (re-exported: the trainer's API)
    COLLAPSE_END_STEPS, COLLAPSE_MARGIN_FRACTION, COLLAPSE_MAX_DISTANCE, COLLAPSE_MEAN_DISTANCE, COLLAPSE_STEPS,
    DIVERGENCE_STEPS, STAT_KEYS, RunState, TrainingMonitor, TrainingProgress, collapse_negative_limit,
    evaluation_model, float32_model, summary_metrics, validate)
from facenet_kfp.progress import Progress
from facenet_kfp.tensorboard_log import TensorBoardLog
from facenet_kfp.trainer import (  # noqa: F401  (re-exported: the trainer's API)
    EmbeddingTrainer, Placement, backend, batch_loss, build_trainer, distribution_strategy, jax_distribution,
    learning_rate_at, make_schedule, resolve_precision)

log = logging.getLogger(__name__)

BN_CALIBRATION_BATCHES = 10      # unaugmented train batches that set the batch-norm statistics (validation, export)


# ----------------------------------------------------------------------------- inputs

def _check_inputs(dataset_dir, completion_dir, labels_dir, splits_dir, k: int) -> dict[str, str]:
    """The input fingerprints (`provenance.check_inputs`): InputError when a folder is missing or the
    four do not belong together (completion made with another multiple than k included)."""
    from facenet_kfp.provenance import check_inputs

    for name, folder in (("dataset", dataset_dir), ("labels", labels_dir), ("splits", splits_dir)):
        if not folder or not Path(folder).is_dir():
            raise InputError(f"{folder}: {name} folder not found")
    if completion_dir and not Path(completion_dir).is_dir():
        raise InputError(f"{completion_dir}: completion folder not found")
    return check_inputs(images=dataset_dir, completion=completion_dir or None, labels=labels_dir,
                        splits=splits_dir, multiple=k if completion_dir else None)


def _train_and_validation_batches(dataset_dir, completion_dir, labels_dir, splits_dir, config: TrainConfig,
                                  replicas: int, start_step: int):
    """(the training batches from batch start_step on, for `fit`; the validation batches, a list of
    (images, labels), or None; the batch-norm calibration images, a list of BN_CALIBRATION_BATCHES
    unaugmented P x K batches of the train split (the same whatever start_step); a function that
    releases the inputs)."""
    make = _tf_batches if backend() == "tensorflow" else _jax_batches
    return make(dataset_dir, completion_dir, labels_dir, splits_dir, config, replicas, start_step)


def _tf_batches(dataset_dir, completion_dir, labels_dir, splits_dir, config: TrainConfig, replicas: int,
                start_step: int):
    """tensorflow: tf.data P x K batches (`tf_input.make_train_dataset`) over the train split, read from the
    shards by offset as batches are drawn (`numpy_input.open_split`), so memory does not grow with the dataset.
    On a GPU the training batches come as uint8 (`trainer.input_pixels`), as on the JAX path."""
    from facenet_kfp.tf_input import make_train_dataset
    from facenet_kfp.numpy_input import open_split
    from facenet_kfp.trainer import input_pixels

    split = open_split(dataset_dir, completion_dir or None, labels_dir, splits_dir, "train")
    try:
        _check_train_split(split.labels, split.synthetic, splits_dir, config, replicas)
        labels = train_classes(split.labels)
        val_batches = _validation_batches(dataset_dir, labels_dir, splits_dir, config, lambda images, labels, p: [
            (x.numpy(), y.numpy()) for x, y in make_train_dataset(
                images, labels, p, config.k, config.image_size, config.crop_fraction, False,
                config.seed).take(config.validation_batches)])
        calibration = [x.numpy() for x, _ in make_train_dataset(
            split, labels, config.p, config.k, config.image_size, config.crop_fraction, False,
            config.seed).take(BN_CALIBRATION_BATCHES)]
    except BaseException:
        split.close()
        raise
    train = make_train_dataset(split, labels, config.p, config.k, config.image_size, config.crop_fraction,
                               config.augment, config.seed, start_batch=start_step, sampling=config.sampling,
                               pixels=input_pixels())
    return train, val_batches, calibration, split.close


def _jax_batches(dataset_dir, completion_dir, labels_dir, splits_dir, config: TrainConfig, replicas: int,
                 start_step: int):
    """jax: `numpy_input.TrainBatches` (no TensorFlow), reading the train split from the shards by offset; on a
    GPU the training batches come as uint8 (`trainer.input_pixels`; the trainer normalises them on the device),
    validation and calibration batches always as float32."""
    from facenet_kfp.numpy_input import TrainBatches, open_split
    from facenet_kfp.trainer import input_pixels

    def validation(images, labels, p):
        with TrainBatches(images, labels, p, config.k, config.image_size, config.crop_fraction, False,
                          config.seed, workers=0) as batches:
            return [next(batches) for _ in range(config.validation_batches)]

    split = open_split(dataset_dir, completion_dir or None, labels_dir, splits_dir, "train")
    try:
        _check_train_split(split.labels, split.synthetic, splits_dir, config, replicas)
        labels = train_classes(split.labels)
        val_batches = _validation_batches(dataset_dir, labels_dir, splits_dir, config, validation)
        with TrainBatches(split, labels, config.p, config.k, config.image_size, config.crop_fraction,
                          False, config.seed, workers=0) as batches:
            calibration = [next(batches)[0] for _ in range(BN_CALIBRATION_BATCHES)]
    except BaseException:
        split.close()
        raise
    # Several processes: each feeds its part of every global batch (P / processes whole identities), and
    # Keras's DataParallel assembles the global batch from the parts in process order.
    stream = TrainBatches(split, labels, config.p, config.k, config.image_size, config.crop_fraction,
                          config.augment, config.seed, start_batch=start_step, pixels=input_pixels(),
                          part=(multiprocess.process_index(), multiprocess.process_count()),
                          sampling=config.sampling)

    def close() -> None:
        stream.close()
        split.close()
    return (batch for batch in stream), val_batches, calibration, close      # fit takes a generator, not an iterator


def train_identities(splits_dir) -> int:
    """The number of training identities: the rows of a margin-softmax objective's head. train.txt lists
    each with at least one image, so it is also the number of distinct labels of the train split."""
    from facenet_kfp.splits import read_split

    return len(read_split(splits_dir, "train"))


def train_classes(labels: np.ndarray) -> np.ndarray:
    """The train split's labels (labels.json ids) as class indices 0..C-1 in id order, int32: the rows of
    a head. The order and equality of labels are kept, so P x K batches are the same either way."""
    return np.searchsorted(np.unique(labels), labels).astype(np.int32)


def _check_train_split(labels, synthetic, splits_dir, config: TrainConfig, replicas: int) -> None:
    identities = np.unique(labels)
    if len(identities) < config.p:
        raise InputError(f"{Path(splits_dir) / 'train.txt'}: split 'train' has {len(identities)} identities "
                         f"with images, fewer than p={config.p} identities per batch")
    short = int(np.sum(np.bincount(np.searchsorted(identities, labels)) < config.k))
    log.info("train: %d images (%d generated) of %d identities; %d identities have fewer than k=%d "
             "images and are sampled with replacement", len(labels), int(np.sum(synthetic)), len(identities),
             short, config.k)
    objective = objectives.for_config(config)
    if objective.pk_batches and config.p % replicas:
        raise InputError(f"train.p={config.p} must be a multiple of the {replicas} GPUs "
                         f"(train.loss {objective.name}: each replica compares images of whole identities)")
    processes = multiprocess.process_count()
    if config.p % processes:
        raise InputError(f"train.p={config.p} must be a multiple of the {processes} processes "
                         f"(each process reads whole identities of every batch)")


class _Subset(Sequence):
    """Items `indices` of a lazy split, read when asked for."""

    def __init__(self, split: Sequence, indices: np.ndarray):
        self.split, self.indices = split, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> bytes:
        return self.split[int(self.indices[i])]


def _validation_batches(dataset_dir, labels_dir, splits_dir, config: TrainConfig, make_batches):
    """`make_batches(images, labels, p)` over the val identities with >= 2 real images, or None.

    The images are read from the shards only as the batches draw them, so
    memory holds the validation batches, not the validation split.
    """
    if config.validate_every <= 0:
        return None
    from facenet_kfp.numpy_input import open_split
    with open_split(dataset_dir, None, labels_dir, splits_dir, "val", include_synthetic=False) as split:
        val_labels = split.labels
        val_ids, counts = np.unique(val_labels, return_counts=True)
        keep = np.isin(val_labels, val_ids[counts >= 2])
        n_val = int(np.sum(counts >= 2))
        if n_val < 2:
            raise InputError(f"{Path(splits_dir) / 'val.txt'}: validation needs 2 identities with at least "
                             f"2 real images, found {n_val} (set validate_every: 0 to train without it)")
        return make_batches(_Subset(split, np.flatnonzero(keep)), val_labels[keep], min(config.p, n_val))



# ----------------------------------------------------------------------------- training

def _check_folder(folder: str, what: str, option: str) -> None:
    """InputError when a local output folder's path is a file (or a link to one)."""
    if not is_uri(folder) and (Path(folder).exists() or Path(folder).is_symlink()) and not Path(folder).is_dir():
        raise InputError(f"{folder}: the {what} is a file, not a folder; give the path of a new or existing "
                         f"folder ({option}), or move the file away")

def train(dataset_dir: str | os.PathLike, completion_dir: str | os.PathLike | None,
          labels_dir: str | os.PathLike, splits_dir: str | os.PathLike, model_dir: str | os.PathLike,
          config: TrainConfig, checkpoint_dir: str | None = None,
          tensorboard_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
          run_key: str | None = None) -> dict[str, float]:
    """Train an embedding model on the train split and save the model artifact to `model_dir`.

    dataset_dir: packed real images; completion_dir: packed generated images
    (None or "" for none); labels_dir: labels.json; splits_dir: train.txt /
    val.txt. Returns final metrics: train_* (mean over the last log window),
    val_* (last validation; absent when validate_every is 0), steps,
    start_step (> 0 after a resume), images_per_second (steps of this call,
    the first traced step excluded), train_seconds, learning_rate.

    checkpoint_dir defaults to `<model_dir>.ckpt`. run_key names what this
    call trains for (a KFP task passes its model output URI; default: the
    absolute model_dir): a checkpoint is resumed only for the same run key,
    input fingerprints, settings and code (see `facenet_kfp.checkpoints`).

    tensorboard_dir: a folder (path or gs://) or several (a KFP task writes its
    tensorboard artifact and its folder under tensorboard_root) that each get
    this run's TensorBoard events, the restored history included
    (`TensorBoardLog`); a folder of another run key is refused.

    Raises InputError, before any training, for a missing input folder, inputs
    of different lineages (`provenance.check_inputs`), a train split with fewer
    than p identities, p not a multiple of the replicas, a model_dir this step
    did not write, a checkpoint folder of another run, settings or code, or one
    held by another training; FacenetError when training collapses or diverges
    (the monitor names the settings to change); nothing is exported then.

    Several JAX processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID set, `multiprocess`): each calls `train` with the same
    arguments; they train one model over the devices of all of them, each
    reading its part of every batch, restore the same checkpoint, and process
    0 alone locks the checkpoint folder and writes checkpoints, TensorBoard
    events and the model (the others return the same metrics).
    """
    multiprocess.initialize()       # before any JAX work; InputError for a bad process group
    chief = multiprocess.is_chief()
    check_replaceable(model_dir, "train")       # before training, not after it
    fingerprints = _check_inputs(dataset_dir, completion_dir, labels_dir, splits_dir, config.k)
    placement = Placement()
    checkpoint_dir = str(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(model_dir)
    run_key = run_key or os.path.abspath(model_dir)
    provenance = checkpoint_provenance(run_key, fingerprints, config)
    if isinstance(tensorboard_dir, (str, os.PathLike)):
        tensorboard_dir = [tensorboard_dir]
    tensorboard_dirs = [str(f) for f in tensorboard_dir or ()]
    _check_folder(checkpoint_dir, "checkpoint folder", "train --checkpoint-dir, or cluster.checkpoint_root")
    for folder in tensorboard_dirs:
        _check_folder(folder, "TensorBoard folder", "train --tensorboard-dir, or cluster.tensorboard_root")
    if not chief:       # process 0 holds the lock and writes; the others only read the checkpoints
        return _train_locked(dataset_dir, completion_dir, labels_dir, splits_dir, model_dir, config,
                             checkpoint_dir, [], run_key, fingerprints, placement, provenance, chief=False)
    with training_lock(checkpoint_dir):
        for folder in (checkpoint_dir, *tensorboard_dirs):
            _remove_stale_temps_in(folder)
        remove_stale_temps(model_dir)
        return _train_locked(dataset_dir, completion_dir, labels_dir, splits_dir, model_dir, config,
                             checkpoint_dir, tensorboard_dirs, run_key, fingerprints, placement, provenance)


def _train_locked(dataset_dir, completion_dir, labels_dir, splits_dir, model_dir, config: TrainConfig,
                  checkpoint_dir: str, tensorboard_dirs: list[str], run_key: str, fingerprints: dict[str, str],
                  placement: Placement, provenance: dict[str, Any], chief: bool = True) -> dict[str, float]:
    """`train` from the TensorBoard folders on, with the checkpoint folder's lock held; chief False (a process
    other than 0 of several): the same training, writing nothing."""
    from facenet_kfp import export

    alignment = export.dataset_alignment(dataset_dir)      # model.json records it: verify aligns photos the same way
    tensorboard = TensorBoardLog(tensorboard_dirs, run_key)

    policy = resolve_precision(config.precision)
    trainer = build_trainer(config, policy, placement, classes=train_identities(splits_dir))
    log.info("model %s: %d parameters, backend %s, precision %s, %d replica(s), batch %d = P %d x K %d",
             trainer.embedding.name, trainer.embedding.count_params(), backend(), policy, placement.replicas,
             config.p * config.k, config.p, config.k)
    restored, start_step, history = _restore(trainer, checkpoint_dir, provenance, config)
    multiprocess.check_agree(start_step, "the step of the checkpoint they restored")
    train_batches, val_batches, calibration, close = _train_and_validation_batches(
        dataset_dir, completion_dir, labels_dir, splits_dir, config, placement.replicas, start_step)
    if chief:
        with _checkpoint_errors(checkpoint_dir, PROVENANCE_JSON):
            write_json_any(join(checkpoint_dir, PROVENANCE_JSON), provenance)
    for split in ("train", "val"):
        for record in history[split]:
            tensorboard.write(split, record)     # what an earlier attempt's folders may lack
    state = RunState(config, start_step, checkpoint_dir, tensorboard, history, val_batches, calibration,
                     step=start_step,
                     first_done_step=start_step, chief=chief)
    remaining = max(config.max_steps - start_step, 0)
    try:
        if val_batches is not None and start_step == 0:
            validate(trainer, state)      # the untrained starting point: the curves then show what training did
        train_start = time.monotonic()
        with Progress("training", total=remaining, unit="steps", every=math.inf, logger=log) as progress:
            if remaining:
                with placement.scope():      # jax: fit shards each batch over the devices
                    trainer.fit(train_batches, steps_per_epoch=remaining, epochs=1, verbose=0, shuffle=False,
                                callbacks=[TrainingProgress(state, progress)])
    finally:
        close()
        tensorboard.close()
    train_end = time.monotonic()
    if val_batches is not None and (not history["val"] or history["val"][-1]["step"] != state.step):
        validate(trainer, state)      # resumed at max_steps after a crash between checkpoint and export
        tensorboard.close()
    metrics = summary_metrics(state, train_end, train_end - train_start)

    final = evaluation_model(trainer, state)
    metadata = export.artifact_metadata(config, state.step, start_step=start_step, alignment=alignment,
                                        inputs=fingerprints,
                                        resumed_from=restored, precision=policy, replicas=placement.replicas,
                                        train_config=to_dict(config), metrics=metrics,
                                        backend=backend(), batch_norm_statistics={
                                            "source": "recalibrated on unaugmented training batches",
                                            "batches": len(state.calibration_images),
                                            "images": sum(len(x) for x in state.calibration_images)})
    if not chief:
        return metrics
    with no_space_named(Path(model_dir).parent, "the model artifact"):
        export.save_model_artifact(final, model_dir, metadata, {"train": history["train"], "val": history["val"]})
    log.info("trained %d steps (%d this run) at %.0f images/s; model in %s", state.step,
             state.step - start_step, metrics["images_per_second"], model_dir)
    return metrics
