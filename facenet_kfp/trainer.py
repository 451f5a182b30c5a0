"""The Keras model that trains: the learning-rate schedule, the batch loss, devices and `EmbeddingTrainer`.

One trainer for two Keras backends, chosen by KERAS_BACKEND before Keras is
imported: Keras's `fit` runs `EmbeddingTrainer` (a small keras.Model around
the embedding model and the training objective, `objectives.Objective`, whose
`compute_loss` is the objective's loss and whose `compute_metrics` are its
batch statistics), and one callback
(`TrainingProgress`) checks, logs, validates and checkpoints.

- tensorflow: batches from tf.data (`tf_input.make_train_dataset`); several GPUs
  through `tf.distribute.MirroredStrategy`: each replica gets P / replicas
  whole identities of the identity-major batch and mines triplets among them
  (per-replica mining, as in FaceNet's distributed training). Keras leaves a
  scalar loss of our own unscaled, so `compute_loss` divides it by the number
  of replicas R: the summed gradients are then (1/R) sum_r grad(loss_r), the
  single-device gradient of a batch-mean loss. p must be a multiple of R.
- jax: batches from `numpy_input.TrainBatches` (no TensorFlow anywhere on this
  path); the step is jitted; several devices through
  `keras.distribution.DataParallel` (the batch is sharded, the loss is that of
  the whole batch, mined over all of it).

Input pixels: float32 in [-1, 1], or uint8 (`numpy_input.to_uint8`, what
the JAX path feeds on a GPU, `input_pixels`: 4x fewer bytes to copy to the device) that the step maps
to u / 127.5 - 1 in float32 on the device (`normalise_pixels`) before the
model, whose first layer casts to the compute dtype under mixed precision.

Readback: `fit` hands each step's statistics to callbacks that set
``device_logs = True`` as the device's scalars, not Python floats
(`DeviceLogsCallbackList`), so the host does not wait for every step;
`monitor.TrainingProgress` reads them back every few steps.

Precision: float32, mixed_float16 (with dynamic loss scaling) or
mixed_bfloat16; "auto" picks mixed_float16 when a GPU is visible, float32
otherwise. The saved artifact is always a float32 model (mixed precision
keeps float32 master weights, so nothing is lost).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import keras

from facenet_kfp import objectives
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError
from facenet_kfp.objectives import Objective


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

def batch_loss(config: TrainConfig, labels, embeddings, head_output=None, objective: Objective | None = None
               ) -> dict[str, Any]:
    """Loss and statistics of one batch, as float32 scalars.

    The objective's (`objective`, default the one config.loss names) statistics,
    "loss" first (the triplet objectives': "loss", "fraction_positive_triplets",
    "mean_positive_distance", "mean_negative_distance" in the configured
    distance), plus "mean_pairwise_l2" / "max_pairwise_l2" (plain L2 over
    distinct rows) for the collapse check. `head_output` is the output of the
    objective's head on `embeddings` (None for an objective without a head).
    """
    from keras import ops

    from facenet_kfp import losses

    objective = objective or objectives.for_config(config)
    embeddings = ops.cast(embeddings, "float32")
    out = dict(objective.function(labels, embeddings, config, head_output))
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
    """JAX: keras.distribution.DataParallel over the devices when there are several, else None.

    The devices are those of every process of a JAX process group (`multiprocess`); each process
    feeds its own part of every batch (`numpy_input.TrainBatches(part=...)`), so Keras must not
    shard the input again (auto_shard_dataset off).
    """
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return None
    distribution = keras.distribution.DataParallel(devices=devices)
    distribution.auto_shard_dataset = False
    return distribution


class Placement:
    """Where the model lives: a tf.distribute strategy (tensorflow) or a keras.distribution (jax).

    `replicas`: the devices a batch is split over. `loss_replicas`: how many losses are computed per
    step and their gradients summed, which the trainer's loss is divided by: the replicas under
    MirroredStrategy, 1 under JAX (one loss of the global batch, however many devices hold it).
    """

    def __init__(self):
        if backend() == "tensorflow":
            self.strategy, self.distribution = distribution_strategy(), None
            self.replicas = self.strategy.num_replicas_in_sync
            # Each replica computes the loss of its part of the batch and their gradients are summed.
            self.loss_replicas = self.replicas
        else:
            self.strategy, self.distribution = None, jax_distribution()
            self.replicas = len(self.distribution.device_mesh.devices.flatten()) if self.distribution else 1
            # One jitted step computes the loss of the whole (sharded) batch: nothing is summed over devices.
            self.loss_replicas = 1

    def scope(self):
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- pixels and callbacks

def normalise_pixels(images):
    """Images as the model takes them: uint8 u -> float32 u / 127.5 - 1 (`numpy_input.from_uint8`);
    float images unchanged. The dtype is static, so a traced step holds one branch."""
    from keras import ops

    if keras.backend.standardize_dtype(images.dtype) != "uint8":
        return images
    return ops.cast(images, "float32") / 127.5 - 1.0


def input_pixels() -> str:
    """What the input pipeline (NumPy or tf.data) should deliver for this process's devices: "uint8" when a
    GPU trains (a quarter of the bytes to copy to it, normalised there by `normalise_pixels`), else "float32": on a CPU
    nothing is copied, and normalising in the step would only add work there (the train benchmark's part 6
    measures both)."""
    return "uint8" if _gpus() else "float32"


class DeviceLogsCallbackList(keras.callbacks.CallbackList):
    """Keras's CallbackList, but a callback with ``device_logs = True`` gets each train step's logs as they
    come from the step (device scalars), not converted to Python floats.

    Keras's own list converts every value at every step, which makes the host
    wait for the device each step; on a GPU that serialises the steps of a
    small model. The others get Python floats as before, converted only
    when one of them acts on a step's end.
    """

    def on_train_batch_end(self, batch, logs=None):
        floats = None
        for callback in self.callbacks:
            if getattr(callback, "device_logs", False):
                callback.on_train_batch_end(batch, logs=logs)
                continue
            if floats is None:
                floats = {k: float(keras.ops.convert_to_numpy(v)) for k, v in (logs or {}).items()}
            callback.on_train_batch_end(batch, logs=floats)


# ----------------------------------------------------------------------------- the Keras model that trains

class EmbeddingTrainer(keras.Model):
    """`fit`-able wrapper of an embedding model: the objective's loss and statistics of each batch.

    Holds the embedding model, the training objective (`objectives.Objective`,
    default the one config.loss names) and the objective's head, if it has
    one, as a tracked layer: its weights train with the embedding model's and
    are among the trainer's weights a checkpoint saves. The forward pass gives
    the embeddings, or (embeddings, the head's output on them) with a head:
    under JAX `fit` holds the weights outside the variables, so the head runs
    there, not in the loss. `statistics(labels, y_pred)` returns a dict of
    float32 scalars with "loss" (`batch_loss`).
    `compute_loss` is that loss divided by `replicas`, the number of losses
    whose gradients are summed (`Placement.loss_replicas`: MirroredStrategy's
    replicas, where Keras does not scale a scalar loss it did not compute
    itself; 1 under JAX); `compute_metrics` returns the statistics of the step (averaged
    over replicas by `fit`), so each step's callback logs hold that step's
    values, not running means.
    """

    def __init__(self, embedding: keras.Model, config: TrainConfig, objective: Objective | None = None,
                 replicas: int = 1, head: keras.layers.Layer | None = None, classes: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.embedding, self.config, self.replicas = embedding, config, int(replicas)
        self.objective = objective or objectives.for_config(config)
        if head is None and self.objective.head is not None:
            head = self.objective.build_head(config, classes)
        self.head = head
        if head is not None and not head.built:
            head.build((None, int(embedding.output_shape[-1])))

    def statistics(self, labels, y_pred) -> dict[str, Any]:
        embeddings, head_output = y_pred if self.head is not None else (y_pred, None)
        return batch_loss(self.config, labels, embeddings, head_output, self.objective)

    def call(self, inputs, training=False):
        embeddings = self.embedding(normalise_pixels(inputs), training=training)
        if self.head is None:
            return embeddings
        return embeddings, self.head(embeddings, training=training)

    def fit(self, *args, callbacks=None, verbose="auto", epochs=1, **kwargs):
        """keras.Model.fit; callbacks given as a list run in a `DeviceLogsCallbackList`."""
        if callbacks is not None and not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = DeviceLogsCallbackList(list(callbacks), add_history=True, add_progbar=verbose != 0,
                                               model=self, verbose=verbose, epochs=epochs,
                                               steps=kwargs.get("steps_per_epoch"))
        return super().fit(*args, callbacks=callbacks, verbose=verbose, epochs=epochs, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.statistics(y, y_pred)["loss"] / float(self.replicas)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.statistics(y, y_pred)


def build_trainer(config: TrainConfig, policy: str, placement: Placement,
                  objective: Objective | None = None, classes: int | None = None) -> EmbeddingTrainer:
    """The embedding model and the objective's head, if any, in an EmbeddingTrainer, compiled and built.

    Args:
        config: the train settings: architecture, image size, embedding size, loss, margin, schedule;
            config.seed seeds the initial weights.
        policy: the Keras dtype policy name ("float32", "mixed_float16", "mixed_bfloat16";
            `resolve_precision` turns a config precision into one); mixed_float16 wraps Adam in a
            LossScaleOptimizer.
        placement: where the variables live (`Placement`: a tf.distribute strategy or a
            keras.distribution); the loss is divided by its `loss_replicas`.
        objective: the training objective (`objectives.Objective`), default the one config.loss names.
        classes: the number of training identities, the rows of a margin-softmax objective's head
            (the train split's, which the config does not hold); batches label them 0..classes-1.

    Returns the trainer with its optimizer's variables built, so a checkpoint can be restored into it
    before the first step. The global dtype policy is restored afterwards. InputError for an unknown
    config.loss or architecture.
    """
    from facenet_kfp import model as model_mod

    previous_policy = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(config.seed)
    try:
        keras.mixed_precision.set_global_policy(policy)
        with placement.scope():
            embedding = model_mod.build_embedding_model((config.image_size, config.image_size, 3),
                                                        config.embedding_dim, config.architecture)
            trainer = EmbeddingTrainer(embedding, config, objective, placement.loss_replicas, classes=classes)
            optimizer = keras.optimizers.Adam(learning_rate=make_schedule(config))
            if policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            trainer.compile(optimizer=optimizer, jit_compile=backend() == "jax")
            optimizer.build(trainer.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return trainer
