"""Benchmark training throughput, the mining + loss share of a step and input-pipeline headroom on this machine.

nn4_small2 at 96x96, batch 64 = P 16 x K 4, Adam, on real images of a
generated demo archive (120 identities, made once in data/bench/train-demo/
and prepared there by `harness.prepare_data`: the library's extract, labels,
completion and splits). Everything is measured side by side in one run, so the ratios
hold even when other jobs share the machine and absolute numbers drift:

1. images/s of the full training step (forward, mining + loss + the batch
   statistics `train.batch_loss` computes, backward, Adam update): the
   trainer's own step, `train.build_trainer`'s EmbeddingTrainer run by Keras
   `train_on_batch`, compiled as `fit` compiles it (tf.function without XLA on
   TensorFlow, jax.jit on JAX), one trainer per configuration: batch_hard (the default),
   batch_all and semi_hard in the first precision (float32), the default loss
   in the others (mixed_bfloat16, timed in rounds of its own paired with the
   float32 default step); wall and process-CPU time per step;
2. the share of the step spent in mining + loss, two ways: (a) the real step
   minus the same step with a trivial loss (mean of the embeddings: the whole
   backward pass, no mining), paired round by round, with a bootstrap 95%
   interval, in wall and in CPU time; (b) `batch_loss` forward + backward alone on the model's
   [64, 128] embeddings, compiled the same way, over the step time.
   Target < 5%;
3. the input pipeline alone (`data.make_train_dataset`: decode + crop, resize
   to 96, augment, batch; no model) against the model's consumption rate
   (target >= 3x), also as CPU seconds per batch against the model's CPU
   seconds per step (a ratio other jobs hardly move), and the default step fed
   by that pipeline, the two sharing the cores, against the step on batches
   held in memory, in alternating blocks (on JAX: the trainer's own pipeline,
   `facenet_kfp.numpy_input.TrainBatches`, in the same alternating blocks);
4. the two input pipelines side by side on the same P x K batches of the
   demo's 250x250 JPEGs (crop 0.6, resize to 96, augmented): the TF-free
   `facenet_kfp.numpy_input.TrainBatches` (worker processes, bytes read from the
   shards by offset) and `data.make_train_dataset` (tf.data, bytes in
   memory), in alternating rounds: images/s, images per CPU-second of this
   process and its workers ("per core"), their ratio (target >= 0.8) and the
   cores each needs to feed a GPU at 10,000 images/s; `--input-only` runs
   just this part (a few minutes);
5. the peak RSS of this process;
6. the host's time per step, feeding and checking it (`steps.host_overhead`:
   a trivially cheap model, so the step is what the host does): float32
   batches with every step's statistics read back (as training ran before)
   against uint8 batches normalised in the step with statistics read back
   every `monitor.READBACK_STEPS` steps (as it runs now), side by side with
   the two paths that change only one of them: ms/step (wall and CPU), the
   before / after ratio and the bytes per batch sent to the device. On a
   CPU backend nothing is copied and the "device" that normalises uint8
   pixels is this CPU (which is why training feeds uint8 only on a GPU,
   `trainer.input_pixels`), so these figures say what the host saves, not
   what a GPU gains; `--host-only` runs just this part on batches of
   generated faces (a minute or two).

Figures are medians over timed steps after warm-up steps (the first call
traces the graph; its time is shown apart). The step functions run in
interleaved rounds, in a rotating order, so load from other jobs hits them
alike.

With KERAS_BACKEND=jax (no TensorFlow) the same trainers run jitted, on
batches from `facenet_kfp.numpy_input`; the tf.data figures of parts 3 and 4 are
skipped and say so. `benchmarks/gpu.py` measures the JAX trainer on a GPU.
`--smoke` runs every part on small_cnn at 32 px with a few steps, to check
the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

import keras

from benchmarks.harness import (DataPaths, iqr_ms, machine_info, machine_lines, med, paired_median_ci, peak_rss_mb,
                                prepare_data, tree_cpu_seconds, verdict)
from benchmarks.aligned_input import aligned_section
from benchmarks.steps import HOST_PATHS, host_overhead
from benchmarks.steps import (LOSSES, TRIVIAL, Key, build, forward_macs, jax_loss_step, loss_function,
                              tf_loss_step, time_interleaved, train_step)
from facenet_kfp.config import DataConfig, TrainConfig
from facenet_kfp.numpy_input import TrainBatches, open_split, worker_count

IDENTITIES = 120
MODEL = TrainConfig()                                  # nn4_small2 at 96 px, P 16 x K 4: what is measured
SMOKE_MODEL = TrainConfig(architecture="small_cnn", image_size=32)
PRECISIONS = ("float32", "mixed_bfloat16")
IN_MEMORY_BATCHES = 4      # distinct real batches cycled through by the model timings
FED_BLOCK = 3              # steps per block when pipeline-fed and in-memory steps alternate
SHARE_TARGET = 0.05
PIPELINE_TARGET = 3.0
FEED_TARGET = 10_000       # images/s one GPU consumes: what the input pipeline must feed
INPUT_RATIO_TARGET = 0.8   # per-core rate of facenet_kfp.numpy_input over tf.data's

Batch = tuple[Any, Any]        # (images [B, S, S, 3], labels [B])


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, and how many rounds of each part: the command line's settings."""
    work: Path
    model: TrainConfig          # architecture, image size and P x K of every trainer; loss and precision vary
    precisions: tuple[str, ...]
    steps: int                  # interleaved rounds of the first precision's steps
    warmup: int                 # untimed steps per configuration, the traced first one included
    other_steps: int            # rounds of each other precision, paired with the default step
    fed_steps: int              # pipeline-fed steps (and as many in-memory ones) of the default step
    loss_repeats: int           # rounds of the loss alone
    pipeline_batches: int       # part 3: batches per repeat of tf.data alone
    pipeline_repeats: int
    input_batches: int          # part 4: timed batches per pipeline and round
    input_rounds: int
    workers: int | None
    backend: str                # "tensorflow" or "jax"
    aligned: bool = True        # part 5: the input pipeline on aligned crops

    @property
    def batch(self) -> int:
        return self.model.p * self.model.k

    @property
    def use_tf(self) -> bool:
        return self.backend == "tensorflow"

    @property
    def default(self) -> Key:
        return self.precisions[0], LOSSES[0]

    @property
    def trivial(self) -> Key:
        return self.precisions[0], TRIVIAL

    @property
    def keys(self) -> list[Key]:
        """The first precision's steps, timed in the same rounds: trivial and every loss."""
        return [self.trivial] + [(self.precisions[0], kind) for kind in LOSSES]

    @property
    def other_keys(self) -> list[Key]:
        """The default loss in each other precision, timed in rounds of its own with the default step."""
        return [(p, LOSSES[0]) for p in self.precisions[1:]]


@dataclasses.dataclass
class Figures:
    """Everything one run measured, in the order the report prints it."""
    data_line: str
    wall: dict[Key, np.ndarray]             # the first precision's rounds: seconds per step
    cpu: dict[Key, np.ndarray]
    first: dict[Key, float]                 # first call (tracing + one step), seconds
    pairs: dict[Key, tuple]                 # other precision -> (wall, cpu, first) of its rounds with the default
    fed: dict[str, tuple[list[float], list[float]]]     # "pipeline" / "memory" -> (wall, CPU) per step
    inputs: dict[str, dict[str, np.ndarray]]            # part 4, see compare_input_pipelines
    alone: dict[Key, np.ndarray]            # the loss alone, seconds per call
    gflop_per_image: float
    pipeline: tuple[float, float] | None    # tf.data alone: (images/s, CPU seconds per batch); None without TF
    rss: dict[str, float]                   # phase -> peak RSS so far, MB

    def step_rate(self, plan: Plan, key: Key) -> float:
        """Images/s of a training step: the first precision from the main rounds, others from theirs."""
        return plan.batch / med(self.wall[key] if key in self.wall else self.pairs[key][0][key])


# ----------------------------------------------------------------------------- data

def input_batches(plan: Plan, data: DataPaths, count: int, seed: int = 0) -> list[Batch]:
    """`count` P x K train batches from the TF-free pipeline (`facenet_kfp.numpy_input`), for the backend
    without tf.data.

    Returns (float32 [B, S, S, 3], int32 [B]) pairs, augmented as training is.
    """
    m = plan.model
    with open_split(*data.split_folders(), "train") as images, \
            TrainBatches(images, images.labels, m.p, m.k, m.image_size, m.crop_fraction, m.augment, seed) as stream:
        return [next(stream) for _ in range(count)]


def tf_train_input(plan: Plan, data: DataPaths) -> tuple[Callable[[int], Any], str]:
    """`tf_input.make_train_dataset` over the train split's bytes in memory: (seed -> dataset, data line)."""
    from facenet_kfp.tf_input import load_split_images, make_train_dataset

    images, labels, _, synthetic = load_split_images(*data.split_folders(), "train")
    m = plan.model
    line = (f"train split {len(np.unique(labels))} identities, {len(images)} images "
            f"({sum(synthetic)} generated by completion)")
    return (lambda seed: make_train_dataset(images, labels, m.p, m.k, m.image_size, m.crop_fraction,
                                            m.augment, seed)), line


# ----------------------------------------------------------------------------- 3, 4. input pipelines

def time_pipeline_alone(plan: Plan, dataset: Callable[[int], Any]) -> tuple[float, float]:
    """Part 3: tf.data alone, no model, every core for it: (images/s, CPU seconds per batch), medians."""
    print(f"timing the input pipeline: {plan.pipeline_repeats} x {plan.pipeline_batches} batches ...", flush=True)
    rates, cpu_per_batch = [], []
    for r in range(plan.pipeline_repeats):
        iterator = iter(dataset(1 + r))
        for _ in range(3):
            next(iterator)              # starts the map workers and fills the prefetch buffer
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(plan.pipeline_batches):
            next(iterator)
        rates.append(plan.pipeline_batches * plan.batch / (time.perf_counter() - start_wall))
        cpu_per_batch.append((time.process_time() - start_cpu) / plan.pipeline_batches)
        del iterator
    return float(np.median(rates)), float(np.median(cpu_per_batch))


def pipeline_makers(plan: Plan, data: DataPaths, split) -> dict[str, Callable[[int], Iterator]]:
    """seed -> a fresh P x K batch stream, for each input pipeline this backend has (part 4)."""
    m = plan.model
    makers: dict[str, Callable[[int], Iterator]] = {
        "input": lambda seed: TrainBatches(split, split.labels, m.p, m.k, m.image_size, m.crop_fraction,
                                           m.augment, seed, workers=plan.workers)}
    if plan.use_tf:
        dataset, _ = tf_train_input(plan, data)
        makers["tf.data"] = lambda seed: iter(dataset(seed))
    return makers


def compare_input_pipelines(plan: Plan, data: DataPaths) -> dict[str, dict[str, np.ndarray]]:
    """Wall and CPU seconds of `plan.input_batches` P x K training batches (augmented) from each input pipeline.

    "input": `facenet_kfp.numpy_input.TrainBatches` over the split read lazily from
    the shards, decoded by `plan.workers` processes; "tf.data":
    `tf_input.make_train_dataset` over the split's bytes in memory (when
    TensorFlow is there). Each round builds every pipeline afresh, lets it
    fill its buffers with 3 untimed batches, then times the batches; the order
    rotates per round. CPU seconds count this process and its worker processes.
    """
    rounds, size = plan.input_rounds, plan.model.image_size
    with open_split(*data.split_folders(), "train") as split:
        makers = pipeline_makers(plan, data, split)
        times = {name: {"wall": np.zeros(rounds), "cpu": np.zeros(rounds)} for name in makers}
        names = list(makers)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                stream = makers[name](100 + r)
                for _ in range(3):
                    next(stream)
                start_wall, start_cpu = time.perf_counter(), tree_cpu_seconds()
                for _ in range(plan.input_batches):
                    pixels, _ = next(stream)
                times[name]["cpu"][r] = tree_cpu_seconds() - start_cpu
                times[name]["wall"][r] = time.perf_counter() - start_wall
                if tuple(pixels.shape) != (plan.batch, size, size, 3):
                    raise SystemExit(f"{name}: batch of shape {tuple(pixels.shape)}")
                if isinstance(stream, TrainBatches):
                    stream.close()              # stops its workers before the other pipeline's round
                del stream
            print(f"  input pipelines: round {r + 1}/{rounds}", flush=True)
    return times


def report_input_pipelines(plan: Plan, times: dict[str, dict[str, np.ndarray]]) -> None:
    """Section 4: images/s and images per CPU-second of each pipeline, their ratio, cores to feed a GPU."""
    images, m = plan.input_batches * plan.batch, plan.model
    print(f"\n4. input pipelines side by side: {plan.batch}-image P x K batches of the demo's 250x250 JPEGs, "
          f"crop {m.crop_fraction}, resize to {m.image_size}, augmented; {plan.input_batches} batches per round, "
          f"{len(next(iter(times.values()))['wall'])} rounds, medians")
    print(f"  facenet_kfp.numpy_input: {worker_count(plan.workers)} worker processes (one per usable core); "
          f"tf.data: AUTOTUNE; CPU time counts this process and its workers")
    cores = f"cores for {FEED_TARGET:,}/s"
    print(f"  {'pipeline':<18} {'images/s':>9} {'images/s per core':>18} {cores:>17}")
    for name, t in times.items():
        per_core = med(images / t["cpu"])
        print(f"  {name:<18} {med(images / t['wall']):9.0f} {per_core:18.0f} {FEED_TARGET / per_core:17.1f}")
    if "tf.data" in times:
        ratios = (times["tf.data"]["cpu"] / times["input"]["cpu"])
        ratio = med(ratios)
        print(f"  per-core rate, facenet_kfp.numpy_input / tf.data: {ratio:.2f} (median of per-round ratios; range "
              f"{ratios.min():.2f}-{ratios.max():.2f}) -> {verdict(ratio >= INPUT_RATIO_TARGET)} "
              f"the >= {INPUT_RATIO_TARGET} target")
    else:
        print("  tf.data: skipped, it needs TensorFlow")


# ----------------------------------------------------------------------------- 1, 2. timing

def time_main_steps(plan: Plan, calls: dict[Key, Callable[[int], float]]):
    """Part 1: the first precision's step functions (trivial and every loss) in interleaved rounds."""
    print(f"timing {len(plan.keys)} {plan.precisions[0]} train steps: {plan.warmup} warm-up each, then "
          f"{plan.steps} interleaved rounds ...", flush=True)
    return time_interleaved({key: calls[key] for key in plan.keys}, plan.warmup, plan.steps, "step")


def time_other_precisions(plan: Plan, calls: dict[Key, Callable[[int], float]]) -> dict[Key, tuple]:
    """Part 1: each other precision in rounds of its own with the default step: key -> (wall, cpu, its first call).

    A much slower step in the main rounds would disturb whichever step follows it.
    """
    pairs = {}
    for key in plan.other_keys:
        print(f"timing {' '.join(key)} against {' '.join(plan.default)}: {plan.other_steps} rounds ...", flush=True)
        wall, cpu, first = time_interleaved({plan.default: calls[plan.default], key: calls[key]}, plan.warmup,
                                            plan.other_steps, "step", warm=(plan.default,))
        pairs[key] = (wall, cpu, first[key])
    return pairs


def fed_stream(plan: Plan, data: DataPaths, dataset: Callable[[int], Any] | None):
    """The backend's training pipeline, seed 100: (iterator, split to close or None)."""
    if dataset is not None:
        return iter(dataset(100)), None
    m, split = plan.model, open_split(*data.split_folders(), "train")
    return TrainBatches(split, split.labels, m.p, m.k, m.image_size, m.crop_fraction, m.augment, 100,
                        workers=plan.workers), split


def time_fed_steps(plan: Plan, data: DataPaths, dataset: Callable[[int], Any] | None, step: Callable,
                   batches: list[Batch]) -> dict[str, tuple[list[float], list[float]]]:
    """Part 3: the default step fed by the backend's pipeline against the step on in-memory batches.

    The pipeline (tf.data, or TrainBatches and its workers) then shares the
    cores with the model; blocks of the two alternate, so steps next to each
    other in time compare, whatever the other jobs do. Single steps cannot
    alternate: the prefetch buffer would fill during the in-memory step and
    charge it the pipeline's work. Returns source -> (wall, CPU seconds per step).
    """
    print(f"timing {' '.join(plan.default)} fed by the pipeline: {plan.fed_steps} steps, in blocks alternating "
          f"with in-memory steps ...", flush=True)
    iterator, split = fed_stream(plan, data, dataset)
    for _ in range(plan.warmup):
        step(*next(iterator))
    fed: dict[str, tuple[list[float], list[float]]] = {"pipeline": ([], []), "memory": ([], [])}
    block = min(FED_BLOCK, plan.fed_steps)
    for _ in range(-(-plan.fed_steps // block)):
        for source in ("pipeline", "memory"):
            for i in range(block):
                start_cpu, start_wall = tree_cpu_seconds(), time.perf_counter()
                step(*(next(iterator) if source == "pipeline" else batches[i % len(batches)]))
                fed[source][0].append(time.perf_counter() - start_wall)
                fed[source][1].append(tree_cpu_seconds() - start_cpu)
    if split is not None:
        iterator.close()
        split.close()
    return fed


def time_loss_alone(plan: Plan, model, batches: list[Batch]) -> dict[Key, np.ndarray]:
    """Part 2 (b): `batch_loss` forward + backward alone on the model's embeddings of the same real batches."""
    loss_step = tf_loss_step if plan.use_tf else jax_loss_step
    embeddings = [(y, model(x, training=False)) for x, y in batches]
    calls = {(plan.precisions[0], kind): (lambda i, step=loss_step(loss_function(plan.model, kind)):
                                          step(*embeddings[i % len(embeddings)]))
             for kind in LOSSES}
    print(f"timing batch_loss forward + backward alone: {plan.loss_repeats} rounds ...", flush=True)
    alone, _, _ = time_interleaved(calls, 3, plan.loss_repeats, "loss alone")
    return alone


def measure(plan: Plan, data: DataPaths, rss: dict[str, float]) -> Figures:
    """Every part in the order that keeps them apart: model batches, tf.data alone, steps, fed steps,
    the two input pipelines, the loss alone."""
    dataset, pipeline = None, None
    if plan.use_tf:                         # real batches for the model: the training pipeline's own output
        dataset, data_line = tf_train_input(plan, data)
        batches = list(dataset(0).take(IN_MEMORY_BATCHES))
        pipeline = time_pipeline_alone(plan, dataset)
        rss["pipeline"] = peak_rss_mb()
    else:
        batches = input_batches(plan, data, IN_MEMORY_BATCHES)
        data_line = f"{IN_MEMORY_BATCHES} P x K batches of the train split from facenet_kfp.numpy_input"
    keras.utils.set_random_seed(0)
    trainers = {key: build(plan.model, *key) for key in plan.keys + plan.other_keys}
    steps = {key: train_step(trainer) for key, trainer in trainers.items()}
    calls = {key: (lambda i, step=step: step(*batches[i % len(batches)])) for key, step in steps.items()}
    wall, cpu, first = time_main_steps(plan, calls)
    rss["steps"] = peak_rss_mb()
    pairs = time_other_precisions(plan, calls)
    fed = time_fed_steps(plan, data, dataset, steps[plan.default], batches)
    print(f"timing the input pipelines side by side: {plan.input_rounds} rounds ...", flush=True)
    inputs = compare_input_pipelines(plan, data)
    rss["input pipelines"] = peak_rss_mb()
    model = trainers[plan.default].embedding
    alone = time_loss_alone(plan, model, batches)
    rss["loss alone"] = peak_rss_mb()
    gflop_per_image = 3 * 2 * forward_macs(model) / 1e9     # backward ~ 2x forward; 2 FLOP per MAC
    return Figures(data_line, wall, cpu, first, pairs, fed, inputs, alone, gflop_per_image, pipeline, rss)


# ----------------------------------------------------------------------------- report

def print_machine(plan: Plan, start_load: float) -> None:
    for line in machine_lines(machine_info(plan.backend)):
        print(line)
    print(f"  load average {start_load:.1f} at start: other jobs share the cores, so compare figures "
          f"within this run")


def print_setup(plan: Plan, fig: Figures) -> None:
    """What was measured: data, model, timing."""
    m = plan.model
    print(f"data: {IDENTITIES}-identity demo archive in {plan.work}; {fig.data_line}")
    print(f"model: {m.architecture} {m.image_size}x{m.image_size}, {m.embedding_dim}-D embeddings, batch "
          f"{plan.batch} = P {m.p} x K {m.k}, train.build_trainer (Adam, lr 1e-3 cosine), Keras train_on_batch: "
          f"{'tf.function without XLA' if plan.use_tf else 'jax.jit'}")
    print(f"timing: medians; {plan.precisions[0]}: {plan.steps} interleaved rounds of its {len(plan.keys)} steps"
          + "".join(f"; {key[0]}: {plan.other_steps} rounds paired with {' '.join(plan.default)}"
                    for key in plan.other_keys)
          + f"; {plan.warmup} warm-up steps each, the first of which traces")


def report_steps(plan: Plan, fig: Figures) -> None:
    """Section 1: each training step's time, rate, CPU time and first call; GFLOP/s; precision speed-ups."""
    print("\n1. training step: forward, mining + loss + batch statistics, backward, Adam update")
    print(f"{'precision':<15} {'loss':<11} {'steps':>5} {'ms/step':>8} {'IQR ms':>12} {'images/s':>9} "
          f"{'CPU s/step':>11} {'img/CPU-s':>10} {'first call s':>13}")
    rows = [(key, fig.wall[key], fig.cpu[key], fig.first[key]) for key in plan.keys]
    rows += [(key, fig.pairs[key][0][key], fig.pairs[key][1][key], fig.pairs[key][2]) for key in plan.other_keys]
    for key, key_wall, key_cpu, key_first in rows:
        t, c = med(key_wall), med(key_cpu)
        print(f"{key[0]:<15} {key[1]:<11} {len(key_wall):5d} {t * 1e3:8.0f} {iqr_ms(key_wall):>12} "
              f"{plan.batch / t:9.1f} {c:11.2f} {plan.batch / c:10.1f} {key_first:13.1f}")
    default = plan.default
    print(f"  {' '.join(default)}: about {fig.gflop_per_image * fig.step_rate(plan, default):.0f} GFLOP/s achieved "
          f"({fig.gflop_per_image:.2f} GFLOP per image and step = 3 x the forward Conv2D/Dense MACs x 2)")
    for key in plan.other_keys:
        pair_wall, pair_cpu, _ = fig.pairs[key]
        print(f"  {key[0]} / {plan.precisions[0]} speed ({key[1]}, per-round ratios of its own rounds): "
              f"{med(pair_wall[default] / pair_wall[key]):.2f}x wall, "
              f"{med(pair_cpu[default] / pair_cpu[key]):.2f}x CPU time")


def report_share(plan: Plan, fig: Figures) -> None:
    """Section 2: the mining + loss share of the step, (a) by difference with the trivial step, (b) alone."""
    main_precision = plan.precisions[0]
    print(f"\n2. mining + loss share of the step (target < {SHARE_TARGET:.0%})")
    print("  (a) real step - trivial step (mean of the embeddings) of the same round: median and 95% "
          "bootstrap interval,\n      of wall time and of CPU time (the latter moves less with other jobs)")
    for kind in LOSSES:
        key, parts = (main_precision, kind), []
        for name, times in (("wall", fig.wall), ("CPU", fig.cpu)):
            t = med(times[key])
            diff, low, high = paired_median_ci(times[key] - times[plan.trivial])
            parts.append(f"{name} {diff * 1e3:+5.0f} ms [{low * 1e3:+.0f}, {high * 1e3:+.0f}] = {diff / t:+5.1%} "
                         f"[{low / t:+.1%}, {high / t:+.1%}]")
        print(f"  {main_precision:<15} {kind:<11} " + "; ".join(parts))
    print(f"  (b) batch_loss forward + backward alone on the model's [{plan.batch}, {plan.model.embedding_dim}] "
          f"float32 embeddings, compiled the same way\n      (call overhead included), over the step time; the "
          f"loss runs in float32 in every precision")
    worst = 0.0
    for key in [k for k in plan.keys if k[1] != TRIVIAL] + plan.other_keys:
        times = fig.alone[(main_precision, key[1])]
        share = med(times) * fig.step_rate(plan, key) / plan.batch
        worst = max(worst, share)
        print(f"  {key[0]:<15} {key[1]:<11} {med(times) * 1e3:6.2f} ms (IQR {iqr_ms(times, 2)} ms) "
              f"= {share:6.2%} of the step")
    print(f"  largest share (b): {worst:.2%} -> {verdict(worst < SHARE_TARGET)} the < {SHARE_TARGET:.0%} target")


def report_pipeline(plan: Plan, fig: Figures) -> None:
    """Section 3: tf.data alone against the model's consumption, and the default step fed by the pipeline."""
    print(f"\n3. input pipeline vs the model's consumption (target >= {PIPELINE_TARGET:.0f}x)")
    default = plan.default
    if fig.pipeline is None:
        print(f"  tf.data alone: skipped, it needs TensorFlow (KERAS_BACKEND={plan.backend}); part 4 times "
              f"facenet_kfp.numpy_input alone")
    else:
        rate, pipeline_cpu = fig.pipeline
        print(f"  make_train_dataset alone (decode + crop, resize {plan.model.image_size}, augment, batch): "
              f"{rate:.0f} images/s (median of {plan.pipeline_repeats} x {plan.pipeline_batches} batches)")
        for key in [default] + plan.other_keys:
            ratio = rate / fig.step_rate(plan, key)
            print(f"  {key[0]:<15} {key[1]} consumes {fig.step_rate(plan, key):6.1f} images/s: pipeline / model = "
                  f"{ratio:6.1f}x -> {verdict(ratio >= PIPELINE_TARGET)} the target")
        model_cpu = med(fig.cpu[default])
        print(f"  CPU: the pipeline spends {pipeline_cpu * 1e3:.0f} CPU-ms per batch, {' '.join(default)} "
              f"{model_cpu:.2f} CPU-s per step: {model_cpu / pipeline_cpu:.0f}x (the pipeline takes "
              f"{pipeline_cpu / (pipeline_cpu + model_cpu):.1%} of the CPU when training)")
    fed_wall, fed_cpu = np.asarray(fig.fed["pipeline"][0]), np.asarray(fig.fed["pipeline"][1])
    mem_wall, mem_cpu = np.asarray(fig.fed["memory"][0]), np.asarray(fig.fed["memory"][1])
    print(f"  {' '.join(default)} fed by the live pipeline "
          f"({'tf.data' if plan.use_tf else 'facenet_kfp.numpy_input.TrainBatches'}) vs from memory, alternating "
          f"blocks of {min(FED_BLOCK, plan.fed_steps)} ({len(fed_wall)} steps each; CPU counts the pipeline's "
          f"workers):")
    print(f"    pipeline-fed {plan.batch / med(fed_wall):6.1f} images/s, {med(fed_cpu):.2f} CPU-s/step; in-memory "
          f"{plan.batch / med(mem_wall):6.1f} images/s, {med(mem_cpu):.2f} CPU-s/step; fed / memory speed "
          f"{med(mem_wall) / med(fed_wall):.2f}x")


def report(plan: Plan, fig: Figures, start_load: float, wall_start: float) -> None:
    print()
    print_machine(plan, start_load)
    print_setup(plan, fig)
    report_steps(plan, fig)
    report_share(plan, fig)
    report_pipeline(plan, fig)
    report_input_pipelines(plan, fig.inputs)
    print(f"\n5. peak RSS of this process: {peak_rss_mb():.0f} MB (after "
          + ", ".join(f"{phase}: {mb:.0f}" for phase, mb in fig.rss.items()) + " MB)")
    host_section(plan)
    print(f"total wall time {time.perf_counter() - wall_start:.0f} s")


def host_batches(plan: Plan, count: int = 4) -> list[Batch]:
    """`count` float32 P x K batches of generated faces (unaugmented, decoded in this process)."""
    from facenet_kfp.synth import render_jpeg

    m = plan.model
    identities = m.p * 2
    images = [render_jpeg(7, i % identities, i, 64) for i in range(identities * m.k)]
    labels = np.arange(len(images)) % identities
    with TrainBatches(images, labels, m.p, m.k, m.image_size, m.crop_fraction, False, 0, workers=0) as stream:
        return [next(stream) for _ in range(count)]


def host_section(plan: Plan) -> None:
    """Part 6: host ms/step of float32 + per-step readback against uint8 + periodic readback."""
    from facenet_kfp.monitor import READBACK_STEPS

    steps, rounds = (20, 4) if plan.steps <= 3 else (100, 8)
    batches = host_batches(plan)
    print(f"timing the host's part of a step: {rounds} rounds of {steps} steps ...", flush=True)
    times = host_overhead(plan.model, batches, steps, rounds)
    float_bytes = batches[0][0].nbytes
    print(f"\n6. host time per step ({plan.backend}, {plan.model.p * plan.model.k} images of "
          f"{plan.model.image_size} px, trivially cheap model; readback every {READBACK_STEPS} steps):")
    for name in HOST_PATHS:
        nbytes = float_bytes // 4 if name.startswith("uint8") else float_bytes
        wall, cpu = times[name]["wall"], times[name]["cpu"]
        print(f"  {name:<31} {med(wall) * 1e3:7.2f} ms/step wall, {med(cpu) * 1e3:7.2f} ms/step CPU, "
              f"{nbytes / 1e6:.2f} MB per batch to the device")
    before, after = (times[name] for name in HOST_PATHS[:2])
    print(f"  before / after: {med(before['wall']) / med(after['wall']):.2f}x wall, "
          f"{med(before['cpu']) / med(after['cpu']):.2f}x CPU, {float_bytes / (float_bytes // 4):.0f}x bytes")


# ----------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="data/bench/train-demo", help="archive and prepared data (reused)")
    p.add_argument("--steps", type=int, default=12,
                   help="interleaved rounds of the first precision's steps (trivial + 3 losses); each "
                        "other precision gets a quarter of that, at least 3, paired with the default step "
                        "(default 12: 8-13 minutes on 2 shared cores; 20-30 narrows the intervals)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration, the "
                   "traced first one included (default 2)")
    p.add_argument("--precisions", default="float32,mixed_bfloat16",
                   help="comma-separated Keras dtype policies; the first gets every loss and the "
                        "trivial one, the others the default loss (default float32,mixed_bfloat16)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 timed steps, short pipeline "
                   "and loss timings")
    p.add_argument("--smoke", action="store_true", help="check the script: --quick on small_cnn at 32 px, "
                   "2 timed steps, 1 warm-up, a few batches (figures mean nothing)")
    p.add_argument("--input-only", action="store_true", help="only part 4: the two input pipelines "
                   "side by side (a few minutes)")
    p.add_argument("--no-aligned", action="store_true", help="leave out part 5, the input pipeline on "
                   "aligned crops (it aligns the demo's faces once, a few minutes; --smoke leaves it out too)")
    p.add_argument("--input-batches", type=int, default=30,
                   help="timed batches per pipeline and round in part 4 (default 30)")
    p.add_argument("--input-rounds", type=int, default=5, help="rounds of part 4 (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes of facenet_kfp.numpy_input (default: one per usable core)")
    p.add_argument("--host-only", action="store_true", help="only part 6: the host's time per step, "
                   "before and after (about a minute)")
    p.add_argument("-v", "--verbose", action="store_true", help="library INFO logs")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    """The plan the command line asks for; SystemExit (status 2) naming the option that is wrong."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.quick or args.smoke:
        args.steps = 3
        args.input_batches, args.input_rounds = 10, 2
    if args.smoke:
        args.steps, args.warmup, args.input_batches, args.input_rounds = 2, 1, 2, 1
    if args.input_batches < 1 or args.input_rounds < 1:
        cli.error("--input-batches and --input-rounds must be >= 1")
    if args.workers is not None and args.workers < 0:
        cli.error("--workers must be >= 0 (0: decode in the benchmark's process)")
    if args.steps < 2 or args.warmup < 1:
        cli.error("--steps must be >= 2 and --warmup >= 1")
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    for p in precisions:
        # mixed_float16 would need loss scaling (a GPU setting): not benchmarked on CPU.
        if p not in PRECISIONS:
            cli.error(f"--precisions: {p!r} is not one of {', '.join(PRECISIONS)}")
    if not precisions or len(set(precisions)) != len(precisions):
        cli.error("--precisions: give one or more distinct policies")
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(f"KERAS_BACKEND={backend}: this benchmark runs on tensorflow or jax")
    short = args.quick or args.smoke
    pipeline_batches, pipeline_repeats = (2, 1) if args.smoke else (10, 1) if short else (50, 3)
    plan = Plan(work=Path(args.work), model=SMOKE_MODEL if args.smoke else MODEL, precisions=precisions,
                steps=args.steps, warmup=args.warmup, other_steps=max(3, args.steps // 4),
                fed_steps=max(2, args.steps // 2), loss_repeats=5 if args.smoke else 20 if short else 200,
                pipeline_batches=pipeline_batches, pipeline_repeats=pipeline_repeats,
                input_batches=args.input_batches, input_rounds=args.input_rounds, workers=args.workers,
                backend=backend, aligned=not (args.no_aligned or args.smoke))
    return plan, args


class _DropRetracingWarning(logging.Filter):
    """Drops TF's 'triggered tf.function retracing' heuristic, which fires because this script builds
    several trainers, each tracing its own step function once (its input shapes never change)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def input_only(plan: Plan, data: DataPaths, start_load: float) -> None:
    """`--input-only`: part 4 alone, with the machine it ran on."""
    print(f"timing the input pipelines side by side: {plan.input_rounds} rounds ...", flush=True)
    inputs = compare_input_pipelines(plan, data)
    print()
    print_machine(plan, start_load)
    report_input_pipelines(plan, inputs)
    if plan.aligned:
        aligned_section(plan, data, IDENTITIES)
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")



def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").addFilter(_DropRetracingWarning())
    wall_start = time.perf_counter()
    start_load = os.getloadavg()[0]
    if args.host_only:
        print_machine(plan, start_load)
        host_section(plan)
        return 0
    data = prepare_data(plan.work, plan.work / "work", identities=IDENTITIES,
                        data=DataConfig(multiple=plan.model.k))
    rss = {"data": peak_rss_mb()}
    if args.input_only:
        input_only(plan, data, start_load)
        return 0
    report(plan, measure(plan, data, rss), start_load, wall_start)
    if plan.aligned:
        aligned_section(plan, data, IDENTITIES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
