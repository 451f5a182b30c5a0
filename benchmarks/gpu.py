"""The JAX trainer on one GPU: images/s fed and from memory over a batch sweep, then configs/lfw.yaml to the end.

Written for a machine with one GPU, JAX with CUDA, Pillow, NumPy, PyYAML and
no TensorFlow, no Keras and no network (`benchmarks/gpu.sh` installs Keras
and its missing dependencies from wheels that travel with the working tree,
then runs this module with KERAS_BACKEND=jax). In order:

1. data: the LFW-scale demo archive (`synth.generate_demo_archive(lfw_scale=True)`:
   5,749 identities, 13,233 images of 250x250), then the data steps extract,
   labels, complete and splits with configs/lfw.yaml's data settings, each
   timed; none of them may have imported TensorFlow or kfp (checked);
2. throughput: configs/lfw.yaml's model (nn4_small2 at 96 px, batch-hard, its
   schedule) in mixed_bfloat16, one `train.build_trainer` trainer per batch
   size P x 4 for each P of the sweep (default 16, 32, 64, 128; 16 x 4 = 64 is
   the recipe's batch), timed in Keras `fit` as the trainer runs it (one
   callback that reads each step's loss, as `train.TrainingProgress` does),
   fed two ways: by the real input pipeline (`numpy_input.TrainBatches`: bytes read
   from the shards, decoded and augmented by one worker process per core),
   and by one batch of that pipeline held in host memory and repeated (still
   copied to the device every step): the model's own rate. The difference is
   the input cost. The best batch is the one with the highest fed rate;
3. the recipe: `train.train` with configs/lfw.yaml's train section (its
   max_steps, validation and checkpoints) in mixed_bfloat16, to completion;
   wall time and the trainer's own images/s; then the held-out verification
   figures of the saved model without TensorFlow (embeddings from
   `numpy_input.embedding_batches` and the model; `evaluate`'s pairs and NumPy
   metrics): threshold chosen on validation pairs, test accuracy at it,
   10-fold accuracy, AUC, VAL@FAR=1e-3.

One table is printed and, with --json or when $OUT is set, written as JSON
(default $OUT/gpu-benchmark.json; also after each part, with "complete":
false, so a run stopped part-way leaves what it measured). Progress lines go
to stdout as it runs, the trainer's step lines ten times per run.
`--dry-run` runs every part on a tiny budget (a 60-identity archive,
small_cnn at 32 px, a few steps, a sweep of P 2 and 4) on any machine, CPU
included, to check the script itself; its figures mean nothing.

Keep the top-level imports light: the archive is rendered by spawned
processes, which import this module again.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import DataPaths, machine_info, machine_lines, prepare_data, result_path, say, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "lfw.yaml"
PRECISION = "mixed_bfloat16"
TARGET = 10_000                 # images/s end to end on one H200
FORBIDDEN = ("tensorflow", "kfp")   # what the data steps must not import
JSON_NAME = "gpu-benchmark.json"


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each part does: the full run or the dry run."""
    identities: int             # 0: the LFW-scale archive
    sweep: tuple[int, ...]      # P of the P x K batches timed
    sweep_images: int           # images timed per batch size and source (steps = this / batch, >= min_steps)
    min_steps: int
    warmup_steps: int           # untimed steps per measurement (the first compiles)
    train: dict                 # changes to configs/lfw.yaml's train section


FULL = Budget(identities=0, sweep=(16, 32, 64, 128), sweep_images=16_000, min_steps=40, warmup_steps=5,
              train={})
DRY_RUN = Budget(identities=60, sweep=(2, 4), sweep_images=0, min_steps=3, warmup_steps=2,
                 train=dict(architecture="small_cnn", image_size=32, max_steps=12, warmup_steps=2,
                            validate_every=6, validation_batches=2, checkpoint_every=6, log_every=3))


class TenStepLines(logging.Filter):
    """Keeps the trainer's "step N/M" log lines of every `every`-th step and its final line, drops the rest."""

    def __init__(self, every: int):
        super().__init__()
        self.every = max(int(every), 1)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        if record.msg.startswith("step "):
            return record.args[0] % self.every == 0
        return record.msg.startswith("trained ")


# ----------------------------------------------------------------------------- 1. data

def prepare(work: Path, budget: Budget, data_config) -> DataPaths:
    """The archive in `work`/archive and the data steps into `work`, each timed; none may import TensorFlow or kfp."""
    data = prepare_data(work / "archive", work, identities=budget.identities or 120,
                        lfw_scale=not budget.identities, data=data_config, reuse=False)
    imported = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN and sys.modules[m] is not None)
    if imported:
        raise SystemExit(f"the data steps imported {', '.join(imported[:5])}: they must run without "
                         f"{' and '.join(FORBIDDEN)}")
    return data


# ----------------------------------------------------------------------------- 2. throughput

def timed_fit(trainer, batches, steps: int, warmup: int, batch_size: int) -> float:
    """Images/s of `steps` steps of Keras `fit` on `batches`, after `warmup` untimed ones (the first compiles)."""
    import keras

    class StepClock(keras.callbacks.Callback):
        """The time each step ended; reading the loss waits for the step, as TrainingProgress does."""

        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            loss = float(logs["loss"])
            if not np.isfinite(loss):
                raise SystemExit(f"loss is {loss} at benchmark step {batch + 1}: the measurement is void")
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer.fit(batches, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
    return steps * batch_size / (clock.ends[-1] - clock.ends[warmup - 1])


def sweep_throughput(data: DataPaths, config, budget: Budget, workers: int | None) -> list[dict]:
    """One row per P of the sweep: batch, steps timed, images/s fed by the pipeline and from memory."""
    from facenet_kfp import train
    from facenet_kfp.numpy_input import TrainBatches, open_split

    rows = []
    with open_split(*data.split_folders(), "train") as split:
        for p in budget.sweep:
            cfg = dataclasses.replace(config, p=p)
            batch = p * cfg.k
            steps = max(budget.min_steps, budget.sweep_images // batch)
            say(f"throughput: batch {batch} = {p} x {cfg.k}: building the trainer ...")
            trainer = train.build_trainer(cfg, PRECISION, train.Placement())
            with TrainBatches(split, split.labels, p, cfg.k, cfg.image_size, cfg.crop_fraction, cfg.augment,
                              cfg.seed, workers=workers) as stream:
                held = next(stream)
                start = time.perf_counter()
                memory = timed_fit(trainer, (held for _ in itertools.count()), steps, budget.warmup_steps, batch)
                say(f"throughput: batch {batch}: from memory {memory:,.0f} images/s "
                    f"({time.perf_counter() - start:.0f} s with compilation)")
                fed = timed_fit(trainer, (b for b in stream), steps, budget.warmup_steps, batch)
            say(f"throughput: batch {batch}: fed by the pipeline {fed:,.0f} images/s ({stream.workers} workers)")
            rows.append({"p": p, "k": cfg.k, "batch": batch, "steps": steps, "workers": stream.workers,
                         "fed_images_per_second": fed, "memory_images_per_second": memory,
                         "input_cost": 1.0 - fed / memory})
            del trainer
    return rows


# ----------------------------------------------------------------------------- 3. the recipe

def held_out_metrics(model_dir: Path, data: DataPaths, eval_config) -> dict:
    """Verification metrics of the saved model on the val/test pairs, without TensorFlow.

    The pairs, distances and metrics are `evaluate`'s (real images only,
    threshold chosen on validation pairs, applied to test); the embeddings come
    from `numpy_input.embedding_batches` (the preprocessing model.json records) and
    the model, instead of the tf.data path of `export.embed_images`.
    """
    from facenet_kfp import evaluate, export
    from facenet_kfp.numpy_input import embedding_batches
    from facenet_kfp.shards import ShardReader

    rows = evaluate.real_rows_by_file(data.images)
    val = evaluate.split_pairs("val", data.splits, data.images, rows, eval_config)
    test = evaluate.split_pairs("test", data.splits, data.images, rows, eval_config)
    test.fold_ids = evaluate.stratified_folds(test.same, eval_config.folds, eval_config.seed,
                                              f"{data.splits / 'test.txt'}")
    model, metadata = export.load_model_artifact(model_dir)
    distance = evaluate.model_distance(metadata, model_dir)
    keys = sorted(set(val.used_keys) | set(test.used_keys))
    with ShardReader(data.images) as reader:
        images = [reader.read(rows[key]) for key in keys]
    pre = metadata["preprocessing"]
    embeddings = np.concatenate([np.asarray(model.predict_on_batch(batch), dtype=np.float32)
                                 for batch in embedding_batches(images, int(pre["image_size"]),
                                                                float(pre["crop_fraction"]),
                                                                eval_config.batch_size)])
    if not np.isfinite(embeddings).all():
        raise SystemExit(f"{model_dir}: the trained model gives non-finite embeddings")
    row_of = {key: i for i, key in enumerate(keys)}
    for pairs in (val, test):
        to_row = np.asarray([row_of.get(key, -1) for key in pairs.keys], dtype=np.int64)
        pairs.distances = evaluate.pair_distances(embeddings, to_row[pairs.index_a], to_row[pairs.index_b],
                                                  distance)
    metrics, _ = evaluate.split_metrics(val, test, eval_config, distance)
    return metrics


def train_recipe(data: DataPaths, work: Path, config, eval_config) -> dict:
    """`train.train` on the prepared data to config.max_steps, then the held-out metrics."""
    from facenet_kfp import train

    model_dir = work / "model"
    say(f"recipe: {config.architecture} {config.image_size} px, {config.max_steps} steps of {config.p} x "
        f"{config.k}, {config.loss}, {config.lr_schedule} schedule, {config.precision} ...")
    start = time.perf_counter()
    metrics = train.train(data.images, data.completion, data.labels, data.splits, model_dir, config,
                          checkpoint_dir=str(work / "model.ckpt"))
    wall = time.perf_counter() - start
    say(f"recipe: trained {metrics['steps']} steps in {wall:.0f} s ({metrics['images_per_second']:,.0f} "
        f"images/s); evaluating ...")
    start = time.perf_counter()
    held_out = held_out_metrics(model_dir, data, eval_config)
    say(f"recipe: evaluated in {time.perf_counter() - start:.0f} s")
    return {"steps": int(metrics["steps"]), "batch": config.p * config.k, "wall_seconds": wall,
            "train_seconds": metrics["train_seconds"], "images_per_second": metrics["images_per_second"],
            "train_loss": metrics.get("train_loss"), "val_loss": metrics.get("val_loss"),
            "threshold": held_out["threshold"], "distance": held_out["distance"],
            "val_accuracy": held_out["val_accuracy"], "test_accuracy": held_out["test_accuracy"],
            "test_kfold_accuracy": held_out["test_kfold_accuracy_mean"], "test_auc": held_out["test_auc"],
            # None where the test pairs hold too few different pairs to measure FAR=1e-3 (then the
            # number they would need), else VAL and the FAR its threshold reached.
            "test_val_at_far_0.001": held_out.get("test_val_at_far_0.001"),
            "test_far_at_far_0.001": held_out.get("test_far_at_far_0.001"),
            "test_val_at_far_0.001_needs_different_pairs":
                held_out.get("test_val_at_far_0.001_needs_different_pairs"),
            "test_pairs": held_out["test_pairs"], "test_identities": held_out["test_identities"]}


# ----------------------------------------------------------------------------- report

def _val_text(rec: dict) -> str:
    """VAL@FAR=1e-3 beside the FAR it reached, or n/a with the different pairs it needs."""
    if rec.get("test_val_at_far_0.001") is None:
        needs = rec.get("test_val_at_far_0.001_needs_different_pairs")
        return f"n/a (needs >= {int(needs):,} different pairs)" if needs else "n/a"
    return f"{rec['test_val_at_far_0.001']:.4f} (FAR reached {rec['test_far_at_far_0.001']:.4f})"


def table(result: dict) -> str:
    """The one printed table of a result (see `run`)."""
    m, rec = result["machine"], result["recipe"]
    lines = [f"GPU benchmark{' (DRY RUN: tiny budget, figures mean nothing)' if result['dry_run'] else ''}: "
             f"{m['device']} x {m['devices']}, {m['cpus']} CPUs, Python {m['python']}, jax {m['jax']}, "
             f"keras {m['keras']} ({m['backend']})",
             *machine_lines(m),
             f"model: {result['model']}, {PRECISION}; archive {result['archive']}",
             "data steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["data_seconds"].items()),
             "",
             f"{'batch (P x K)':<14} {'steps':>6} {'fed images/s':>13} {'memory images/s':>16} {'input cost':>11}"]
    for row in result["throughput"]:
        best = "  <- best" if row["batch"] == result["best"]["batch"] else ""
        lines.append(f"{row['batch']:>4} = {row['p']:>3} x {row['k']:<2} {row['steps']:>6} "
                     f"{row['fed_images_per_second']:>13,.0f} {row['memory_images_per_second']:>16,.0f} "
                     f"{row['input_cost']:>10.1%}{best}")
    target = result["target"]
    lines += [f"end to end at the best batch: {result['best']['fed_images_per_second']:,.0f} images/s -> "
              f"{'meets' if target['met'] else 'MISSES'} the >= {target['images_per_second']:,} images/s target "
              f"({result['throughput'][0]['workers']} input workers)",
              "",
              f"recipe {result['recipe_file']} to completion: {rec['steps']} steps of {rec['batch']}",
              f"  wall time {rec['wall_seconds']:.0f} s (training {rec['train_seconds']:.0f} s, "
              f"{rec['images_per_second']:,.0f} images/s by the trainer's count)",
              f"  held-out: threshold {rec['threshold']:.4f} ({rec['distance']}, chosen on validation pairs, "
              f"val accuracy {rec['val_accuracy']:.4f})",
              f"  test accuracy {rec['test_accuracy']:.4f}, 10-fold {rec['test_kfold_accuracy']:.4f}, "
              f"AUC {rec['test_auc']:.4f}, VAL@FAR=1e-3 {_val_text(rec)} "
              f"({rec['test_pairs']} pairs, {rec['test_identities']} identities)",
              f"total wall time {result['total_seconds']:.0f} s"]
    return "\n".join(lines)


def run(work: Path, budget: Budget, dry_run: bool, workers: int | None, save) -> dict:
    """Every part in order (see the module docstring); the result as a dict, passed to `save` after each part."""
    from facenet_kfp.config import load_config

    started = time.perf_counter()
    config = load_config(RECIPE)
    train_config = dataclasses.replace(config.train, precision=PRECISION, **budget.train)
    result = {"dry_run": dry_run, "complete": False, "recipe_file": str(RECIPE.relative_to(ROOT)),
              "model": f"{train_config.architecture} {train_config.image_size} px",
              "archive": "LFW-scale demo" if not budget.identities else f"{budget.identities}-identity demo"}
    data = prepare(work, budget, config.data)
    result["data_seconds"] = data.seconds

    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit(f"KERAS_BACKEND={keras.backend.backend()}: run with KERAS_BACKEND=jax "
                         f"(benchmarks/gpu.sh sets it)")
    if not dry_run and jax.devices()[0].platform != "gpu":
        raise SystemExit(f"no GPU visible to JAX (devices: {jax.devices()}); install JAX with CUDA, or run "
                         f"--dry-run to check the script on a CPU")
    result["machine"] = machine_info("jax")
    save(result)
    result["throughput"] = sweep_throughput(data, train_config, budget, workers)
    best = max(result["throughput"], key=lambda row: row["fed_images_per_second"])
    result["best"] = best
    result["target"] = {"images_per_second": TARGET, "met": best["fed_images_per_second"] >= TARGET}
    save(result)
    logging.getLogger("facenet_kfp.train").addFilter(TenStepLines(train_config.max_steps // 10))
    logging.getLogger("facenet_kfp.train").setLevel(logging.INFO)
    result["recipe"] = train_recipe(data, work, train_config, config.evaluate)
    result["total_seconds"] = time.perf_counter() - started
    result["complete"] = True
    save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="data/bench/gpu",
                        help="working folder for the archive, the data steps and the model (must not exist)")
    parser.add_argument("--dry-run", action="store_true", help="tiny budget on any machine (checks the script)")
    parser.add_argument("--sweep", help="comma-separated P values of the P x 4 batches (default 16,32,64,128; "
                                        "dry run 2,4)")
    parser.add_argument("--workers", type=int, default=None,
                        help="input worker processes (default: one per usable core)")
    parser.add_argument("--json", help=f"write the result here (default: $OUT/{JSON_NAME} when OUT is set)")
    args = parser.parse_args(argv)
    budget = DRY_RUN if args.dry_run else FULL
    if args.sweep:
        try:
            sweep = tuple(int(p) for p in args.sweep.split(","))
        except ValueError:
            parser.error(f"--sweep: {args.sweep!r} is not a comma-separated list of integers")
        if not sweep or min(sweep) < 2:
            parser.error(f"--sweep: every P must be >= 2, got {args.sweep!r}")
        budget = dataclasses.replace(budget, sweep=sweep)
    work = Path(args.work)
    if work.exists():
        parser.error(f"--work {work} exists: give a new folder (every figure here comes from data made in "
                     f"this run), or delete it")
    json_path = result_path(args.json, JSON_NAME)

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")

    def save(result: dict) -> None:
        if json_path is not None:
            write_result(json_path, result)

    result = run(work, budget, args.dry_run, args.workers, save)
    print("\n" + table(result), flush=True)
    if json_path is not None:
        print(f"wrote {json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
