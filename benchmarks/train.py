"""Benchmark training throughput, the mining + loss share of a step and input-pipeline headroom on this machine.

nn4_small2 at 96x96, batch 64 = P 16 x K 4, Adam, real images of a generated
demo archive (120 identities, generated once into data/bench/train-demo/ and
prepared with the library's extract, labels, completion and splits functions).
Measured side by side in one run, so the ratios hold even when the machine is
shared and absolute numbers drift:

1. training images/s of the full step (forward, mining + loss + the training
   statistics `train.batch_loss` computes, backward, Adam update), compiled
   the way `train.train` compiles it (tf.function, no XLA), for batch_hard
   (the default), batch_all and semi_hard, in float32 and mixed_bfloat16;
2. the share of step time spent in mining + loss, two ways: (a) the same step
   with a trivial loss of the same embeddings (their mean), timed in the same
   interleaved rounds: share = (real - trivial) / real; (b) `batch_loss`
   forward + backward alone on the model's [64, 128] embeddings, compiled the
   same way: share = alone / real step. Target < 5%;
3. the input pipeline alone (`data.make_train_dataset`: decode, crop, resize
   to 96, augment, batch; no model) against the model's consumption rate
   (target >= 3x), and the step rate when the model is fed by that pipeline,
   both competing for the same cores, against the rate from batches in memory;
4. the peak RSS of this process.

Every figure is the median over timed steps after warm-up steps (the first
call traces the graph and is reported separately). The configurations are
timed in interleaved rounds, in a rotating order, so that load from other
jobs hits them alike.

With KERAS_BACKEND=jax (no TensorFlow) only the model + loss part runs, jitted
with jax.jit on batches decoded with Pillow (centre crop, no augmentation);
the tf.data part is skipped. That path is untested: JAX is not installed on
the development machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

import keras
from keras import ops

from facenet_kfp.complete import complete_dataset
from facenet_kfp.config import TrainConfig
from facenet_kfp.extract import extract_dataset
from facenet_kfp.labels import build_labels
from facenet_kfp.model import build_embedding_model
from facenet_kfp.splits import make_splits
from facenet_kfp.synth import generate_demo_archive
from facenet_kfp.train import batch_loss

IDENTITIES = 120
ARCHITECTURE = "nn4_small2"
IMAGE_SIZE = 96
P, K = 16, 4
BATCH = P * K
LOSSES = ("batch_hard", "batch_all", "semi_hard")      # batch_hard first: the default
TRIVIAL = "trivial"
IN_MEMORY_BATCHES = 4      # distinct real batches cycled through by the model timings
SHARE_TARGET = 0.05
PIPELINE_TARGET = 3.0


# ----------------------------------------------------------------------------- data

def prepare_data(root: Path) -> Path:
    """Demo archive in `root` and its prepared dataset in `root`/work, each made only when missing.

    Every output folder is written atomically by the library, so a folder that
    exists is complete.
    """
    archive = root / "lfw.tgz"
    if not archive.is_file():
        print(f"generating a {IDENTITIES}-identity demo archive in {root} (once) ...", flush=True)
        start = time.perf_counter()
        generate_demo_archive(root, identities=IDENTITIES)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    work = root / "work"
    steps = [
        ("extract", work / "images", lambda: extract_dataset(archive, work / "images")),
        ("labels", work / "labels", lambda: build_labels(work / "images", work / "labels")),
        ("complete", work / "completion",
         lambda: complete_dataset(work / "images", work / "labels", work / "completion", multiple=K)),
        ("splits", work / "splits", lambda: make_splits(work / "labels", work / "splits")),
    ]
    for name, folder, run in steps:
        if not folder.is_dir():
            print(f"preparing: {name} -> {folder}", flush=True)
            run()
    return work


def pil_batches(work: Path, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` P x K batches of train-split images decoded with Pillow, for the backend without tf.data.

    Same pixels as `data.preprocess_image` without augmentation, up to the
    resampling filter: centre crop of TrainConfig.crop_fraction, box-filter
    resize to 96, scaled to [-1, 1]. Returns (float32 [B, 96, 96, 3], int32 [B]).
    """
    import io

    from PIL import Image

    from facenet_kfp.labels import load_labels
    from facenet_kfp.shards import ShardReader, read_manifest
    from facenet_kfp.splits import read_split

    crop = TrainConfig().crop_fraction
    label_ids, _ = load_labels(work / "labels")
    train = {name for name, _ in read_split(work / "splits", "train")}
    rows: dict[str, list[tuple[Path, dict]]] = {}
    for folder in (work / "images", work / "completion"):
        for row in read_manifest(folder):
            if row["identity"] in train:
                rows.setdefault(row["identity"], []).append((folder, row))
    eligible = sorted(name for name, found in rows.items() if len(found) >= K)
    if len(eligible) < P:
        raise SystemExit(f"{work}: only {len(eligible)} train identities have {K}+ images; need {P}")
    rng = np.random.default_rng(seed)
    readers = {folder: ShardReader(folder) for folder in (work / "images", work / "completion")}
    batches = []
    try:
        for _ in range(count):
            images, labels = [], []
            for name in rng.choice(eligible, size=P, replace=False):
                for index in rng.choice(len(rows[name]), size=K, replace=False):
                    folder, row = rows[name][index]
                    with Image.open(io.BytesIO(readers[folder].read(row))) as image:
                        image = image.convert("RGB")
                        width, height = image.size
                        box_w, box_h = round(width * crop), round(height * crop)
                        left, top = (width - box_w) // 2, (height - box_h) // 2
                        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX,
                                             box=(left, top, left + box_w, top + box_h))
                        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
                    labels.append(label_ids[name])
            batches.append((np.stack(images), np.asarray(labels, dtype=np.int32)))
    finally:
        for reader in readers.values():
            reader.close()
    return batches


# ----------------------------------------------------------------------------- compiled steps

def loss_function(kind: str) -> Callable:
    """labels [B], embeddings [B, D] -> dict with "loss": what the train step differentiates.

    A real kind is `train.batch_loss` (loss plus the statistics every training
    step computes); TRIVIAL is the mean of the embeddings, which keeps the
    whole backward pass through the network but mines nothing.
    """
    if kind == TRIVIAL:
        return lambda labels, embeddings: {"loss": ops.mean(ops.cast(embeddings, "float32"))}
    config = TrainConfig(loss=kind)
    return lambda labels, embeddings: batch_loss(config, labels, embeddings)


def tf_train_step(model, optimizer, loss_fn) -> Callable:
    """One compiled optimizer step, as `train.train` builds it (tf.function, no XLA); returns the loss."""
    import tensorflow as tf

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            out = loss_fn(labels, model(images, training=True))
        optimizer.apply(tape.gradient(out["loss"], model.trainable_variables), model.trainable_variables)
        return out

    # A tf.function call on CPU returns after every op of the graph, the update included, has run.
    return lambda images, labels: float(step(images, labels)["loss"])


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


def jax_train_step(model, optimizer, loss_fn) -> Callable:
    """The same step with jax.jit over Keras' stateless API; each step function keeps its own weights."""
    import jax

    def objective(trainable, non_trainable, images, labels):
        embeddings, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
        out = loss_fn(labels, embeddings)
        return out["loss"], (out, non_trainable)

    gradient_fn = jax.value_and_grad(objective, has_aux=True)

    @jax.jit
    def step(state, images, labels):
        trainable, non_trainable, optimizer_state = state
        (_, (out, non_trainable)), gradients = gradient_fn(trainable, non_trainable, images, labels)
        trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, gradients, trainable)
        return out, (trainable, non_trainable, optimizer_state)

    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])

    def run(images, labels):
        nonlocal state
        out, state = step(state, images, labels)
        jax.block_until_ready((out, state))
        return float(out["loss"])
    return run


def jax_loss_step(loss_fn) -> Callable:
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


# ----------------------------------------------------------------------------- timing

def time_interleaved(calls: dict[str, Callable[[int], float]], warmup: int, repeats: int,
                     desc: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each entry over `repeats` rounds, after `warmup` untimed calls each.

    Each round calls every entry once, in an order rotated by one per round, so
    slow spells of a shared machine spread over all entries. Returns (times,
    first-call seconds, i.e. tracing + compiling + one call).
    """
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        loss = call(0)
        first[name] = time.perf_counter() - start
        if not np.isfinite(loss):
            raise SystemExit(f"{desc} {name}: loss is {loss} on the first step")
        for i in range(1, warmup):
            call(i)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    report = time.monotonic()
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name](warmup + r)
            times[name].append(time.perf_counter() - start)
        if time.monotonic() - report > 30:
            report = time.monotonic()
            print(f"  {desc}: round {r + 1}/{repeats}", flush=True)
    return times, first


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Interquartile range as 'p25-p75' in ms."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{q1 * 1e3:.0f}-{q3 * 1e3:.0f}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


# ----------------------------------------------------------------------------- report

def machine_lines(backend: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    flags: set[str] = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    lines = [f"machine: {platform.system()} {platform.machine()}, {cpu}, os.cpu_count()={os.cpu_count()}, "
             f"usable cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f} at start",
             f"  CPU bfloat16 instructions: {', '.join(bf16) if bf16 else 'none (avx512_bf16/amx_bf16 absent)'}"]
    if backend == "tensorflow":
        import tensorflow as tf
        devices = ", ".join(d.name for d in tf.config.list_logical_devices())
        lines.append(f"keras {keras.__version__}, backend tensorflow, TF {tf.__version__}, devices: {devices}")
    else:
        import jax
        lines.append(f"keras {keras.__version__}, backend jax, jax {jax.__version__}, devices: {jax.devices()}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="data/bench/train-demo", help="archive and prepared data (reused)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration, the "
                        "traced first one included (default 3)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="comma-separated Keras dtype policies (default float32,mixed_bfloat16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 timed steps, 2 warm-up, "
                        "short pipeline and loss timings")
    parser.add_argument("-v", "--verbose", action="store_true", help="library INFO logs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 2
    if args.steps < 2 or args.warmup < 1:
        parser.error("--steps must be >= 2 and --warmup >= 1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        if p not in ("float32", "mixed_bfloat16", "mixed_float16"):
            parser.error(f"--precisions: unknown policy {p!r}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipeline_batches, pipeline_repeats = (10, 1) if args.quick else (50, 3)
    loss_repeats = 30 if args.quick else 200

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(f"KERAS_BACKEND={backend}: this benchmark runs on tensorflow or jax")
    use_tf = backend == "tensorflow"
    wall_start = time.perf_counter()
    work = prepare_data(Path(args.work))
    rss = {"data prepared": peak_rss_mb()}

    # Real batches for the model timings: the training pipeline's own output on TF.
    pipeline = None
    if use_tf:
        import tensorflow as tf

        from facenet_kfp.data import load_split_images, make_train_dataset
        images, labels, _, synthetic = load_split_images(work / "images", work / "completion", work / "labels",
                                                         work / "splits", "train")
        config = TrainConfig()
        data_line = (f"train split: {len(np.unique(labels))} identities, {len(images)} images "
                     f"({sum(synthetic)} generated by completion)")

        def dataset(seed: int):
            return make_train_dataset(images, labels, P, K, IMAGE_SIZE, config.crop_fraction,
                                      config.augment, seed)
        batches = list(dataset(0).take(IN_MEMORY_BATCHES))
        train_step, loss_step = tf_train_step, tf_loss_step

        # 3. input pipeline alone: no model, all cores for tf.data.
        rates = []
        for r in range(pipeline_repeats):
            iterator = iter(dataset(1 + r))
            for _ in range(3):
                next(iterator)              # starts the workers and fills the prefetch buffer
            start = time.perf_counter()
            for _ in range(pipeline_batches):
                next(iterator)
            rates.append(pipeline_batches * BATCH / (time.perf_counter() - start))
            del iterator
        pipeline = median(rates)
        rss["input pipeline"] = peak_rss_mb()
    else:
        batches = pil_batches(work, IN_MEMORY_BATCHES)
        data_line = f"{IN_MEMORY_BATCHES} P x K batches of train-split images decoded with Pillow"
        train_step, loss_step = jax_train_step, jax_loss_step

    # 1, 2. model steps, then the loss alone on that model's embeddings.
    kinds = (TRIVIAL,) + LOSSES
    results: dict[str, dict] = {}
    for precision in precisions:
        print(f"timing {precision}: {len(kinds)} step functions x ({args.warmup} warm-up + {args.steps} "
              f"timed steps) ...", flush=True)
        keras.utils.set_random_seed(0)
        previous = keras.mixed_precision.global_policy()
        try:
            keras.mixed_precision.set_global_policy(precision)
            model = build_embedding_model((IMAGE_SIZE, IMAGE_SIZE, 3), 128, ARCHITECTURE)
            optimizer = keras.optimizers.Adam(learning_rate=1e-3)
            if precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        steps = {kind: train_step(model, optimizer, loss_function(kind)) for kind in kinds}
        calls = {kind: (lambda i, step=step: step(*batches[i % len(batches)])) for kind, step in steps.items()}
        step_times, first = time_interleaved(calls, args.warmup, args.steps, precision)

        fed = None
        if use_tf:
            # Fed by the live pipeline, which now shares the cores with the model.
            iterator = iter(dataset(100))
            for _ in range(args.warmup):
                steps[LOSSES[0]](*next(iterator))
            fed_times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                steps[LOSSES[0]](*next(iterator))
                fed_times.append(time.perf_counter() - start)
            del iterator
            fed = median(fed_times)

        embeddings = [(batch_labels, model(batch_images, training=False)) for batch_images, batch_labels in batches]
        loss_calls = {kind: (lambda i, step=loss_step(loss_function(kind)): step(*embeddings[i % len(embeddings)]))
                      for kind in LOSSES}
        loss_times, _ = time_interleaved(loss_calls, 3, loss_repeats, f"{precision} loss alone")
        results[precision] = {"steps": step_times, "first": first, "fed": fed, "loss": loss_times}
        rss[f"{precision} model"] = peak_rss_mb()
        del model, optimizer, steps, calls

    # ------------------------------------------------------------------ report
    print()
    for line in machine_lines(backend):
        print(line)
    print(f"data: {IDENTITIES}-identity demo archive in {args.work}; {data_line}")
    print(f"model: {ARCHITECTURE} {IMAGE_SIZE}x{IMAGE_SIZE}, 128-D, batch {BATCH} = P {P} x K {K}, Adam; "
          f"{'tf.function (no XLA), as train.train' if use_tf else 'jax.jit'}; "
          f"median of {args.steps} timed steps after {args.warmup} warm-up, interleaved rounds")

    print("\n1. training step (forward, mining + loss + statistics, backward, Adam)")
    print(f"{'precision':<15} {'loss':<11} {'ms/step':>8} {'IQR ms':>10} {'images/s':>9} "
          f"{'vs 1st':>7} {'first call s':>13}")
    base = {}
    for precision, res in results.items():
        for kind in (TRIVIAL,) + LOSSES:
            t = median(res["steps"][kind])
            base.setdefault(kind, t)
            print(f"{precision:<15} {kind:<11} {t * 1e3:8.0f} {spread(res['steps'][kind]):>10} "
                  f"{BATCH / t:9.1f} {base[kind] / t:6.2f}x {res['first'][kind]:13.1f}")

    print(f"\n2. mining + loss share of the step (target < {SHARE_TARGET:.0%})")
    print(f"{'precision':<15} {'loss':<11} {'step ms':>8} {'trivial ms':>11} {'diff ms':>8} {'share':>7}"
          f"   {'alone ms':>9} {'share':>7}")
    worst = 0.0
    for precision, res in results.items():
        trivial = median(res["steps"][TRIVIAL])
        for kind in LOSSES:
            t = median(res["steps"][kind])
            alone = median(res["loss"][kind])
            worst = max(worst, alone / t)
            print(f"{precision:<15} {kind:<11} {t * 1e3:8.0f} {trivial * 1e3:11.0f} {(t - trivial) * 1e3:8.1f} "
                  f"{(t - trivial) / t:7.1%}   {alone * 1e3:9.2f} {alone / t:7.2%}")
    print("  diff = real - trivial step (same rounds; noisy, can be negative); alone = batch_loss forward + "
          "backward\n  on the model's [64, 128] embeddings, compiled the same way (includes the call overhead)")
    print(f"  largest 'alone' share: {worst:.2%} -> {'meets' if worst < SHARE_TARGET else 'MISSES'} "
          f"the < {SHARE_TARGET:.0%} target")

    print(f"\n3. input pipeline vs model (target >= {PIPELINE_TARGET:.0f}x)")
    if pipeline is None:
        print(f"  skipped: the tf.data pipeline needs TensorFlow (KERAS_BACKEND={backend})")
    else:
        print(f"  make_train_dataset alone (decode, crop, resize {IMAGE_SIZE}, augment, batch): "
              f"{pipeline:8.0f} images/s (median of {pipeline_repeats} x {pipeline_batches} batches)")
        for precision, res in results.items():
            model_rate = BATCH / median(res["steps"][LOSSES[0]])
            fed_rate = BATCH / res["fed"]
            print(f"  {precision:<15} model consumes {model_rate:6.1f} images/s ({LOSSES[0]}): pipeline / model "
                  f"= {pipeline / model_rate:6.1f}x -> {'meets' if pipeline / model_rate >= PIPELINE_TARGET else 'MISSES'}"
                  f" target")
            print(f"  {'':<15} fed by the live pipeline: {fed_rate:6.1f} images/s = {fed_rate / model_rate:.2f} "
                  f"of the in-memory rate (both share the cores)")

    print(f"\n4. peak RSS of this process: {peak_rss_mb():.0f} MB  ("
          + ", ".join(f"after {phase}: {mb:.0f}" for phase, mb in rss.items()) + ")")
    print(f"total wall time {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
