"""Step 6: train the embedding network with online triplet mining on P x K batches; resumable.

One optimizer step: a P x K batch (P identities x K images, P x K sampling)
-> embeddings [P*K, D] on the unit sphere -> triplet loss mined inside the
batch (`config.loss`: batch_all, batch_hard or semi_hard; squared or plain L2
distances) -> Adam. The learning rate rises linearly over `warmup_steps`
(lr * (step + 1) / warmup_steps) and then stays constant or follows a cosine
from the peak down to 1% of it at `max_steps`.

One trainer for two Keras backends, chosen by KERAS_BACKEND before Keras is
imported: Keras's `fit` runs `EmbeddingTrainer` (a small keras.Model around
the embedding model whose `compute_loss` is the triplet loss and whose
`compute_metrics` are the batch statistics), and one callback
(`TrainingProgress`) checks, logs, validates and checkpoints.

- tensorflow: batches from tf.data (`data.make_train_dataset`); several GPUs
  through `tf.distribute.MirroredStrategy`: each replica gets P / replicas
  whole identities of the identity-major batch and mines triplets among them
  (per-replica mining, as in FaceNet's distributed training). Keras leaves a
  scalar loss of our own unscaled, so `compute_loss` divides it by the number
  of replicas R: the summed gradients are then (1/R) sum_r grad(loss_r), the
  single-device gradient of a batch-mean loss. p must be a multiple of R.
- jax: batches from `input.TrainBatches` (no TensorFlow anywhere on this
  path); the step is jitted; several devices through
  `keras.distribution.DataParallel` (the batch is sharded, the loss is that of
  the whole batch, mined over all of it).

Precision: float32, mixed_float16 (with dynamic loss scaling) or
mixed_bfloat16; "auto" picks mixed_float16 when a GPU is visible, float32
otherwise. The saved artifact is always a float32 model (mixed precision
keeps float32 master weights, so nothing is lost).

Every `log_every` steps a log line gives loss, fraction of positive
triplets, mean positive / negative distance, learning rate, images/s and ETA
(means over the steps since the previous line). Every `validate_every` steps
(and after the last step) the same metrics are computed on
`validation_batches` fixed P x K batches of real validation images, without
augmentation, by the model as it is exported (`evaluation_model`): a float32
copy whose batch-norm moving statistics are recalibrated on
BN_CALIBRATION_BATCHES fixed unaugmented train batches, since training's own
moving averages (momentum 0.99) lag the weights by hundreds of steps. Both are also TensorBoard scalars (`tensorboard_log.TensorBoardLog`:
train/<metric> with train/learning_rate and train/images_per_second, and
val/<metric>) in each folder of `tensorboard_dir`.

Fail fast (`TrainingMonitor`, on every step's values whatever `log_every`
is): a non-finite loss,
embedding collapse (negatives closer than half the margin for a window of
steps, or at the end of a run) or divergence raises FacenetError naming the
step and the setting to change; the step then fails and no model is exported
(unlike keras.callbacks.TerminateOnNaN, which ends `fit` as if it had succeeded).
A local checkpoint folder is locked (`training_lock`) while a training uses it.

Checkpoints go to `checkpoint_dir` every `checkpoint_every` steps as
`ckpt-<step>.npz` (`save_checkpoint`: the model's variables, the optimizer's
variables, its step counter included, and the step, as NumPy arrays, so a
checkpoint of either backend restores on the other), written atomically (a
gs:// URI works); the last two are kept, with the history so far and
`provenance.json`: the run key (the model output it trains for), the
fingerprints of the four inputs (`provenance.check_inputs`), the train
settings and the training code. A new call with the same checkpoint folder
resumes from the latest checkpoint only when all of these match: that is how
a retried pod continues. A checkpoint written for anything else is refused,
naming what differs, never resumed silently. Changing max_steps on resume is
allowed (the cosine schedule then follows the new length), as are the other
RESUMABLE_CHANGES. A damaged checkpoint file is skipped with a warning for
the previous checkpoint. The input stream resumes exactly (start_batch = the
restored step), and the learning rate follows the restored optimizer step.
(keras.callbacks.BackupAndRestore is not used: it restores the epoch only and
deletes its backup when `fit` ends.) Metrics and model.json give
`start_step`, the step this call began at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import zipfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from facenet_kfp import __version__
from facenet_kfp.config import TrainConfig, to_dict
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import (check_replaceable, delete, is_uri, join, list_names, no_space_error,
                                no_space_named, read_bytes, read_json_any, remove_stale_temps, write_bytes,
                                write_json_any)
from facenet_kfp.progress import Progress, _fmt_seconds
from facenet_kfp.tensorboard_log import TensorBoardLog

log = logging.getLogger(__name__)

COLLAPSE_MEAN_DISTANCE = 1e-3    # plain L2; random unit vectors in 128-D are ~1.41 apart
COLLAPSE_MAX_DISTANCE = 1e-6
COLLAPSE_STEPS = 20              # consecutive steps below COLLAPSE_MEAN_DISTANCE that count as collapse
# Negatives closer (plain L2) than this fraction of the margin's plain-L2 length, sqrt(margin) for squared
# distances: collapse (`collapse_negative_limit`). Seen: a collapsed demo run at 0.05 plain L2 in both units,
# healthy batch-hard runs no lower than 0.34 (squared) and 0.49 (plain) on their way down and up.
COLLAPSE_MARGIN_FRACTION = 0.5
COLLAPSE_END_STEPS = 5           # a run that ends with this many collapsed steps fails, however short it is
BN_CALIBRATION_BATCHES = 10      # unaugmented train batches that set the batch-norm statistics (validation, export)
TRAIN_LOCK = ".train.lock"       # in a local checkpoint folder: held (flock) by the training that uses it
DIVERGENCE_STEPS = 50            # steps per mean loss of the divergence check
HISTORY_JSON = "history.json"
PROVENANCE_JSON = "provenance.json"
CHECKPOINT_FORMAT = "facenet-kfp-checkpoint/2"
CHECKPOINTS_KEPT = 2
CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.npz")
TF_CHECKPOINT_NAME = re.compile(r"ckpt-\d+\.index")      # tf.train.Checkpoint files of earlier versions
# The modules whose code decides the trained weights (their source is part of a checkpoint's provenance).
TRAINING_MODULES = ("augment", "data", "input", "losses", "model", "train")
# Settings that may change between a run and its resumption: they do not change the model.
RESUMABLE_CHANGES = ("max_steps", "validate_every", "validation_batches", "checkpoint_every", "log_every")
STAT_KEYS = ("loss", "fraction_positive_triplets", "mean_positive_distance", "mean_negative_distance")


def backend() -> str:
    """The Keras backend this process trains with ("tensorflow" or "jax"; KERAS_BACKEND)."""
    name = keras.backend.backend()
    if name not in ("tensorflow", "jax"):
        raise InputError(f"KERAS_BACKEND={name}: the trainer runs on tensorflow or jax; set KERAS_BACKEND "
                         f"to one of them")
    return name


def _tf():
    import tensorflow as tf
    return tf


# ----------------------------------------------------------------------------- schedule

def learning_rate_at(step: float, peak: float, warmup_steps: int, max_steps: int, schedule: str,
                     final_fraction: float = 0.01) -> float:
    """Learning rate of step `step` (0-based), plain Python: the formula the schedule implements.

    warm-up factor w = min(1, (step + 1) / warmup_steps) (1 without warm-up);
    cosine factor c = f + (1 - f) * (1 + cos(pi * t)) / 2, with
    t = clip((step - warmup_steps) / (max_steps - warmup_steps), 0, 1) and f = final_fraction;
    lr = peak * w * c ("constant": c = 1).
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return peak * warm
    t = min(max((step - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0), 1.0)
    return peak * warm * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t)))


def make_schedule(config: TrainConfig):
    """A Keras LearningRateSchedule for `config` (see `learning_rate_at`)."""
    ops = keras.ops

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak, warmup_steps, max_steps, schedule, final_fraction=0.01):
            self.peak, self.warmup_steps, self.max_steps = peak, warmup_steps, max_steps
            self.schedule, self.final_fraction = schedule, final_fraction

        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = (ops.minimum((step + 1.0) / float(self.warmup_steps), 1.0)
                    if self.warmup_steps > 0 else ops.ones_like(step))
            if self.schedule == "constant":
                return self.peak * warm
            span = float(max(self.max_steps - self.warmup_steps, 1))
            t = ops.clip((step - float(self.warmup_steps)) / span, 0.0, 1.0)
            f = self.final_fraction
            return self.peak * warm * (f + (1.0 - f) * 0.5 * (1.0 + ops.cos(math.pi * t)))

        def get_config(self):
            return {"peak": self.peak, "warmup_steps": self.warmup_steps, "max_steps": self.max_steps,
                    "schedule": self.schedule, "final_fraction": self.final_fraction}

    return WarmupCosine(float(config.learning_rate), int(config.warmup_steps), int(config.max_steps),
                        config.lr_schedule)


# ----------------------------------------------------------------------------- loss and statistics

def batch_loss(config: TrainConfig, labels, embeddings) -> dict[str, Any]:
    """Loss and statistics of one batch, as float32 scalars.

    {"loss", "fraction_positive_triplets", "mean_positive_distance",
    "mean_negative_distance"} in the configured distance, plus
    "mean_pairwise_l2" / "max_pairwise_l2" (plain L2 over distinct rows) for
    the collapse check.
    """
    from keras import ops

    from facenet_kfp import losses

    embeddings = ops.cast(embeddings, "float32")
    if config.loss == "batch_all":
        loss, _ = losses.batch_all_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    elif config.loss == "batch_hard":
        loss = losses.batch_hard_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    else:
        loss = losses.semi_hard_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    out = {"loss": loss}
    out.update(losses.triplet_statistics(labels, embeddings, config.margin, config.squared))
    plain = losses.pairwise_distances(embeddings, squared=False)
    n = ops.cast(ops.shape(embeddings)[0], "float32")
    out["mean_pairwise_l2"] = ops.sum(plain) / ops.maximum(n * (n - 1.0), 1.0)
    out["max_pairwise_l2"] = ops.max(plain)
    return out


# ----------------------------------------------------------------------------- devices

def _gpus() -> list:
    if backend() == "jax":
        import jax
        return [d for d in jax.devices() if d.platform == "gpu"]
    return _tf().config.list_logical_devices("GPU")


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy name for a config precision ("auto": mixed_float16 on GPU, else float32)."""
    if precision == "auto":
        return "mixed_float16" if _gpus() else "float32"
    return precision


def distribution_strategy():
    """TensorFlow: MirroredStrategy over the visible GPUs when there are several, else the default strategy."""
    tf = _tf()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def jax_distribution():
    """JAX: keras.distribution.DataParallel over the devices when there are several, else None."""
    devices = keras.distribution.list_devices()
    return keras.distribution.DataParallel(devices=devices) if len(devices) > 1 else None


class Placement:
    """Where the model lives: a tf.distribute strategy (tensorflow) or a keras.distribution (jax)."""

    def __init__(self):
        if backend() == "tensorflow":
            self.strategy, self.distribution = distribution_strategy(), None
            self.replicas = self.strategy.num_replicas_in_sync
        else:
            self.strategy, self.distribution = None, jax_distribution()
            self.replicas = len(self.distribution.device_mesh.devices.flatten()) if self.distribution else 1

    def scope(self):
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the Keras model that trains

class EmbeddingTrainer(keras.Model):
    """`fit`-able wrapper of an embedding model: loss and statistics of each P x K batch.

    `statistics(labels, embeddings)` returns a dict of float32 scalars with
    "loss" (`batch_loss`). `compute_loss` is that loss divided by `replicas`
    (Keras does not scale a scalar loss it did not compute itself, and the
    replicas' gradients are summed); `compute_metrics` returns the statistics
    of the step (averaged over replicas by `fit`), so each step's callback
    logs hold that step's values, not running means.
    """

    def __init__(self, embedding: keras.Model, statistics, replicas: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.embedding, self.statistics, self.replicas = embedding, statistics, int(replicas)

    def call(self, inputs, training=False):
        return self.embedding(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.statistics(y, y_pred)["loss"] / float(self.replicas)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.statistics(y, y_pred)


def build_trainer(config: TrainConfig, policy: str, placement: Placement) -> EmbeddingTrainer:
    """The embedding model (seeded by config.seed, in `policy`) in an EmbeddingTrainer, compiled and built."""
    from facenet_kfp import model as model_mod

    previous_policy = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(config.seed)
    try:
        keras.mixed_precision.set_global_policy(policy)
        with placement.scope():
            embedding = model_mod.build_embedding_model((config.image_size, config.image_size, 3),
                                                        config.embedding_dim, config.architecture)
            trainer = EmbeddingTrainer(embedding, lambda y, e: batch_loss(config, y, e), placement.replicas)
            optimizer = keras.optimizers.Adam(learning_rate=make_schedule(config))
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            trainer.compile(optimizer=optimizer, jit_compile=backend() == "jax")
            optimizer.build(trainer.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return trainer


# ----------------------------------------------------------------------------- checkpoints

def _sync(trainer: keras.Model) -> None:
    """Make the Keras variables hold the training state (under JAX, `fit` keeps it outside them)."""
    if backend() == "jax":
        trainer.jax_state_sync()


def checkpoint_steps(checkpoint_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoints in a folder, oldest first."""
    found = [(int(m.group(1)), join(checkpoint_dir, name)) for name in list_names(checkpoint_dir)
             if (m := CHECKPOINT_NAME.fullmatch(name))]
    return sorted(found)


def checkpoint_arrays(trainer: keras.Model, step: int) -> dict[str, np.ndarray]:
    """{"step", "model/<i>", "optimizer/<i>", "names"}: the training state as NumPy arrays."""
    _sync(trainer)
    arrays = {"step": np.asarray(step, np.int64)}
    names = {"model": [v.path for v in trainer.embedding.weights],
             "optimizer": [v.path for v in trainer.optimizer.variables]}
    for i, v in enumerate(trainer.embedding.weights):
        arrays[f"model/{i:04d}"] = keras.ops.convert_to_numpy(v)
    for i, v in enumerate(trainer.optimizer.variables):
        arrays[f"optimizer/{i:04d}"] = keras.ops.convert_to_numpy(v)
    arrays["names"] = np.asarray(json.dumps({"format": CHECKPOINT_FORMAT, **names}))
    return arrays


def save_checkpoint(checkpoint_dir: str, trainer: keras.Model, step: int) -> str:
    """Write `ckpt-<step>.npz` atomically, keep the last CHECKPOINTS_KEPT; its path."""
    buffer = io.BytesIO()
    np.savez(buffer, **checkpoint_arrays(trainer, step))
    path = join(checkpoint_dir, f"ckpt-{step}.npz")
    write_bytes(path, buffer.getvalue())
    for _, old in checkpoint_steps(checkpoint_dir)[:-CHECKPOINTS_KEPT]:
        delete(old)
    return path


def load_checkpoint(path: str, trainer: keras.Model) -> int:
    """Assign a checkpoint's arrays to the trainer's model and optimizer variables; its step.

    ValueError (or a zip / I/O error) when the file is damaged or holds
    other variables than the trainer has.
    """
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"{path} is gone")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        values = {key: arrays[key] for key in arrays.files}
    for kind, variables in (("model", trainer.embedding.weights), ("optimizer", trainer.optimizer.variables)):
        stored = sorted(k for k in values if k.startswith(f"{kind}/"))
        if len(stored) != len(variables):
            raise ValueError(f"{len(stored)} {kind} arrays for {len(variables)} variables")
        for key, variable in zip(stored, variables):
            if tuple(values[key].shape) != tuple(variable.shape):
                raise ValueError(f"{key} has shape {values[key].shape}, {variable.path} {variable.shape}")
    for kind, variables in (("model", trainer.embedding.weights), ("optimizer", trainer.optimizer.variables)):
        for i, variable in enumerate(variables):
            variable.assign(values[f"{kind}/{i:04d}"])
    return int(values["step"])


def restore_latest(checkpoint_dir: str, trainer: keras.Model) -> tuple[str | None, int]:
    """(path, step) of the newest readable checkpoint, restored into `trainer`; (None, 0) when there is none.

    A damaged checkpoint (truncated, unreadable or of other variables) is
    skipped with a warning for the previous one; when none can be read,
    InputError names each and what failed.
    """
    failures = []
    for _, path in reversed(checkpoint_steps(checkpoint_dir)):
        try:
            step = load_checkpoint(path, trainer)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures.append(f"{path}: {reason}")
            log.warning("cannot restore checkpoint %s: %s; trying the previous checkpoint", path, reason)
            continue
        if failures:
            log.warning("resuming from the previous checkpoint %s instead", path)
        return path, step
    if failures:
        raise InputError(f"{checkpoint_dir}: no checkpoint can be restored ({'; '.join(failures)}); "
                         f"delete {checkpoint_dir} to train from step 0")
    return None, 0


# ----------------------------------------------------------------------------- checkpoint folder

def default_checkpoint_dir(model_dir: str | os.PathLike) -> str:
    """`<model_dir>.ckpt`, next to the model folder (outside it: the model folder is replaced whole)."""
    model_dir = Path(model_dir)
    return str(model_dir.parent / (model_dir.name + ".ckpt"))


def code_fingerprint() -> dict[str, str]:
    """{"version": facenet-kfp version, "sha256": of the TRAINING_MODULES' source}: the code that trains."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for name in TRAINING_MODULES:
        digest.update(name.encode() + b"\0" + (package / f"{name}.py").read_bytes() + b"\0")
    return {"version": __version__, "sha256": digest.hexdigest()}


def checkpoint_provenance(run_key: str, inputs: dict[str, str], config: TrainConfig) -> dict[str, Any]:
    """What provenance.json of a checkpoint folder records: run key, input fingerprints, settings, code."""
    return {"format": CHECKPOINT_FORMAT, "run": run_key, "inputs": dict(inputs), "train": to_dict(config),
            "code": code_fingerprint()}


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else repr(value)


def provenance_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every recorded item that must match for a resume (none: resumable)."""
    found = []
    if saved.get("run") != current["run"]:
        found.append(f"run: {saved.get('run')!r} -> {current['run']!r}")
    saved_inputs = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    for kind in sorted(set(saved_inputs) | set(current["inputs"])):
        if saved_inputs.get(kind) != current["inputs"].get(kind):
            found.append(f"inputs.{kind}: {_short(saved_inputs.get(kind))} -> "
                         f"{_short(current['inputs'].get(kind))}")
    saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    for key, value in current["train"].items():
        if key not in RESUMABLE_CHANGES and saved_train.get(key) != value:
            found.append(f"{key}: {saved_train.get(key)!r} -> {value!r}")
    saved_code = saved.get("code") if isinstance(saved.get("code"), dict) else {}
    for key, value in current["code"].items():
        if saved_code.get(key) != value:
            found.append(f"code {key}: {_short(saved_code.get(key))} -> {_short(value)}")
    return found


def _check_resume(checkpoint_dir: str, current: dict[str, Any]) -> None:
    """Refuse a checkpoint that was not written for this run, these inputs, settings and code."""
    path = f"{checkpoint_dir.rstrip('/')}/{PROVENANCE_JSON}"
    saved = read_json_any(path)
    todo = (f"delete {checkpoint_dir} to train from step 0, or choose another checkpoint folder "
            f"(train --checkpoint-dir, or cluster.checkpoint_root)")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        what = "not found" if saved is None else f"not a {CHECKPOINT_FORMAT} record"
        raise InputError(f"{path}: {what}, so nothing says which inputs and settings made the checkpoint "
                         f"in {checkpoint_dir}; {todo}")
    differences = provenance_differences(saved, current)
    if differences:
        raise InputError(f"{checkpoint_dir}: the checkpoint was written for other inputs or settings "
                         f"({'; '.join(differences)}); resuming it would continue another model; {todo}")


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
    """tensorflow: tf.data P x K batches (`data.make_train_dataset`) over the train split, read from the
    shards by offset as batches are drawn (`input.open_split`), so memory does not grow with the dataset."""
    from facenet_kfp.data import make_train_dataset
    from facenet_kfp.input import open_split

    split = open_split(dataset_dir, completion_dir or None, labels_dir, splits_dir, "train")
    try:
        _check_train_split(split.labels, split.synthetic, splits_dir, config, replicas)
        val_batches = _validation_batches(dataset_dir, labels_dir, splits_dir, config, lambda images, labels, p: [
            (x.numpy(), y.numpy()) for x, y in make_train_dataset(
                images, labels, p, config.k, config.image_size, config.crop_fraction, False,
                config.seed).take(config.validation_batches)])
        calibration = [x.numpy() for x, _ in make_train_dataset(
            split, split.labels, config.p, config.k, config.image_size, config.crop_fraction, False,
            config.seed).take(BN_CALIBRATION_BATCHES)]
    except BaseException:
        split.close()
        raise
    train = make_train_dataset(split, split.labels, config.p, config.k, config.image_size, config.crop_fraction,
                               config.augment, config.seed, start_batch=start_step)
    return train, val_batches, calibration, split.close


def _jax_batches(dataset_dir, completion_dir, labels_dir, splits_dir, config: TrainConfig, replicas: int,
                 start_step: int):
    """jax: `input.TrainBatches` (no TensorFlow), reading the train split from the shards by offset."""
    from facenet_kfp.input import TrainBatches, open_split

    def validation(images, labels, p):
        with TrainBatches(images, labels, p, config.k, config.image_size, config.crop_fraction, False,
                          config.seed, workers=0) as batches:
            return [next(batches) for _ in range(config.validation_batches)]

    split = open_split(dataset_dir, completion_dir or None, labels_dir, splits_dir, "train")
    try:
        _check_train_split(split.labels, split.synthetic, splits_dir, config, replicas)
        val_batches = _validation_batches(dataset_dir, labels_dir, splits_dir, config, validation)
        with TrainBatches(split, split.labels, config.p, config.k, config.image_size, config.crop_fraction,
                          False, config.seed, workers=0) as batches:
            calibration = [next(batches)[0] for _ in range(BN_CALIBRATION_BATCHES)]
    except BaseException:
        split.close()
        raise
    stream = TrainBatches(split, split.labels, config.p, config.k, config.image_size, config.crop_fraction,
                          config.augment, config.seed, start_batch=start_step)

    def close() -> None:
        stream.close()
        split.close()
    return (batch for batch in stream), val_batches, calibration, close      # fit takes a generator, not an iterator


def _check_train_split(labels, synthetic, splits_dir, config: TrainConfig, replicas: int) -> None:
    identities = np.unique(labels)
    if len(identities) < config.p:
        raise InputError(f"{Path(splits_dir) / 'train.txt'}: split 'train' has {len(identities)} identities "
                         f"with images, fewer than p={config.p} identities per batch")
    short = int(np.sum(np.bincount(np.searchsorted(identities, labels)) < config.k))
    log.info("train: %d images (%d generated) of %d identities; %d identities have fewer than k=%d "
             "images and are sampled with replacement", len(labels), int(np.sum(synthetic)), len(identities),
             short, config.k)
    if config.p % replicas:
        raise InputError(f"train.p={config.p} must be a multiple of the {replicas} GPUs "
                         f"(each replica mines triplets among whole identities)")


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
    from facenet_kfp.input import open_split
    with open_split(dataset_dir, None, labels_dir, splits_dir, "val", include_synthetic=False) as split:
        val_labels = split.labels
        val_ids, counts = np.unique(val_labels, return_counts=True)
        keep = np.isin(val_labels, val_ids[counts >= 2])
        n_val = int(np.sum(counts >= 2))
        if n_val < 2:
            raise InputError(f"{Path(splits_dir) / 'val.txt'}: validation needs 2 identities with at least "
                             f"2 real images, found {n_val} (set validate_every: 0 to train without it)")
        return make_batches(_Subset(split, np.flatnonzero(keep)), val_labels[keep], min(config.p, n_val))


# ----------------------------------------------------------------------------- monitor

def collapse_negative_limit(config: TrainConfig) -> float:
    """Mean negative distance, in the configured distance's units, below which the embeddings count as collapsed.

    The limit is a plain-L2 length, COLLAPSE_MARGIN_FRACTION times the margin's
    plain-L2 length (sqrt(margin) when train.squared, else margin), written in
    the units of `mean_negative_distance`: f * margin for plain L2 and
    f^2 * margin for squared L2 (margin 0.2: 0.1 plain, 0.05 squared).
    """
    f = COLLAPSE_MARGIN_FRACTION
    return f * f * config.margin if config.squared else f * config.margin


class TrainingMonitor:
    """Fail-fast checks on the values of each training step, as plain floats (no backend needed).

    `update(step, values)` takes step `step`'s (1-based) "loss", "mean_negative_distance" (in the
    configured distance), "mean_pairwise_l2" and "max_pairwise_l2" (plain L2 between the batch's
    embeddings, `batch_loss`) and raises FacenetError naming the step and the setting to change when

    - the loss is not finite (NaN or infinite weights or activations);
    - the embeddings collapse: the largest distance is below COLLAPSE_MAX_DISTANCE (all at one
      point), or the mean distance stays below COLLAPSE_MEAN_DISTANCE for COLLAPSE_STEPS
      consecutive steps, or the mean negative distance stays below `collapse_negative_limit`
      (half the margin, as a plain-L2 length) for COLLAPSE_STEPS consecutive steps: different
      people's embeddings closer than the margin asks, the loss pinned at the margin, nothing learnt;
    - training diverges: the mean loss over the last DIVERGENCE_STEPS steps is more than one
      `margin` above the lowest such mean so far. The triplet loss of unit vectors is bounded
      (at most 4 + margin), so divergence shows as a lasting rise, not a blow-up; a healthy
      run's windowed loss falls from about the margin towards 0 with ripples far below a margin.

    `finish(step)` after the last step of a call: a run that ends with at least COLLAPSE_END_STEPS
    collapsed steps fails too, so a short run (shorter than the window) is not exported collapsed.

    The windows count steps, whatever `log_every` is; a resumed call starts them afresh.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.low_distance_run = 0
        self.low_negative_run = 0
        self.last_negative = math.nan
        self.losses: deque[float] = deque(maxlen=DIVERGENCE_STEPS)
        self.best: tuple[float, int] | None = None        # lowest windowed mean loss, its last step

    def learning_rate(self, step: int) -> float:
        """The learning rate step `step` (1-based) trained with."""
        c = self.config
        return learning_rate_at(step - 1, c.learning_rate, c.warmup_steps, c.max_steps, c.lr_schedule)

    def _negative_collapse(self, step: int, steps: int, ended: bool) -> FacenetError:
        limit, unit = collapse_negative_limit(self.config), "squared L2" if self.config.squared else "L2"
        when = "the run ended with it" if ended else "it stayed there"
        return FacenetError(
            f"embedding collapse at step {step}: the mean distance between different people's embeddings "
            f"({unit}) was below {limit:.3g} (half of train.margin={self.config.margin:g} as an L2 length) for "
            f"the last {steps} steps, {self.last_negative:.3g} at the last, and {when}: the loss stays at "
            f"the margin and nothing is learnt; lower train.learning_rate (now "
            f"{self.learning_rate(step):.3g}) or raise train.warmup_steps")

    def update(self, step: int, values: dict[str, float]) -> None:
        loss, lr = values["loss"], self.learning_rate(step)
        if not math.isfinite(loss):
            raise FacenetError(f"loss is {loss} at step {step} (learning rate {lr:.3g}): training diverged; "
                               f"lower train.learning_rate or use precision: float32")
        if values["max_pairwise_l2"] < COLLAPSE_MAX_DISTANCE:
            raise FacenetError(f"embedding collapse at step {step}: all embeddings of the batch are at one "
                               f"point (largest distance {values['max_pairwise_l2']:.2e}); lower "
                               f"train.learning_rate (now {lr:.3g})")
        low = values["mean_pairwise_l2"] < COLLAPSE_MEAN_DISTANCE
        self.low_distance_run = self.low_distance_run + 1 if low else 0
        if self.low_distance_run >= COLLAPSE_STEPS:
            raise FacenetError(f"embedding collapse at step {step}: mean distance between embeddings below "
                               f"{COLLAPSE_MEAN_DISTANCE} for {self.low_distance_run} steps; lower "
                               f"train.learning_rate (now {lr:.3g})")
        self.last_negative = values["mean_negative_distance"]
        near = self.last_negative < collapse_negative_limit(self.config)
        self.low_negative_run = self.low_negative_run + 1 if near else 0
        if self.low_negative_run >= COLLAPSE_STEPS:
            raise self._negative_collapse(step, self.low_negative_run, ended=False)
        self.losses.append(loss)
        if len(self.losses) < DIVERGENCE_STEPS:
            return
        mean = sum(self.losses) / DIVERGENCE_STEPS
        if self.best is None or mean < self.best[0]:
            self.best = (mean, step)
        elif mean > self.best[0] + self.config.margin:
            best, at = self.best
            raise FacenetError(f"training diverged at step {step}: the mean loss of steps "
                               f"{step - DIVERGENCE_STEPS + 1}-{step} is {mean:.4g}, up from {best:.4g} "
                               f"(steps {at - DIVERGENCE_STEPS + 1}-{at}), more than train.margin="
                               f"{self.config.margin:g} higher; lower train.learning_rate (now {lr:.3g}) "
                               f"or raise train.warmup_steps")

    def finish(self, step: int) -> None:
        """After the last step of a call: FacenetError when the run ends collapsed (see the class)."""
        if self.low_negative_run >= COLLAPSE_END_STEPS:
            raise self._negative_collapse(step, self.low_negative_run, ended=True)


# ----------------------------------------------------------------------------- one callback per run

@dataclasses.dataclass
class RunState:
    """What a training call knows besides the variables: its steps, history and timing."""
    config: TrainConfig
    start_step: int
    checkpoint_dir: str
    tensorboard: TensorBoardLog
    history: dict[str, list[dict[str, float]]]
    val_batches: list | None = None
    calibration_images: list = dataclasses.field(default_factory=list)   # `evaluation_model`'s batches
    step: int = 0
    first_done_time: float | None = None      # after the first (traced) step
    first_done_step: int = 0
    paused: float = 0.0                       # seconds in validation and checkpoints since then
    evaluation: keras.Model | None = None     # `evaluation_model`'s copy, built once


def evaluation_model(trainer: keras.Model, state: RunState) -> keras.Model:
    """The model as it will be exported: a float32 copy of the trained embedding model whose batch-norm
    moving statistics are recalibrated (`model.calibrate_batch_norm`) on `state.calibration_images`.

    Training's own moving statistics (an exponential average with momentum
    0.99) lag far behind the weights in the first few hundred steps, so
    inference-mode embeddings of a short run would sit at a fraction of the
    distances training sees. The trainer's variables are not touched: the
    checkpoints, and a resumed run, hold training's state as it is.
    """
    from facenet_kfp.model import calibrate_batch_norm

    if state.evaluation is None:
        state.evaluation = float32_model(trainer, state.config)
    else:
        _sync(trainer)
        state.evaluation.set_weights([keras.ops.convert_to_numpy(v) for v in trainer.embedding.weights])
    calibrate_batch_norm(state.evaluation, state.calibration_images)
    return state.evaluation


def validate(trainer: keras.Model, state: RunState) -> dict[str, float]:
    """The mean statistics of the fixed validation batches at the current step, computed with the model as it
    would be exported (`evaluation_model`); in history and TensorBoard."""
    model = evaluation_model(trainer, state)
    sums = {k: 0.0 for k in STAT_KEYS}
    for images, labels in state.val_batches:
        out = batch_loss(state.config, labels, model.predict(images, batch_size=len(images), verbose=0))
        for k in STAT_KEYS:
            sums[k] += float(out[k])
    step, batches = state.step, len(state.val_batches)
    record = {"step": step, **{k: v / batches for k, v in sums.items()}}
    if not math.isfinite(record["loss"]):
        raise FacenetError(f"validation loss is {record['loss']} at step {step}: the model produces "
                           f"non-finite embeddings; lower train.learning_rate")
    state.history["val"].append(record)
    log.info("validation at step %d (%d batches): loss %.4f, positive triplets %.3f, d+ %.4f, d- %.4f", step,
             batches, record["loss"], record["fraction_positive_triplets"], record["mean_positive_distance"],
             record["mean_negative_distance"])
    state.tensorboard.write("val", record)
    return record


class TrainingProgress(keras.callbacks.Callback):
    """After each step: fail fast, log, validate and checkpoint on their schedules (in that order).

    Keras hands each step's statistics to the callback as Python floats (it
    reads them back from the device at every step: this callback validates and
    checkpoints, so it is not one Keras may run in a thread while training
    goes on). `TrainingMonitor` checks every step; its FacenetError ends `fit`
    with the step failed. Validation and checkpoints do not count in images/s.
    """

    def __init__(self, state: RunState, progress: Progress):
        super().__init__()
        self.state, self.progress = state, progress
        self.monitor = TrainingMonitor(state.config)
        self.window: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
        self.window_start, self.window_steps = time.monotonic(), 0

    def on_train_batch_end(self, batch, logs=None):
        state, config = self.state, self.state.config
        state.step = state.start_step + batch + 1
        values = {k: float(v) for k, v in logs.items()}
        self.monitor.update(state.step, values)
        last = state.step == config.max_steps
        if last:
            self.monitor.finish(state.step)          # before its checkpoint: nothing collapsed is kept
        for k in STAT_KEYS:
            self.window[k].append(values[k])
        self.window_steps += 1
        self.progress.update()
        if state.first_done_time is None:          # the first step traced the step function: not in the rate
            state.first_done_time, state.first_done_step = time.monotonic(), state.step
            self.window_start, self.window_steps = state.first_done_time, 0
        if state.step % config.log_every == 0 or last:
            self.log_line()
        paused = time.monotonic()
        if state.val_batches is not None and (state.step % config.validate_every == 0 or last):
            validate(self.model, state)
        if state.step % config.checkpoint_every == 0 or last:
            self.checkpoint()
        paused = time.monotonic() - paused
        self.window_start += paused
        state.paused += paused

    def log_line(self) -> None:
        state, config = self.state, self.state.config
        batch_size = config.p * config.k
        now = time.monotonic()
        rate = (self.window_steps * batch_size / max(now - self.window_start, 1e-9) if self.window_steps
                else math.nan)
        record = {"step": state.step, **{k: float(np.mean(v)) for k, v in self.window.items()},
                  "learning_rate": self.monitor.learning_rate(state.step)}
        state.history["train"].append(record)
        eta = (_fmt_seconds((config.max_steps - state.step) * batch_size / rate)
               if math.isfinite(rate) and rate > 0 else "?")
        log.info("step %d/%d: loss %.4f, positive triplets %.3f, d+ %.4f, d- %.4f, lr %.3g, %.0f images/s, "
                 "ETA %s", state.step, config.max_steps, record["loss"], record["fraction_positive_triplets"],
                 record["mean_positive_distance"], record["mean_negative_distance"], record["learning_rate"],
                 rate, eta)
        state.tensorboard.write("train", {**record, "images_per_second": rate})
        self.window = {k: [] for k in STAT_KEYS}
        self.window_start, self.window_steps = time.monotonic(), 0

    def checkpoint(self) -> None:
        state = self.state
        with _checkpoint_errors(state.checkpoint_dir, f"the checkpoint of step {state.step}"):
            path = save_checkpoint(state.checkpoint_dir, self.model, state.step)
            write_json_any(join(state.checkpoint_dir, HISTORY_JSON), {"step": state.step, **state.history})
        log.info("checkpoint %s", path)


@contextlib.contextmanager
def _checkpoint_errors(checkpoint_dir: str, what: str):
    """A full disk or another OS error while writing `what` to the checkpoint folder -> FacenetError naming
    the folder ("no space left on <folder>" for a full disk, however deeply the OSError is nested)."""
    guard = contextlib.nullcontext() if is_uri(checkpoint_dir) else no_space_named(checkpoint_dir, what)
    with guard:
        try:
            yield
        except OSError as exc:
            if no_space_error(exc) is not None:
                raise
            where = exc.filename or checkpoint_dir
            raise FacenetError(f"{checkpoint_dir}: cannot write {what} "
                               f"({where}: {exc.strerror or exc}); choose another checkpoint folder "
                               f"(train --checkpoint-dir, or cluster.checkpoint_root)") from exc


# ----------------------------------------------------------------------------- summary and export

def summary_metrics(state: RunState, train_end: float, train_seconds: float) -> dict[str, float]:
    """The returned metrics: steps, start_step, images/s, time, learning rate, last train and val values."""
    config, history = state.config, state.history
    batch_size = config.p * config.k
    timed_steps = state.step - state.first_done_step
    images_per_second = (timed_steps * batch_size / (train_end - state.first_done_time - state.paused)
                         if state.first_done_time is not None and timed_steps > 0 else 0.0)
    metrics: dict[str, float] = {
        "steps": state.step, "start_step": state.start_step, "images_per_second": images_per_second,
        "train_seconds": train_seconds,
        "learning_rate": learning_rate_at(max(state.step - 1, 0), config.learning_rate, config.warmup_steps,
                                          config.max_steps, config.lr_schedule)}
    if history["train"]:
        last_train = history["train"][-1]
        metrics.update({"train_loss": last_train["loss"],
                        "train_fraction_positive": last_train["fraction_positive_triplets"],
                        "train_mean_positive_distance": last_train["mean_positive_distance"],
                        "train_mean_negative_distance": last_train["mean_negative_distance"]})
    if history["val"]:
        first_val, last_val = history["val"][0], history["val"][-1]
        metrics.update({"first_val_step": first_val["step"], "first_val_loss": first_val["loss"],
                        "first_val_fraction_positive": first_val["fraction_positive_triplets"]})
        metrics.update({"val_loss": last_val["loss"],
                        "val_fraction_positive": last_val["fraction_positive_triplets"],
                        "val_mean_positive_distance": last_val["mean_positive_distance"],
                        "val_mean_negative_distance": last_val["mean_negative_distance"]})
    return metrics


def float32_model(trainer: EmbeddingTrainer, config: TrainConfig) -> keras.Model:
    """A plain float32 copy of the trained embedding model, outside any distribution."""
    from facenet_kfp import model as model_mod

    _sync(trainer)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        final = model_mod.build_embedding_model((config.image_size, config.image_size, 3), config.embedding_dim,
                                                config.architecture)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    final.set_weights([keras.ops.convert_to_numpy(v) for v in trainer.embedding.weights])
    return final


# ----------------------------------------------------------------------------- training

def _read_history(path: str, checkpoint_dir: str) -> dict[str, Any]:
    """history.json of a checkpoint folder ({} when there is none): {"step": int, "train": [records],
    "val": [records]}, each record an object with an integer "step" and numbers; InputError naming the
    file when it is anything else."""
    saved = read_json_any(path)
    if saved is None:
        return {}
    todo = f"delete {checkpoint_dir} to train from step 0, or restore the file"
    if not isinstance(saved, dict):
        raise InputError(f"{path}: the training history is a JSON {type(saved).__name__}, not an object with "
                         f"step, train and val; {todo}")
    if isinstance(saved.get("step"), bool) or not isinstance(saved.get("step"), int):
        raise InputError(f"{path}: the training history has no integer step (got {saved.get('step')!r}); "
                         f"{todo}")
    for split in ("train", "val"):
        records = saved.get(split, [])
        if not isinstance(records, list):
            raise InputError(f"{path}: {split} is a JSON {type(records).__name__}, not a list of records; {todo}")
        for i, record in enumerate(records):
            if (not isinstance(record, dict) or isinstance(record.get("step"), bool)
                    or not isinstance(record.get("step"), int)):
                raise InputError(f"{path}: {split}[{i}] is not a record with an integer step ({record!r:.80}); "
                                 f"{todo}")
    return saved


def _restore(trainer, checkpoint_dir: str, provenance: dict[str, Any], config: TrainConfig):
    """(path restored or None, start step, history up to it) from the checkpoint folder."""
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    older = [name for name in list_names(checkpoint_dir) if TF_CHECKPOINT_NAME.fullmatch(name)]
    if older:
        raise InputError(f"{checkpoint_dir}: holds {older[-1]}, a TensorFlow checkpoint of an earlier version "
                         f"of the trainer, which this one cannot resume; delete {checkpoint_dir} to train from "
                         f"step 0, or choose another checkpoint folder")
    if not checkpoint_steps(checkpoint_dir):
        log.info("no checkpoint in %s: starting at step 0", checkpoint_dir)
        return None, 0, history
    _check_resume(checkpoint_dir, provenance)
    restored, start_step = restore_latest(checkpoint_dir, trainer)
    saved = _read_history(join(checkpoint_dir, HISTORY_JSON), checkpoint_dir)
    for split in ("train", "val"):
        history[split] = [r for r in saved.get(split, []) if r["step"] <= start_step]
    log.info("resuming from checkpoint %s at step %d of %d", restored, start_step, config.max_steps)
    if start_step >= config.max_steps:
        log.warning("the checkpoint in %s is at step %d, max_steps is %d: saving it as the model without "
                    "training; delete %s to train again", checkpoint_dir, start_step, config.max_steps,
                    checkpoint_dir)
    return restored, start_step, history


def _check_folder(folder: str, what: str, option: str) -> None:
    """InputError when a local output folder's path is a file (or a link to one)."""
    if not is_uri(folder) and (Path(folder).exists() or Path(folder).is_symlink()) and not Path(folder).is_dir():
        raise InputError(f"{folder}: the {what} is a file, not a folder; give the path of a new or existing "
                         f"folder ({option}), or move the file away")


_TEMP_NAME = re.compile(r"\.(.+)\.tmp-\d+-[0-9a-f]{8}")      # what fsutil.atomic_file / atomic_dir write


def _remove_stale_temps_in(folder: str) -> None:
    """Remove the temporary files that killed writers left in a local folder (`fsutil.remove_stale_temps`:
    only those of processes that no longer run)."""
    if is_uri(folder) or not Path(folder).is_dir():
        return
    targets = {m.group(1) for path in Path(folder).iterdir() if (m := _TEMP_NAME.fullmatch(path.name))}
    for name in sorted(targets):
        remove_stale_temps(Path(folder) / name)


@contextlib.contextmanager
def training_lock(checkpoint_dir: str):
    """Hold an exclusive lock on a local checkpoint folder while training: a second training on the same
    folder (the same --out, a task and its stray twin) is refused, naming the holder.

    The lock is `flock` on `<checkpoint_dir>/.train.lock`, which holds the holder's pid, host and start
    time; the system releases it when the holder ends, killed or not, so a stale lock never blocks a
    retry. A gs:// checkpoint folder is not locked: the pipeline runs one train task per model output,
    and its retries run one after another.
    """
    if is_uri(checkpoint_dir):
        log.info("%s: a gs:// checkpoint folder is not locked; run one training at a time on it", checkpoint_dir)
        yield
        return
    import errno
    import fcntl
    import socket

    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRAIN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise InputError(f"{checkpoint_dir}: another training is using this checkpoint folder "
                             f"({_lock_holder(path)}); wait for it to end, or give this training another "
                             f"output (--out) or checkpoint folder (--checkpoint-dir)") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: this file system cannot lock %s (%s): a second training on this folder at the "
                        "same time would not be refused", checkpoint_dir, path, exc.strerror)
            locked = False
        if locked:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)          # releases the lock


def _lock_holder(path: Path) -> str:
    """'pid 123 on host h since <time>' from a lock file, or what is known."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        return f"its holder has not written {path} yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}; "
            f"lock file {path}")


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
    input fingerprints, settings and code (see the module docstring).

    tensorboard_dir: a folder (path or gs://) or several (a KFP task writes its
    tensorboard artifact and its folder under tensorboard_root) that each get
    this run's TensorBoard events, the restored history included
    (`TensorBoardLog`); a folder of another run key is refused.
    """
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
    with training_lock(checkpoint_dir):
        for folder in (checkpoint_dir, *tensorboard_dirs):
            _remove_stale_temps_in(folder)
        remove_stale_temps(model_dir)
        return _train_locked(dataset_dir, completion_dir, labels_dir, splits_dir, model_dir, config,
                             checkpoint_dir, tensorboard_dirs, run_key, fingerprints, placement, provenance)


def _train_locked(dataset_dir, completion_dir, labels_dir, splits_dir, model_dir, config: TrainConfig,
                  checkpoint_dir: str, tensorboard_dirs: list[str], run_key: str, fingerprints: dict[str, str],
                  placement: Placement, provenance: dict[str, Any]) -> dict[str, float]:
    """`train` from the TensorBoard folders on, with the checkpoint folder's lock held."""
    from facenet_kfp import export

    tensorboard = TensorBoardLog(tensorboard_dirs, run_key)

    policy = resolve_precision(config.precision)
    trainer = build_trainer(config, policy, placement)
    log.info("model %s: %d parameters, backend %s, precision %s, %d replica(s), batch %d = P %d x K %d",
             trainer.embedding.name, trainer.embedding.count_params(), backend(), policy, placement.replicas,
             config.p * config.k, config.p, config.k)
    restored, start_step, history = _restore(trainer, checkpoint_dir, provenance, config)
    train_batches, val_batches, calibration, close = _train_and_validation_batches(
        dataset_dir, completion_dir, labels_dir, splits_dir, config, placement.replicas, start_step)
    with _checkpoint_errors(checkpoint_dir, PROVENANCE_JSON):
        write_json_any(join(checkpoint_dir, PROVENANCE_JSON), provenance)
    for split in ("train", "val"):
        for record in history[split]:
            tensorboard.write(split, record)     # what an earlier attempt's folders may lack
    state = RunState(config, start_step, checkpoint_dir, tensorboard, history, val_batches, calibration,
                     step=start_step,
                     first_done_step=start_step)
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
    metadata = export.artifact_metadata(config, state.step, start_step=start_step, inputs=fingerprints,
                                        resumed_from=restored, precision=policy, replicas=placement.replicas,
                                        train_config=to_dict(config), metrics=metrics,
                                        backend=backend(), batch_norm_statistics={
                                            "source": "recalibrated on unaugmented training batches",
                                            "batches": len(state.calibration_images),
                                            "images": sum(len(x) for x in state.calibration_images)})
    with no_space_named(Path(model_dir).parent, "the model artifact"):
        export.save_model_artifact(final, model_dir, metadata, {"train": history["train"], "val": history["val"]})
    log.info("trained %d steps (%d this run) at %.0f images/s; model in %s", state.step,
             state.step - start_step, metrics["images_per_second"], model_dir)
    return metrics
