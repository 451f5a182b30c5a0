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
(means over the steps since the previous line), also written as TensorBoard
scalars when `tensorboard_dir` is set. Every `validate_every` steps (and after
the last step) the same metrics are computed on `validation_batches` fixed
P x K batches of real validation images, without augmentation.

Fail fast: a non-finite loss raises FacenetError naming the step; so does
embedding collapse (all embeddings at one point), detected when the mean
plain-L2 distance between the embeddings of a batch stays below 1e-3 for
`log_every` consecutive steps or the largest one is below 1e-6.

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


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class _Window:
    """Per-step values since the last log line, and the collapse counter across lines."""
    values: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {k: [] for k in STAT_KEYS})
    start_time: float = dataclasses.field(default_factory=time.monotonic)
    steps: int = 0
    low_distance_run: int = 0


def train(dataset_dir: str | os.PathLike, completion_dir: str | os.PathLike | None,
          labels_dir: str | os.PathLike, splits_dir: str | os.PathLike, model_dir: str | os.PathLike,
          config: TrainConfig, checkpoint_dir: str | None = None,
          tensorboard_dir: str | None = None, run_key: str | None = None) -> dict[str, float]:
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
    provenance = checkpoint_provenance(run_key or os.path.abspath(model_dir), fingerprints, config)

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

    writer = tf.summary.create_file_writer(str(tensorboard_dir)) if tensorboard_dir else None
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
        _summaries(writer, "val", record)
        return record

    def check(window: _Window, first_step: int, values: list[dict[str, float]]) -> None:
        """Fail fast on a non-finite loss or collapsed embeddings; `values` are steps first_step, ..."""
        for i, v in enumerate(values):
            step = first_step + i
            if not math.isfinite(v["loss"]):
                raise FacenetError(f"loss is {v['loss']} at step {step} (learning rate "
                                   f"{float(schedule(step - 1)):.3g}): training diverged; lower "
                                   f"train.learning_rate or use precision: float32")
            if v["max_pairwise_l2"] < COLLAPSE_MAX_DISTANCE:
                raise FacenetError(f"embedding collapse at step {step}: all embeddings of the batch are "
                                   f"at one point (largest distance {v['max_pairwise_l2']:.2e}); lower "
                                   f"train.learning_rate")
            window.low_distance_run = (window.low_distance_run + 1
                                       if v["mean_pairwise_l2"] < COLLAPSE_MEAN_DISTANCE else 0)
            if window.low_distance_run >= config.log_every:
                raise FacenetError(f"embedding collapse at step {step}: mean distance between embeddings "
                                   f"below {COLLAPSE_MEAN_DISTANCE} for {window.low_distance_run} steps; "
                                   f"lower train.learning_rate (now {float(schedule(step - 1)):.3g})")
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
                _summaries(writer, "train", {**record, "images_per_second": rate})
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
    if writer is not None:
        writer.flush()

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


def _summaries(writer, prefix: str, record: dict[str, float]) -> None:
    """TensorBoard scalars `<prefix>/<key>` at record["step"].

    Written with the raw `tf.summary.write` and the "scalars" plugin metadata
    (what `tf.summary.scalar` writes), so the trainer image does not need the
    tensorboard package.
    """
    if writer is None:
        return
    tf = _tf()
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)
    with writer.as_default():
        for key, value in record.items():
            if key != "step":
                tf.summary.write(f"{prefix}/{key}", tf.constant(float(value), tf.float32),
                                 step=int(record["step"]), metadata=metadata)
