"""Step 6: train the embedding network with online triplet mining on P x K batches; resumable.

One optimizer step: a P x K batch (P identities x K images, `data.PKSampler`)
-> embeddings [P*K, D] on the unit sphere -> triplet loss mined inside the
batch (`config.loss`: batch_all, batch_hard or semi_hard; squared or plain L2
distances) -> Adam. The learning rate rises linearly over `warmup_steps`
(lr * (step + 1) / warmup_steps) and then stays constant or follows a cosine
from the peak down to 1% of it at `max_steps`.

Precision: float32, mixed_float16 (with dynamic loss scaling) or
mixed_bfloat16; "auto" picks mixed_float16 when a GPU is visible, float32
otherwise. The saved artifact is always a float32 model (mixed precision
keeps float32 master weights, so nothing is lost).

Several GPUs: `tf.distribute.MirroredStrategy`. The P x K batch is the global
batch; each replica gets P / replicas whole identities (the batch is
identity-major, `distribute_batches`) and mines triplets inside its own slice
(per-replica mining, as in FaceNet's distributed training); gradients are
averaged (`make_train_step`). p must then be a multiple of the number of
replicas.

Every `log_every` steps a log line gives loss, fraction of positive
triplets, mean positive / negative distance, learning rate, images/s and ETA
(means over the steps since the previous line). Every `validate_every` steps
(and after the last step) the same metrics are computed on
`validation_batches` fixed P x K batches of real validation images, without
augmentation. Both are also TensorBoard scalars (`TensorBoardLog`:
train/<metric> with train/learning_rate and train/images_per_second, and
val/<metric>) in each folder of `tensorboard_dir`.

Fail fast (`TrainingMonitor`, on every step's values, read back at least
every COLLAPSE_STEPS steps whatever `log_every` is): a non-finite loss,
embedding collapse or divergence raises FacenetError naming the step and the
setting to change; the step then fails and no model is exported.

Checkpoints (model, optimizer, step) go to `checkpoint_dir` every
`checkpoint_every` steps (tf.train.CheckpointManager keeps the last two; a
gs:// URI works) with the history so far and `provenance.json`: the run key
(the model output it trains for), the fingerprints of the four inputs
(`provenance.check_inputs`), the train settings and the training code. A new
call with the same checkpoint folder resumes from the latest checkpoint only
when all of these match: that is how a retried pod continues. A checkpoint
written for anything else is refused, naming what differs, never resumed
silently. Changing max_steps on resume is allowed (the cosine schedule then
follows the new length), as are the other RESUMABLE_CHANGES. A damaged
checkpoint file is skipped with a warning for the previous checkpoint. The
input stream resumes exactly (`data.make_train_dataset` with start_batch).
Metrics and model.json give `start_step`, the step this call began at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp import __version__
from facenet_kfp.config import TrainConfig, to_dict
from facenet_kfp.errors import FacenetError, InputError
from facenet_kfp.fsutil import check_replaceable, write_json
from facenet_kfp.progress import Progress, _fmt_seconds

log = logging.getLogger(__name__)

COLLAPSE_MEAN_DISTANCE = 1e-3    # plain L2; random unit vectors in 128-D are ~1.41 apart
COLLAPSE_MAX_DISTANCE = 1e-6
COLLAPSE_STEPS = 20              # consecutive steps below COLLAPSE_MEAN_DISTANCE that count as collapse
DIVERGENCE_STEPS = 50            # steps per mean loss of the divergence check
TENSORBOARD_RUN_JSON = "facenet-kfp-run.json"   # in a TensorBoard folder: the run its events belong to
TENSORBOARD_FORMAT = "facenet-kfp-tensorboard/1"
EVENT_FILE_PREFIX = "events.out.tfevents."
HISTORY_JSON = "history.json"
PROVENANCE_JSON = "provenance.json"
CHECKPOINT_FORMAT = "facenet-kfp-checkpoint/1"
# The modules whose code decides the trained weights (their source is part of a checkpoint's provenance).
TRAINING_MODULES = ("augment", "data", "losses", "model", "train")
# Settings that may change between a run and its resumption: they do not change the model.
RESUMABLE_CHANGES = ("max_steps", "validate_every", "validation_batches", "checkpoint_every", "log_every")
STAT_KEYS = ("loss", "fraction_positive_triplets", "mean_positive_distance", "mean_negative_distance")


def _keras():
    import keras
    return keras


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
    keras = _keras()
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

def resolve_precision(precision: str) -> str:
    """The Keras dtype policy name for a config precision ("auto": mixed_float16 on GPU, else float32)."""
    if precision == "auto":
        return "mixed_float16" if _tf().config.list_logical_devices("GPU") else "float32"
    return precision


def distribution_strategy():
    """MirroredStrategy over the visible GPUs when there are several, else the default strategy."""
    tf = _tf()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


# ----------------------------------------------------------------------------- checkpoint folder

def default_checkpoint_dir(model_dir: str | os.PathLike) -> str:
    """`<model_dir>.ckpt`, next to the model folder (outside it: the model folder is replaced whole)."""
    model_dir = Path(model_dir)
    return str(model_dir.parent / (model_dir.name + ".ckpt"))


def _is_uri(path: str) -> bool:
    return "://" in str(path)


def _write_json_any(path: str, obj: Any) -> None:
    """Atomic JSON write to a local path (fsutil) or a gs:// URI (tf.io.gfile: write, then rename)."""
    if not _is_uri(path):
        write_json(path, obj)
        return
    gfile = _tf().io.gfile
    tmp = f"{path}.tmp-{os.getpid()}"
    with gfile.GFile(tmp, "w") as handle:
        handle.write(json.dumps(obj, indent=2) + "\n")
    gfile.rename(tmp, path, overwrite=True)


def _read_json_any(path: str) -> Any | None:
    gfile = _tf().io.gfile
    if not gfile.exists(path):
        return None
    with gfile.GFile(path, "r") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


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
    saved = _read_json_any(path)
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


def _checkpoints(manager) -> list[str]:
    """The manager's checkpoints, oldest first; the latest one too when the state file has no timestamps
    (the manager then lists none)."""
    found = list(manager.checkpoints)
    if manager.latest_checkpoint and manager.latest_checkpoint not in found:
        found.append(manager.latest_checkpoint)
    return found


def _restore_latest(checkpoint, manager, checkpoint_dir: str) -> str | None:
    """Restore the newest readable checkpoint of `manager`; its path, or None when there is none.

    A damaged checkpoint (truncated or missing file) is skipped with a
    warning for the previous one (the manager keeps two); when none can be
    read, InputError names each and what failed.
    """
    tf = _tf()
    failures = []
    for path in reversed(_checkpoints(manager)):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, IndexError, ValueError, tf.errors.OpError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failures.append(f"{path}: {reason}")
            log.warning("cannot restore checkpoint %s (files %s.index, %s.data-*): %s; trying the "
                        "previous checkpoint", path, path, path, reason)
            continue
        if failures:
            log.warning("resuming from the previous checkpoint %s instead", path)
        return path
    if failures:
        raise InputError(f"{checkpoint_dir}: no checkpoint can be restored ({'; '.join(failures)}); "
                         f"delete {checkpoint_dir} to train from step 0")
    return None


# ----------------------------------------------------------------------------- one step on every replica

def distribute_batches(strategy, dataset):
    """`dataset`'s global batches split between the replicas of `strategy` (unchanged for one).

    Replica r gets rows [r * N / R, (r + 1) * N / R) of each batch of N: with
    identity-major P x K batches and p a multiple of R, whole identities.
    """
    if strategy.num_replicas_in_sync == 1:
        return dataset
    return strategy.experimental_distribute_dataset(dataset)


def make_train_step(model, optimizer, loss_fn, strategy, policy: str = "float32"):
    """A tf.function (images, labels) -> statistics running one optimizer step on every replica.

    Each replica applies `loss_fn(labels, embeddings)` (a dict with "loss"
    and statistics) to its own slice of the batch (`distribute_batches`), so
    triplets are mined among its own identities only. Its loss is divided by
    the number of replicas R because the optimizer sums the replicas'
    gradients: the update uses (1/R) sum_r grad(loss_r), which for a loss
    that averages over the batch is the single-device gradient. Statistics
    are averaged over replicas. mixed_float16 scales the loss (the
    LossScaleOptimizer unscales the gradients).
    """
    tf = _tf()
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch_images, batch_labels):
        with tf.GradientTape() as tape:
            stats = loss_fn(batch_labels, model(batch_images, training=True))
            objective = stats["loss"] / replicas
            if policy == "mixed_float16":
                objective = optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return stats

    @tf.function
    def train_step(batch_images, batch_labels):
        per_replica = strategy.run(replica_step, args=(batch_images, batch_labels))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()}

    return train_step


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


def _load_inputs(dataset_dir, completion_dir, labels_dir, splits_dir, config: TrainConfig, replicas: int):
    from facenet_kfp.data import load_split_images

    images, labels, _, synthetic = load_split_images(dataset_dir, completion_dir or None, labels_dir,
                                                     splits_dir, "train", include_synthetic=True)
    identities = np.unique(labels)
    if len(identities) < config.p:
        raise InputError(f"{Path(splits_dir) / 'train.txt'}: split 'train' has {len(identities)} identities "
                         f"with images, fewer than p={config.p} identities per batch")
    short = int(np.sum(np.bincount(np.searchsorted(identities, labels)) < config.k))
    log.info("train: %d images (%d generated) of %d identities; %d identities have fewer than k=%d "
             "images and are sampled with replacement", len(images), sum(synthetic), len(identities),
             short, config.k)
    if config.p % replicas:
        raise InputError(f"train.p={config.p} must be a multiple of the {replicas} GPUs "
                         f"(each replica mines triplets among whole identities)")
    val = None
    if config.validate_every > 0:
        val_images, val_labels, _, _ = load_split_images(dataset_dir, None, labels_dir, splits_dir, "val",
                                                         include_synthetic=False)
        val_ids, counts = np.unique(val_labels, return_counts=True)
        keep = np.isin(val_labels, val_ids[counts >= 2])
        n_val = int(np.sum(counts >= 2))
        if n_val < 2:
            raise InputError(f"{Path(splits_dir) / 'val.txt'}: validation needs 2 identities with at least "
                             f"2 real images, found {n_val} (set validate_every: 0 to train without it)")
        val = ([im for im, k in zip(val_images, keep) if k], val_labels[keep], min(config.p, n_val))
    return images, labels, val


# ----------------------------------------------------------------------------- monitor

class TrainingMonitor:
    """Fail-fast checks on the values of each training step, as plain floats (no backend needed).

    `update(step, values)` takes step `step`'s (1-based) "loss", "mean_pairwise_l2" and
    "max_pairwise_l2" (plain L2 between the batch's embeddings, `batch_loss`) and raises
    FacenetError naming the step and the setting to change when

    - the loss is not finite (NaN or infinite weights or activations);
    - the embeddings collapse: the largest distance is below COLLAPSE_MAX_DISTANCE (all at one
      point), or the mean distance stays below COLLAPSE_MEAN_DISTANCE for COLLAPSE_STEPS
      consecutive steps;
    - training diverges: the mean loss over the last DIVERGENCE_STEPS steps is more than one
      `margin` above the lowest such mean so far. The triplet loss of unit vectors is bounded
      (at most 4 + margin), so divergence shows as a lasting rise, not a blow-up; a healthy
      run's windowed loss falls from about the margin towards 0 with ripples far below a margin.

    The windows count steps, whatever `log_every` is; a resumed call starts them afresh.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.low_distance_run = 0
        self.losses: deque[float] = deque(maxlen=DIVERGENCE_STEPS)
        self.best: tuple[float, int] | None = None        # lowest windowed mean loss, its last step

    def learning_rate(self, step: int) -> float:
        """The learning rate step `step` (1-based) trained with."""
        c = self.config
        return learning_rate_at(step - 1, c.learning_rate, c.warmup_steps, c.max_steps, c.lr_schedule)

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


# ----------------------------------------------------------------------------- TensorBoard

class TensorBoardLog:
    """TensorBoard scalars `<split>/<key>` of one run, written to one or more folders (paths or gs://).

    A folder holds one run: `claim_tensorboard_dir` gives it facenet-kfp-run.json naming the
    run key and refuses a folder of another run. Each call adds its own event file (TensorBoard
    merges a folder's files) and writes a (tag, step) only when the folder's events do not
    have it yet: a retried or resumed call fills in what the earlier attempt did not write
    (the restored history first) and never writes a step twice. Flushed at each write, so a
    killed pod loses at most the record being written; a truncated last record is skipped.

    Written with the raw `tf.summary.write` and the "scalars" plugin metadata (what
    `tf.summary.scalar` writes), so the trainer image needs no tensorboard package.
    """

    def __init__(self, folders: Sequence[str], run_key: str):
        tf = _tf()
        from tensorflow.core.framework import summary_pb2

        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR)
        self._outputs = []          # (writer, {tag: last step in the folder})
        for folder in folders:
            written = claim_tensorboard_dir(folder, run_key)
            self._outputs.append((tf.summary.create_file_writer(folder), written))

    def write(self, split: str, record: dict[str, float]) -> None:
        """Each finite value of `record` but "step" as `<split>/<key>` at record["step"]."""
        tf = _tf()
        step = int(record["step"])
        for writer, written in self._outputs:
            with writer.as_default():
                for key, value in record.items():
                    tag = f"{split}/{key}"
                    if key != "step" and math.isfinite(value) and step > written.get(tag, -1):
                        tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                                         metadata=self._metadata)
                        written[tag] = step
            writer.flush()

    def close(self) -> None:
        for writer, _ in self._outputs:
            writer.close()


def claim_tensorboard_dir(folder: str, run_key: str) -> dict[str, int]:
    """Make `folder` run `run_key`'s TensorBoard folder; {tag: last step} of the events in it.

    A new or empty folder gets facenet-kfp-run.json naming the run; a folder whose
    facenet-kfp-run.json names this run is continued; anything else is refused, so that
    `tensorboard --logdir` never shows two runs' events mixed in one curve.
    """
    gfile = _tf().io.gfile
    marker = f"{folder.rstrip('/')}/{TENSORBOARD_RUN_JSON}"
    names = gfile.listdir(folder) if gfile.isdir(folder) else []
    claimed = _read_json_any(marker)
    if claimed is None:
        if names:
            raise InputError(f"{folder}: TensorBoard folder is not empty and has no {TENSORBOARD_RUN_JSON}, so "
                             f"it is not this trainer's; give an empty or new folder for the events")
        gfile.makedirs(folder)
        _write_json_any(marker, {"format": TENSORBOARD_FORMAT, "run": run_key})
        return {}
    if not isinstance(claimed, dict) or claimed.get("run") != run_key:
        owner = claimed.get("run") if isinstance(claimed, dict) else claimed
        raise InputError(f"{marker}: the TensorBoard folder holds the events of run {owner!r}, not of "
                         f"{run_key!r}; give a new folder for this run's events, or delete {folder}")
    return written_steps(folder, names)


def written_steps(folder: str, names: Sequence[str]) -> dict[str, int]:
    """{tag: last step} over the event files among `names` in `folder` (a truncated tail is skipped)."""
    tf = _tf()
    last: dict[str, int] = {}
    for name in sorted(names):
        if not name.startswith(EVENT_FILE_PREFIX):
            continue
        path = f"{folder.rstrip('/')}/{name}"
        try:
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    last[value.tag] = max(last.get(value.tag, -1), int(event.step))
        except tf.errors.DataLossError:
            log.warning("%s: cut short after its last complete event (a stopped pod); the rest is read", path)
    return last


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class _Window:
    """Per-step values since the last log line."""
    values: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {k: [] for k in STAT_KEYS})
    start_time: float = dataclasses.field(default_factory=time.monotonic)
    steps: int = 0


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
    config.validate()
    check_replaceable(model_dir, "train")       # before training, not after it
    fingerprints = _check_inputs(dataset_dir, completion_dir, labels_dir, splits_dir, config.k)
    keras = _keras()
    tf = _tf()
    from facenet_kfp import export
    from facenet_kfp.data import make_train_dataset
    from facenet_kfp.model import build_embedding_model

    strategy = distribution_strategy()
    replicas = strategy.num_replicas_in_sync
    images, labels, val = _load_inputs(dataset_dir, completion_dir, labels_dir, splits_dir, config, replicas)
    checkpoint_dir = str(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(model_dir)
    run_key = run_key or os.path.abspath(model_dir)
    provenance = checkpoint_provenance(run_key, fingerprints, config)
    if isinstance(tensorboard_dir, (str, os.PathLike)):
        tensorboard_dir = [tensorboard_dir]
    tensorboard = TensorBoardLog([str(f) for f in tensorboard_dir or ()], run_key)

    policy = resolve_precision(config.precision)
    previous_policy = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(config.seed)
    input_shape = (config.image_size, config.image_size, 3)
    try:
        keras.mixed_precision.set_global_policy(policy)
        with strategy.scope():
            model = build_embedding_model(input_shape, config.embedding_dim, config.architecture)
            optimizer = keras.optimizers.Adam(learning_rate=make_schedule(config))
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    log.info("model %s: %d parameters, precision %s, %d replica(s), batch %d = P %d x K %d",
             model.name, model.count_params(), policy, replicas, config.p * config.k, config.p, config.k)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=2)
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    restored = None
    if _checkpoints(manager):
        _check_resume(checkpoint_dir, provenance)
        restored = _restore_latest(checkpoint, manager, checkpoint_dir)
    start_step = int(step_var.numpy()) if restored else 0
    if restored:
        saved = _read_json_any(f"{checkpoint_dir.rstrip('/')}/{HISTORY_JSON}") or {}
        for split in ("train", "val"):
            history[split] = [r for r in saved.get(split, []) if r["step"] <= start_step]
        log.info("resuming from checkpoint %s at step %d of %d", restored, start_step, config.max_steps)
        if start_step >= config.max_steps:
            log.warning("the checkpoint in %s is at step %d, max_steps is %d: saving it as the model "
                        "without training; delete %s to train again", checkpoint_dir, start_step,
                        config.max_steps, checkpoint_dir)
    else:
        log.info("no checkpoint in %s: starting at step 0", checkpoint_dir)
    _write_json_any(f"{checkpoint_dir.rstrip('/')}/{PROVENANCE_JSON}", provenance)
    train_step = make_train_step(model, optimizer, lambda y, e: batch_loss(config, y, e), strategy, policy)

    @tf.function
    def eval_step(batch_images, batch_labels):
        return batch_loss(config, batch_labels, model(batch_images, training=False))

    train_ds = make_train_dataset(images, labels, config.p, config.k, config.image_size, config.crop_fraction,
                                  config.augment, config.seed, start_batch=start_step)
    train_ds = distribute_batches(strategy, train_ds)
    val_ds = None
    if val is not None:
        val_images, val_labels, p_val = val
        # Fixed batches (same seed every pass), cached after the first pass.
        val_ds = make_train_dataset(val_images, val_labels, p_val, config.k, config.image_size,
                                    config.crop_fraction, False, config.seed
                                    ).take(config.validation_batches).cache()

    for split in ("train", "val"):
        for record in history[split]:
            tensorboard.write(split, record)     # what an earlier attempt's folders may lack
    monitor = TrainingMonitor(config)
    schedule = make_schedule(config)
    batch_size = config.p * config.k

    def validate(step: int) -> dict[str, float]:
        sums = {k: 0.0 for k in STAT_KEYS}
        batches = 0
        for batch_images, batch_labels in val_ds:
            out = eval_step(batch_images, batch_labels)
            for k in STAT_KEYS:
                sums[k] += float(out[k])
            batches += 1
        record = {"step": step, **{k: v / batches for k, v in sums.items()}}
        if not math.isfinite(record["loss"]):
            raise FacenetError(f"validation loss is {record['loss']} at step {step}: the model produces "
                               f"non-finite embeddings; lower train.learning_rate")
        history["val"].append(record)
        log.info("validation at step %d (%d batches): loss %.4f, positive triplets %.3f, "
                 "d+ %.4f, d- %.4f", step, batches, record["loss"], record["fraction_positive_triplets"],
                 record["mean_positive_distance"], record["mean_negative_distance"])
        tensorboard.write("val", record)
        return record

    def check(window: _Window, first_step: int, values: list[dict[str, float]]) -> None:
        """Fail fast (`TrainingMonitor`); `values` are those of steps first_step, first_step + 1, ..."""
        for i, v in enumerate(values):
            monitor.update(first_step + i, v)
            for k in STAT_KEYS:
                window.values[k].append(v[k])

    pending: list[dict[str, Any]] = []     # step outputs not yet read back (keeps the device busy)
    window = _Window()
    step = start_step
    first_done_time = None
    first_done_step = start_step
    overhead = 0.0

    def flush() -> None:
        nonlocal pending
        values = [{k: float(v) for k, v in out.items()} for out in pending]
        check(window, step - len(pending) + 1, values)
        pending = []

    if val_ds is not None and start_step == 0:
        validate(0)           # the untrained starting point: the curves then show what training did
    iterator = iter(train_ds)
    remaining = config.max_steps - start_step
    train_start = time.monotonic()
    with Progress("training", total=max(remaining, 0), unit="steps", every=math.inf, logger=log) as progress:
        while step < config.max_steps:
            batch_images, batch_labels = next(iterator)
            pending.append(train_step(batch_images, batch_labels))
            step += 1
            window.steps += 1
            progress.update()
            if first_done_time is None:
                float(pending[-1]["loss"])          # wait for the traced first step before timing
                first_done_time, first_done_step = time.monotonic(), step
                overhead = 0.0
                # The first step traces the graph: leave it out of the rate.
                window.start_time, window.steps = first_done_time, 0
            if len(pending) >= COLLAPSE_STEPS:
                flush()         # the monitor sees every step within COLLAPSE_STEPS, whatever log_every is
            last = step == config.max_steps
            if step % config.log_every == 0 or last:
                flush()
                now = time.monotonic()
                rate = (window.steps * batch_size / max(now - window.start_time, 1e-9) if window.steps
                        else math.nan)
                record = {"step": step, **{k: float(np.mean(v)) for k, v in window.values.items()},
                          "learning_rate": float(schedule(step - 1))}
                history["train"].append(record)
                eta = (_fmt_seconds((config.max_steps - step) * batch_size / rate)
                       if math.isfinite(rate) and rate > 0 else "?")
                log.info("step %d/%d: loss %.4f, positive triplets %.3f, d+ %.4f, d- %.4f, lr %.3g, "
                         "%.0f images/s, ETA %s", step, config.max_steps, record["loss"],
                         record["fraction_positive_triplets"], record["mean_positive_distance"],
                         record["mean_negative_distance"], record["learning_rate"], rate, eta)
                tensorboard.write("train", {**record, "images_per_second": rate})
                window.values = {k: [] for k in STAT_KEYS}
                window.steps, window.start_time = 0, time.monotonic()
            paused = time.monotonic()
            if val_ds is not None and (step % config.validate_every == 0 or last):
                validate(step)
            if step % config.checkpoint_every == 0 or last:
                flush()
                step_var.assign(step)
                path = manager.save(checkpoint_number=step)
                _write_json_any(f"{checkpoint_dir.rstrip('/')}/{HISTORY_JSON}", {"step": step, **history})
                log.info("checkpoint %s", path)
            # Validation and checkpoints do not count in images/s.
            paused = time.monotonic() - paused
            window.start_time += paused
            overhead += paused
    train_end = time.monotonic()
    train_seconds = train_end - train_start
    if val_ds is not None and (not history["val"] or history["val"][-1]["step"] != step):
        validate(step)        # resumed at max_steps after a crash between checkpoint and export
    tensorboard.close()

    timed_steps = step - first_done_step
    images_per_second = (timed_steps * batch_size / (train_end - first_done_time - overhead)
                         if first_done_time is not None and timed_steps > 0 else 0.0)
    metrics: dict[str, float] = {"steps": step, "start_step": start_step,
                                 "images_per_second": images_per_second,
                                 "train_seconds": train_seconds,
                                 "learning_rate": float(schedule(max(step - 1, 0)))}
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

    # The artifact is a plain float32 model outside any distribution strategy.
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        final = build_embedding_model(input_shape, config.embedding_dim, config.architecture)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    final.set_weights(model.get_weights())
    metadata = export.artifact_metadata(config, step, start_step=start_step, inputs=fingerprints,
                                        resumed_from=restored, precision=policy, replicas=replicas,
                                        train_config=to_dict(config), metrics=metrics)
    export.save_model_artifact(final, model_dir, metadata, {"train": history["train"], "val": history["val"]})
    log.info("trained %d steps (%d this run) at %.0f images/s; model in %s", step, step - start_step,
             images_per_second, model_dir)
    return metrics
