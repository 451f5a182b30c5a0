"""The steps benchmarks/train.py times: Keras trainers per loss kind, the loss alone compiled per backend, and
an interleaved timer that spreads a shared machine's slow spells over all of them."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

import keras
from keras import ops

from facenet_kfp.config import TrainConfig
from facenet_kfp.train import Placement, batch_loss, build_trainer

LOSSES = ("batch_hard", "batch_all", "semi_hard")      # batch_hard first: the default
TRIVIAL = "trivial"

Key = tuple[str, str]          # (precision, loss kind)


# ----------------------------------------------------------------------------- compiled steps

def loss_function(model: TrainConfig, kind: str) -> Callable:
    """labels [B], embeddings [B, D] -> dict with "loss": what the train step differentiates.

    A real kind is `train.batch_loss` (loss plus the statistics every training
    step computes); TRIVIAL is the mean of the embeddings, which keeps the
    whole backward pass through the network but mines nothing.
    """
    if kind == TRIVIAL:
        return lambda labels, embeddings: {"loss": ops.mean(ops.cast(embeddings, "float32"))}
    config = dataclasses.replace(model, loss=kind)
    return lambda labels, embeddings: batch_loss(config, labels, embeddings)


def build(model: TrainConfig, precision: str, kind: str):
    """The trainer `train.train` builds (`train.build_trainer`) for `model` with one loss kind.

    TRIVIAL keeps the model, optimizer and schedule and swaps the loss for the
    mean of the embeddings before Keras first traces the step.
    """
    trainer = build_trainer(dataclasses.replace(model, loss=LOSSES[0] if kind == TRIVIAL else kind), precision,
                            Placement())
    if kind == TRIVIAL:
        trainer.statistics = loss_function(model, TRIVIAL)
    return trainer


def train_step(trainer) -> Callable:
    """One optimizer step of `trainer` through Keras `train_on_batch`: (images, labels) -> loss.

    train_on_batch returns the step's logs as Python floats, so the call ends
    after the update has run on the device.
    """
    def run(images, labels):
        return float(trainer.train_on_batch(images, labels, return_dict=True)["loss"])
    return run


def tf_loss_step(loss_fn) -> Callable:
    """Compiled forward + backward of the loss alone: (labels, embeddings [B, D]) -> loss."""
    import tensorflow as tf

    @tf.function
    def step(labels, embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            out = loss_fn(labels, embeddings)
        return out, tape.gradient(out["loss"], embeddings)

    def run(labels, embeddings):
        out, gradient = step(labels, embeddings)
        gradient.numpy()
        return float(out["loss"])
    return run


def jax_loss_step(loss_fn) -> Callable:
    """jax.jit of the loss forward + backward alone: (labels, embeddings [B, D]) -> loss."""
    import jax

    def objective(embeddings, labels):
        out = loss_fn(labels, embeddings)
        return out["loss"], out

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))

    def run(labels, embeddings):
        result = step(embeddings, labels)
        jax.block_until_ready(result)
        return float(result[0][0])
    return run


def forward_macs(model) -> int:
    """Multiply-accumulates of one image's forward pass through the Conv2D and Dense layers (the bulk)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kh, kw = layer.kernel_size
            total += height * width * kh * kw * layer.input.shape[-1] * out_channels
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


# ----------------------------------------------------------------------------- timing

def time_interleaved(calls: dict[Key, Callable[[int], float]], warmup: int, repeats: int, desc: str,
                     warm: tuple[Key, ...] = ()
                     ) -> tuple[dict[Key, np.ndarray], dict[Key, np.ndarray], dict[Key, float]]:
    """Wall and process-CPU seconds of each call over `repeats` rounds, after `warmup` untimed calls each.

    Each round calls every entry once, in an order rotated by one per round,
    so slow spells of a shared machine spread over all entries, and entry r
    of every array comes from round r. Entries in `warm` were warmed up
    before and get no first call. CPU time is this process's, all threads: on
    a loaded machine it moves less than wall time. Returns (wall [repeats],
    cpu [repeats], first-call seconds = tracing + one call).
    """
    first = {}
    for key, call in calls.items():
        if key in warm:
            continue
        start = time.perf_counter()
        loss = call(0)
        first[key] = time.perf_counter() - start
        if not np.isfinite(loss):
            raise SystemExit(f"{desc} {' '.join(key)}: loss is {loss} on the first call")
        for i in range(1, warmup):
            call(i)
        print(f"  {desc} {' '.join(key)}: first call {first[key]:.1f} s, warm-up done", flush=True)
    keys = list(calls)
    wall = {key: np.zeros(repeats) for key in keys}
    cpu = {key: np.zeros(repeats) for key in keys}
    report = time.monotonic()
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            calls[key](warmup + r)
            wall[key][r] = time.perf_counter() - start_wall
            cpu[key][r] = time.process_time() - start_cpu
        if time.monotonic() - report > 30 or r + 1 == repeats:
            report = time.monotonic()
            print(f"  {desc}: round {r + 1}/{repeats}", flush=True)
    return wall, cpu, first


# ----------------------------------------------------------------------------- host overhead per step

# Before (as training ran), after (as it runs now), and the two halfway paths that split the change.
HOST_PATHS = ("float32 + readback every step", "uint8 + periodic readback", "float32 + periodic readback",
              "uint8 + readback every step")


def cheap_trainer(model: TrainConfig):
    """An `EmbeddingTrainer` on a trivially cheap embedding model (8 x 8 average pooling, dense, L2
    normalisation: about 60 K multiply-adds an image at 96 px), Adam at learning rate 0, so a step's time is
    mostly the host's: feeding the batch, dispatching the step and the callback.

    A fixed random projection of the pooled pixels spreads the embeddings, so the monitor sees no collapse.
    """
    from facenet_kfp.trainer import EmbeddingTrainer, backend

    config = model
    keras.utils.set_random_seed(0)
    size = config.image_size
    embedding = keras.Sequential([keras.Input((size, size, 3)), keras.layers.AveragePooling2D(8),
                                  keras.layers.Flatten(), keras.layers.Dense(config.embedding_dim),
                                  keras.layers.UnitNormalization()])
    trainer = EmbeddingTrainer(embedding, config)
    trainer.compile(optimizer=keras.optimizers.Adam(0.0), jit_compile=backend() == "jax")
    return trainer, config


def host_overhead(model: TrainConfig, batches: list[tuple[np.ndarray, np.ndarray]], steps: int, rounds: int
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Wall and process-CPU seconds per step of Keras `fit` on `cheap_trainer`, the two ways of `HOST_PATHS`.

    "float32 + readback every step": float32 batches and the run's callback
    (`monitor.TrainingProgress`) as Keras used to run it, its logs turned into
    Python floats at every step (what the host waits for). "uint8 + periodic
    readback": the same batches as `numpy_input.to_uint8` pixels, normalised in
    the step, and the callback as training runs it now (device values, read
    back every `monitor.READBACK_STEPS` steps). Each path has its own trainer,
    traced before timing; `rounds` rounds of `steps` steps each, alternating
    the order. The two other paths of HOST_PATHS change one of the two
    things each. Log lines, validation and checkpoints are out of the way.
    """
    import math

    from facenet_kfp.monitor import RunState, TrainingProgress
    from facenet_kfp.numpy_input import to_uint8
    from facenet_kfp.progress import Progress
    from facenet_kfp.tensorboard_log import TensorBoardLog

    class EveryStep(TrainingProgress):
        device_logs = False          # Keras converts the logs to floats at every step, as before

    quantised = [(to_uint8(x), y) for x, y in batches]
    feeds = {HOST_PATHS[0]: (batches, EveryStep), HOST_PATHS[1]: (quantised, TrainingProgress),
             HOST_PATHS[2]: (batches, TrainingProgress), HOST_PATHS[3]: (quantised, EveryStep)}
    runs = {}
    for name, (feed, callback_class) in feeds.items():
        trainer, config = cheap_trainer(model)
        config = dataclasses.replace(config, max_steps=10**8, log_every=10**8, checkpoint_every=10**8,
                                     validate_every=0)
        state = RunState(config, 0, "unused", TensorBoardLog([], "bench"), {"train": [], "val": []})
        callback = callback_class(state, Progress("bench", every=math.inf))

        def run(count, trainer=trainer, feed=feed, state=state, callback=callback):
            stream = (feed[i % len(feed)] for i in range(count))
            trainer.fit(stream, steps_per_epoch=count, epochs=1, verbose=0, shuffle=False, callbacks=[callback])
            state.start_step += count
        run(3)                            # traces the step
        runs[name] = run
    times = {name: {"wall": np.zeros(rounds), "cpu": np.zeros(rounds)} for name in runs}
    for r in range(rounds):
        for name in HOST_PATHS[r % len(HOST_PATHS):] + HOST_PATHS[:r % len(HOST_PATHS)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            runs[name](steps)
            times[name]["wall"][r] = (time.perf_counter() - start_wall) / steps
            times[name]["cpu"][r] = (time.process_time() - start_cpu) / steps
    return times
