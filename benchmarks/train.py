"""Benchmark training throughput, the mining + loss share of a step and input-pipeline headroom on this machine.

nn4_small2 at 96x96, batch 64 = P 16 x K 4, Adam, on real images of a
generated demo archive (120 identities, made once in data/bench/train-demo/
and prepared there by the library's extract, labels, completion and splits
functions). Everything is measured side by side in one run, so the ratios
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
5. the peak RSS of this process.

Figures are medians over timed steps after warm-up steps (the first call
traces the graph; its time is shown apart). The step functions run in
interleaved rounds, in a rotating order, so load from other jobs hits them
alike.

With KERAS_BACKEND=jax (no TensorFlow) the same trainers run jitted, on
batches from `facenet_kfp.numpy_input`; the tf.data figures of parts 3 and 4 are
skipped and say so. `benchmarks/gpu.py` measures the JAX trainer on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import keras
from keras import ops

from facenet_kfp.complete import complete_dataset
from facenet_kfp.config import TrainConfig
from facenet_kfp.extract import extract_dataset
from facenet_kfp.numpy_input import DEFAULT_CACHE_BYTES, SplitImages, TrainBatches, open_split, worker_count
from facenet_kfp.labels import build_labels
from facenet_kfp.splits import make_splits
from facenet_kfp.synth import generate_demo_archive
from facenet_kfp.train import Placement, batch_loss, build_trainer

IDENTITIES = 120
ARCHITECTURE = "nn4_small2"
IMAGE_SIZE = 96
P, K = 16, 4
BATCH = P * K
LOSSES = ("batch_hard", "batch_all", "semi_hard")      # batch_hard first: the default
TRIVIAL = "trivial"
PRECISIONS = ("float32", "mixed_bfloat16")
IN_MEMORY_BATCHES = 4      # distinct real batches cycled through by the model timings
FED_BLOCK = 3              # steps per block when pipeline-fed and in-memory steps alternate
SHARE_TARGET = 0.05
PIPELINE_TARGET = 3.0
FEED_TARGET = 10_000       # images/s one GPU consumes: what the input pipeline must feed
INPUT_RATIO_TARGET = 0.8   # per-core rate of facenet_kfp.numpy_input over tf.data's


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


def input_batches(work: Path, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` P x K train batches from the TF-free pipeline (`facenet_kfp.numpy_input`), for the backend without tf.data.

    Returns (float32 [B, 96, 96, 3], int32 [B]) pairs, augmented as training is.
    """
    config = TrainConfig()
    with open_train_split(work) as images, TrainBatches(images, images.labels, P, K, IMAGE_SIZE,
                                                        config.crop_fraction, config.augment, seed) as stream:
        return [next(stream) for _ in range(count)]


def open_train_split(work: Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> SplitImages:
    """The prepared demo's train split, read lazily from its shards (real and generated images)."""
    return open_split(work / "images", work / "completion", work / "labels", work / "splits", "train",
                      cache_bytes=cache_bytes)


# ----------------------------------------------------------------------------- input pipelines

def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its live child processes (Linux /proc)."""
    total = time.process_time()
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                       # the process ended while being listed
        if fields[1] == me:                # fields after the command: state, ppid, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def compare_input_pipelines(work: Path, batches: int, rounds: int, workers: int | None, use_tf: bool
                            ) -> dict[str, dict[str, np.ndarray]]:
    """Wall and CPU seconds of `batches` P x K training batches (96 px, augmented) from each input pipeline.

    "input": `facenet_kfp.numpy_input.TrainBatches` over the split read lazily from
    the shards, decoded by `workers` processes; "tf.data": today's
    `data.make_train_dataset` over the split's bytes in memory (when TensorFlow
    is there). Each round builds every pipeline afresh, lets it fill its
    buffers with 3 untimed batches, then times `batches`; the order rotates
    per round. CPU seconds count this process and its worker processes.
    """
    config = TrainConfig()
    split = open_train_split(work)
    makers: dict[str, Callable[[int], Iterator]] = {
        "input": lambda seed: TrainBatches(split, split.labels, P, K, IMAGE_SIZE, config.crop_fraction,
                                           config.augment, seed, workers=workers)}
    if use_tf:
        from facenet_kfp.tf_input import load_split_images, make_train_dataset
        images, labels, _, _ = load_split_images(work / "images", work / "completion", work / "labels",
                                                 work / "splits", "train")
        makers["tf.data"] = lambda seed: iter(make_train_dataset(images, labels, P, K, IMAGE_SIZE,
                                                                 config.crop_fraction, config.augment, seed))
    times = {name: {"wall": np.zeros(rounds), "cpu": np.zeros(rounds)} for name in makers}
    names = list(makers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            stream = makers[name](100 + r)
            for _ in range(3):
                next(stream)
            start_wall, start_cpu = time.perf_counter(), tree_cpu_seconds()
            for _ in range(batches):
                pixels, _ = next(stream)
            times[name]["cpu"][r] = tree_cpu_seconds() - start_cpu
            times[name]["wall"][r] = time.perf_counter() - start_wall
            if tuple(pixels.shape) != (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3):
                raise SystemExit(f"{name}: batch of shape {tuple(pixels.shape)}")
            if isinstance(stream, TrainBatches):
                stream.close()              # stops its workers before the other pipeline's round
            del stream
        print(f"  input pipelines: round {r + 1}/{rounds}", flush=True)
    split.close()
    return times


def report_input_pipelines(times: dict[str, dict[str, np.ndarray]], batches: int, workers: int) -> None:
    """Section 4: images/s and images per CPU-second of each pipeline, their ratio, cores to feed a GPU."""
    images = batches * BATCH
    print(f"\n4. input pipelines side by side: {BATCH}-image P x K batches of the demo's 250x250 JPEGs, "
          f"crop {TrainConfig().crop_fraction}, resize to {IMAGE_SIZE}, augmented; {batches} batches per round, "
          f"{len(next(iter(times.values()))['wall'])} rounds, medians")
    print(f"  facenet_kfp.numpy_input: {workers} worker processes (one per usable core); tf.data: AUTOTUNE; CPU time "
          f"counts this process and its workers")
    print(f"  {'pipeline':<18} {'images/s':>9} {'images/s per core':>18} {'cores for ' + format(FEED_TARGET, ',') + '/s':>17}")
    per_core = {}
    for name, t in times.items():
        per_core[name] = med(images / t["cpu"])
        print(f"  {name:<18} {med(images / t['wall']):9.0f} {per_core[name]:18.0f} "
              f"{FEED_TARGET / per_core[name]:17.1f}")
    if "tf.data" in times:
        ratios = (times["tf.data"]["cpu"] / times["input"]["cpu"])
        ratio = med(ratios)
        print(f"  per-core rate, facenet_kfp.numpy_input / tf.data: {ratio:.2f} (median of per-round ratios; range "
              f"{ratios.min():.2f}-{ratios.max():.2f}) -> {'meets' if ratio >= INPUT_RATIO_TARGET else 'MISSES'} "
              f"the >= {INPUT_RATIO_TARGET} target")
    else:
        print("  tf.data: skipped, it needs TensorFlow")


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


def build(precision: str, kind: str):
    """The trainer `train.train` builds (`train.build_trainer`, TrainConfig's defaults) for one loss kind.

    TRIVIAL keeps the model, optimizer and schedule and swaps the loss for the
    mean of the embeddings before Keras first traces the step.
    """
    trainer = build_trainer(TrainConfig(loss=LOSSES[0] if kind == TRIVIAL else kind), precision, Placement())
    if kind == TRIVIAL:
        trainer.statistics = loss_function(TRIVIAL)
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


# ----------------------------------------------------------------------------- timing

Key = tuple[str, str]          # (precision, loss kind)


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


def med(values: np.ndarray) -> float:
    return float(np.median(values))


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


def iqr_ms(values: np.ndarray, decimals: int = 0) -> str:
    """Interquartile range of seconds as 'p25-p75' in ms."""
    q1, q3 = np.percentile(values, [25, 75]) * 1e3
    return f"{q1:.{decimals}f}-{q3:.{decimals}f}"


def paired_median_ci(diffs: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Median of per-round differences and its 95% bootstrap interval (percentile method)."""
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(diffs, size=(resamples, len(diffs)), replace=True), axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.median(diffs)), float(low), float(high)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (threads included, child processes not), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux reports KiB


# ----------------------------------------------------------------------------- report

def machine_lines(backend: str) -> list[str]:
    """What the figures were measured on: CPU model and bfloat16 support, cores, load, library versions."""
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
             f"usable cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f} now",
             f"  CPU bfloat16 instructions: {', '.join(bf16) if bf16 else 'none (no avx512_bf16 / amx_bf16)'}"]
    if backend == "tensorflow":
        import tensorflow as tf
        devices = ", ".join(d.name for d in tf.config.list_logical_devices())
        lines.append(f"  keras {keras.__version__}, backend tensorflow, TF {tf.__version__}, devices: {devices}")
    else:
        import jax
        lines.append(f"  keras {keras.__version__}, backend jax, jax {jax.__version__}, devices: {jax.devices()}")
    return lines


class _DropRetracingWarning(logging.Filter):
    """Drops TF's 'triggered tf.function retracing' heuristic, which fires because this script builds
    several trainers, each tracing its own step function once (its input shapes never change)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="data/bench/train-demo", help="archive and prepared data (reused)")
    parser.add_argument("--steps", type=int, default=12,
                        help="interleaved rounds of the first precision's steps (trivial + 3 losses); each "
                             "other precision gets a quarter of that, at least 3, paired with the default step "
                             "(default 12: 8-13 minutes on 2 shared cores; 20-30 narrows the intervals)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration, the "
                        "traced first one included (default 2)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="comma-separated Keras dtype policies; the first gets every loss and the "
                             "trivial one, the others the default loss (default float32,mixed_bfloat16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 timed steps, short pipeline "
                        "and loss timings")
    parser.add_argument("--input-only", action="store_true", help="only part 4: the two input pipelines "
                        "side by side (a few minutes)")
    parser.add_argument("--input-batches", type=int, default=30,
                        help="timed batches per pipeline and round in part 4 (default 30)")
    parser.add_argument("--input-rounds", type=int, default=5, help="rounds of part 4 (default 5)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of facenet_kfp.numpy_input (default: one per usable core)")
    parser.add_argument("-v", "--verbose", action="store_true", help="library INFO logs")
    args = parser.parse_args()
    if args.quick:
        args.steps = 3
        args.input_batches, args.input_rounds = 10, 2
    if args.input_batches < 1 or args.input_rounds < 1:
        parser.error("--input-batches and --input-rounds must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0 (0: decode in the benchmark's process)")
    if args.steps < 2 or args.warmup < 1:
        parser.error("--steps must be >= 2 and --warmup >= 1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        # mixed_float16 would need loss scaling (a GPU setting): not benchmarked on CPU.
        if p not in PRECISIONS:
            parser.error(f"--precisions: {p!r} is not one of {', '.join(PRECISIONS)}")
    if not precisions or len(set(precisions)) != len(precisions):
        parser.error("--precisions: give one or more distinct policies")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").addFilter(_DropRetracingWarning())
    pipeline_batches, pipeline_repeats = (10, 1) if args.quick else (50, 3)
    loss_repeats = 20 if args.quick else 200
    fed_steps = max(2, args.steps // 2)
    other_steps = max(3, args.steps // 4)

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise SystemExit(f"KERAS_BACKEND={backend}: this benchmark runs on tensorflow or jax")
    use_tf = backend == "tensorflow"
    wall_start = time.perf_counter()
    start_load = os.getloadavg()[0]
    work = prepare_data(Path(args.work))
    rss = {"data": peak_rss_mb()}
    if args.input_only:
        print(f"timing the input pipelines side by side: {args.input_rounds} rounds ...", flush=True)
        inputs = compare_input_pipelines(work, args.input_batches, args.input_rounds, args.workers, use_tf)
        print()
        for line in machine_lines(backend):
            print(line)
        print(f"  load average {start_load:.1f} at start: other jobs share the cores, so compare figures "
              f"within this run")
        report_input_pipelines(inputs, args.input_batches, worker_count(args.workers))
        print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")
        return 0

    # Real batches for the model: on TF the training pipeline's own output.
    pipeline = None
    if use_tf:
        from facenet_kfp.tf_input import load_split_images, make_train_dataset
        images, labels, _, synthetic = load_split_images(work / "images", work / "completion", work / "labels",
                                                         work / "splits", "train")
        config = TrainConfig()
        data_line = (f"train split {len(np.unique(labels))} identities, {len(images)} images "
                     f"({sum(synthetic)} generated by completion)")

        def dataset(seed: int):
            return make_train_dataset(images, labels, P, K, IMAGE_SIZE, config.crop_fraction,
                                      config.augment, seed)
        batches = list(dataset(0).take(IN_MEMORY_BATCHES))
        loss_step = tf_loss_step

        # 3. The input pipeline alone: no model, every core for tf.data.
        print(f"timing the input pipeline: {pipeline_repeats} x {pipeline_batches} batches ...", flush=True)
        rates, cpu_per_batch = [], []
        for r in range(pipeline_repeats):
            iterator = iter(dataset(1 + r))
            for _ in range(3):
                next(iterator)              # starts the map workers and fills the prefetch buffer
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(pipeline_batches):
                next(iterator)
            rates.append(pipeline_batches * BATCH / (time.perf_counter() - start_wall))
            cpu_per_batch.append((time.process_time() - start_cpu) / pipeline_batches)
            del iterator
        pipeline = float(np.median(rates))
        pipeline_cpu = float(np.median(cpu_per_batch))
        rss["pipeline"] = peak_rss_mb()
    else:
        batches = input_batches(work, IN_MEMORY_BATCHES)
        data_line = f"{IN_MEMORY_BATCHES} P x K batches of the train split from facenet_kfp.numpy_input"
        loss_step = jax_loss_step

    # 1, 2. The first precision's step functions in interleaved rounds; then each other precision
    # in its own rounds with the default step (a much slower step in the same rounds would
    # disturb whichever step follows it).
    keras.utils.set_random_seed(0)
    main_precision = precisions[0]
    default: Key = (main_precision, LOSSES[0])
    trivial: Key = (main_precision, TRIVIAL)
    keys: list[Key] = [trivial] + [(main_precision, kind) for kind in LOSSES]
    other_keys: list[Key] = [(p, LOSSES[0]) for p in precisions[1:]]
    trainers = {key: build(*key) for key in keys + other_keys}
    steps = {key: train_step(trainer) for key, trainer in trainers.items()}
    calls = {key: (lambda i, step=step: step(*batches[i % len(batches)])) for key, step in steps.items()}
    print(f"timing {len(keys)} {main_precision} train steps: {args.warmup} warm-up each, then {args.steps} "
          f"interleaved rounds ...", flush=True)
    wall, cpu, first = time_interleaved({key: calls[key] for key in keys}, args.warmup, args.steps, "step")
    rss["steps"] = peak_rss_mb()
    pairs = {}        # other precision -> (wall, cpu, first) of its rounds with the default step
    for key in other_keys:
        print(f"timing {' '.join(key)} against {' '.join(default)}: {other_steps} rounds ...", flush=True)
        pair_wall, pair_cpu, pair_first = time_interleaved({default: calls[default], key: calls[key]},
                                                           args.warmup, other_steps, "step", warm=(default,))
        pairs[key] = (pair_wall, pair_cpu, pair_first[key])

    # The default step fed by the backend's training pipeline (tf.data, or TrainBatches and its
    # workers), which then shares the cores with the model, in blocks alternating with blocks on
    # in-memory batches: steps next to each other in time compare, whatever the other jobs do.
    # Single steps cannot alternate: the prefetch buffer would fill during the in-memory step and
    # charge it the pipeline's work.
    print(f"timing {' '.join(default)} fed by the pipeline: {fed_steps} steps, in blocks alternating "
          f"with in-memory steps ...", flush=True)
    if use_tf:
        iterator, fed_split = iter(dataset(100)), None
    else:
        fed_split = open_train_split(work)
        iterator = TrainBatches(fed_split, fed_split.labels, P, K, IMAGE_SIZE, TrainConfig().crop_fraction,
                                TrainConfig().augment, 100, workers=args.workers)
    for _ in range(args.warmup):
        steps[default](*next(iterator))
    fed = {"pipeline": ([], []), "memory": ([], [])}
    block = min(FED_BLOCK, fed_steps)
    for _ in range(-(-fed_steps // block)):
        for source in ("pipeline", "memory"):
            for i in range(block):
                start_cpu, start_wall = tree_cpu_seconds(), time.perf_counter()
                batch = next(iterator) if source == "pipeline" else batches[i % len(batches)]
                steps[default](*batch)
                fed[source][0].append(time.perf_counter() - start_wall)
                fed[source][1].append(tree_cpu_seconds() - start_cpu)
    if fed_split is not None:
        iterator.close()
        fed_split.close()
    del iterator
    print(f"timing the input pipelines side by side: {args.input_rounds} rounds ...", flush=True)
    inputs = compare_input_pipelines(work, args.input_batches, args.input_rounds, args.workers, use_tf)
    rss["input pipelines"] = peak_rss_mb()

    # The loss alone, on the main model's embeddings of the same real batches.
    model = trainers[default].embedding
    embeddings = [(y, model(x, training=False)) for x, y in batches]
    loss_calls = {(main_precision, kind): (lambda i, step=loss_step(loss_function(kind)):
                                           step(*embeddings[i % len(embeddings)]))
                  for kind in LOSSES}
    print(f"timing batch_loss forward + backward alone: {loss_repeats} rounds ...", flush=True)
    alone, _, _ = time_interleaved(loss_calls, 3, loss_repeats, "loss alone")
    rss["loss alone"] = peak_rss_mb()
    gflop_per_image = 3 * 2 * forward_macs(model) / 1e9     # backward ~ 2x forward; 2 FLOP per MAC

    # ------------------------------------------------------------------ report
    def step_rate(key: Key) -> float:
        """Images/s of a training step: the first precision from the main rounds, others from theirs."""
        return BATCH / med(wall[key] if key in wall else pairs[key][0][key])

    print()
    for line in machine_lines(backend):
        print(line)
    print(f"  load average {start_load:.1f} at start: other jobs share the cores, so compare figures "
          f"within this run")
    print(f"data: {IDENTITIES}-identity demo archive in {args.work}; {data_line}")
    print(f"model: {ARCHITECTURE} {IMAGE_SIZE}x{IMAGE_SIZE}, 128-D embeddings, batch {BATCH} = P {P} x K {K}, "
          f"train.build_trainer (Adam, lr 1e-3 cosine), Keras train_on_batch: "
          f"{'tf.function without XLA' if use_tf else 'jax.jit'}")
    print(f"timing: medians; {main_precision}: {args.steps} interleaved rounds of its {len(keys)} steps"
          + "".join(f"; {key[0]}: {other_steps} rounds paired with {' '.join(default)}" for key in other_keys)
          + f"; {args.warmup} warm-up steps each, the first of which traces")

    print("\n1. training step: forward, mining + loss + batch statistics, backward, Adam update")
    print(f"{'precision':<15} {'loss':<11} {'steps':>5} {'ms/step':>8} {'IQR ms':>12} {'images/s':>9} "
          f"{'CPU s/step':>11} {'img/CPU-s':>10} {'first call s':>13}")
    rows = [(key, wall[key], cpu[key], first[key]) for key in keys]
    rows += [(key, pairs[key][0][key], pairs[key][1][key], pairs[key][2]) for key in other_keys]
    for key, key_wall, key_cpu, key_first in rows:
        t, c = med(key_wall), med(key_cpu)
        print(f"{key[0]:<15} {key[1]:<11} {len(key_wall):5d} {t * 1e3:8.0f} {iqr_ms(key_wall):>12} "
              f"{BATCH / t:9.1f} {c:11.2f} {BATCH / c:10.1f} {key_first:13.1f}")
    print(f"  {' '.join(default)}: about {gflop_per_image * step_rate(default):.0f} GFLOP/s achieved "
          f"({gflop_per_image:.2f} GFLOP per image and step = 3 x the forward Conv2D/Dense MACs x 2)")
    for key in other_keys:
        pair_wall, pair_cpu, _ = pairs[key]
        print(f"  {key[0]} / {main_precision} speed ({key[1]}, per-round ratios of its own rounds): "
              f"{med(pair_wall[default] / pair_wall[key]):.2f}x wall, "
              f"{med(pair_cpu[default] / pair_cpu[key]):.2f}x CPU time")

    print(f"\n2. mining + loss share of the step (target < {SHARE_TARGET:.0%})")
    print("  (a) real step - trivial step (mean of the embeddings) of the same round: median and 95% "
          "bootstrap interval,\n      of wall time and of CPU time (the latter moves less with other jobs)")
    for kind in LOSSES:
        key = (main_precision, kind)
        parts = []
        for name, times in (("wall", wall), ("CPU", cpu)):
            t = med(times[key])
            diff, low, high = paired_median_ci(times[key] - times[trivial])
            parts.append(f"{name} {diff * 1e3:+5.0f} ms [{low * 1e3:+.0f}, {high * 1e3:+.0f}] = {diff / t:+5.1%} "
                         f"[{low / t:+.1%}, {high / t:+.1%}]")
        print(f"  {main_precision:<15} {kind:<11} " + "; ".join(parts))
    print("  (b) batch_loss forward + backward alone on the model's [64, 128] float32 embeddings, compiled the "
          "same way\n      (call overhead included), over the step time; the loss runs in float32 in every "
          "precision")
    worst = 0.0
    for key in [k for k in keys if k[1] != TRIVIAL] + other_keys:
        times = alone[(main_precision, key[1])]
        share = med(times) * step_rate(key) / BATCH
        worst = max(worst, share)
        print(f"  {key[0]:<15} {key[1]:<11} {med(times) * 1e3:6.2f} ms (IQR {iqr_ms(times, 2)} ms) "
              f"= {share:6.2%} of the step")
    print(f"  largest share (b): {worst:.2%} -> {'meets' if worst < SHARE_TARGET else 'MISSES'} the "
          f"< {SHARE_TARGET:.0%} target")

    print(f"\n3. input pipeline vs the model's consumption (target >= {PIPELINE_TARGET:.0f}x)")
    if pipeline is None:
        print(f"  tf.data alone: skipped, it needs TensorFlow (KERAS_BACKEND={backend}); part 4 times "
              f"facenet_kfp.numpy_input alone")
    else:
        print(f"  make_train_dataset alone (decode + crop, resize {IMAGE_SIZE}, augment, batch): "
              f"{pipeline:.0f} images/s (median of {pipeline_repeats} x {pipeline_batches} batches)")
        for key in [default] + other_keys:
            ratio = pipeline / step_rate(key)
            print(f"  {key[0]:<15} {key[1]} consumes {step_rate(key):6.1f} images/s: pipeline / model = "
                  f"{ratio:6.1f}x -> {'meets' if ratio >= PIPELINE_TARGET else 'MISSES'} the target")
        model_cpu = med(cpu[default])
        print(f"  CPU: the pipeline spends {pipeline_cpu * 1e3:.0f} CPU-ms per batch, {' '.join(default)} "
              f"{model_cpu:.2f} CPU-s per step: {model_cpu / pipeline_cpu:.0f}x (the pipeline takes "
              f"{pipeline_cpu / (pipeline_cpu + model_cpu):.1%} of the CPU when training)")
    fed_wall, fed_cpu = np.asarray(fed["pipeline"][0]), np.asarray(fed["pipeline"][1])
    mem_wall, mem_cpu = np.asarray(fed["memory"][0]), np.asarray(fed["memory"][1])
    print(f"  {' '.join(default)} fed by the live pipeline "
          f"({'tf.data' if use_tf else 'facenet_kfp.numpy_input.TrainBatches'}) vs from memory, alternating blocks of "
          f"{min(FED_BLOCK, fed_steps)} ({len(fed_wall)} steps each; CPU counts the pipeline's workers):")
    print(f"    pipeline-fed {BATCH / med(fed_wall):6.1f} images/s, {med(fed_cpu):.2f} CPU-s/step; in-memory "
          f"{BATCH / med(mem_wall):6.1f} images/s, {med(mem_cpu):.2f} CPU-s/step; fed / memory speed "
          f"{med(mem_wall) / med(fed_wall):.2f}x")

    report_input_pipelines(inputs, args.input_batches, worker_count(args.workers))
    print(f"\n5. peak RSS of this process: {peak_rss_mb():.0f} MB (after "
          + ", ".join(f"{phase}: {mb:.0f}" for phase, mb in rss.items()) + " MB)")
    print(f"total wall time {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
