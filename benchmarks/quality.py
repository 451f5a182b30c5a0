"""Seed recipe vs recommended recipe on the same demo data, trained and evaluated in one run.

Both recipes train the demo's network (configs/demo.yaml: small_cnn at 64x64)
for the same number of optimizer steps on the same data and splits, so only
the recipe differs:

- seed: configs/seed.yaml's hyperparameters (6 x 4 batches, batch-all loss,
  margin 0.5 on plain L2, Adam 1e-3 constant, no augmentation);
- recommended: configs/demo.yaml (16 x 4 batches, batch-hard, margin 0.2 on
  squared L2, cosine schedule with warm-up, augmentation).

Prints test accuracy (threshold chosen on validation pairs), 10-fold accuracy,
AUC, EER, VAL@FAR and accuracy at the fixed threshold 1.242 of the original TF1
implementation (evaluate.seed_threshold) side by side.
With --pipeline it also times the whole `make run` pipeline (caching off) on
the same archive: target under 10 minutes on 2 CPU cores, test accuracy >= 0.90.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras

from benchmarks.harness import DataPaths, machine_info, prepare_data, print_machine, write_result
from facenet_kfp.config import load_config
from facenet_kfp.evaluate import evaluate
from facenet_kfp.train import train

ROOT = Path(__file__).resolve().parents[1]
SEED_KEYS = ("p", "k", "loss", "margin", "squared", "learning_rate", "lr_schedule",
             "warmup_steps", "augment")
ROWS = [("test_accuracy", "test accuracy (val threshold)"),
        ("test_kfold_accuracy_mean", "10-fold accuracy"),
        ("test_kfold_accuracy_std", "10-fold std"),
        ("test_auc", "ROC AUC"),
        ("test_eer", "EER"),
        ("test_val_at_far_0.001", "VAL @ FAR=1e-3"),
        ("test_val_at_far_0.01", "VAL @ FAR=1e-2"),
        ("test_accuracy_at_seed_threshold", "accuracy at seed threshold 1.242"),
        ("threshold", "threshold")]


def run_recipe(name: str, train_config, eval_config, data: DataPaths, work: Path, **evaluate_options) -> dict:
    """Train one recipe on the prepared data into `work`/model-`name` (replaced) and evaluate it: its figures.

    `evaluate_options` go to `evaluate.evaluate` (a separate evaluation archive: eval_dataset_dir, pairs_uri)."""
    model_dir = work / f"model-{name}"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(f"{model_dir}.ckpt", ignore_errors=True)
    start = time.perf_counter()
    train_metrics = train(data.images, data.completion, data.labels, data.splits, model_dir, train_config)
    train_seconds = time.perf_counter() - start
    result = evaluate(model_dir, data.images, data.splits, eval_config,
                      report_path=work / f"report-{name}.html",
                      threshold_path=work / f"threshold-{name}.json", **evaluate_options)
    return {"train_seconds": train_seconds, "train": train_metrics, **result["metrics"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="data/demo", help="demo archive folder (generated when missing)")
    parser.add_argument("--work", default="data/bench/quality", help="working folder")
    parser.add_argument("--steps", type=int, default=0, help="step budget of both recipes (default: demo.yaml's)")
    parser.add_argument("--pipeline", action="store_true", help="also time the whole demo pipeline (make run)")
    args = parser.parse_args()

    demo = load_config(ROOT / "configs/demo.yaml")
    seed = load_config(ROOT / "configs/seed.yaml")
    steps = args.steps or demo.train.max_steps
    recommended = dataclasses.replace(demo.train, max_steps=steps)
    seed_recipe = dataclasses.replace(demo.train, max_steps=steps,
                                      **{key: getattr(seed.train, key) for key in SEED_KEYS})

    demo_dir, work = Path(args.demo_dir), Path(args.work)
    data = prepare_data(demo_dir, work, identities=120, seed=0, data=demo.data)

    results = {}
    for name, recipe in (("seed", seed_recipe), ("recommended", recommended)):
        print(f"training the {name} recipe: {steps} steps, {recipe.p}x{recipe.k}, {recipe.loss}, "
              f"margin {recipe.margin} on {'squared' if recipe.squared else 'plain'} L2, "
              f"lr {recipe.learning_rate} {recipe.lr_schedule}, augment {recipe.augment}", flush=True)
        results[name] = run_recipe(name, recipe, demo.evaluate, data, work)

    print()
    print_machine(machine_info(keras.backend.backend()))
    print(f"same data ({demo_dir / 'lfw.tgz'}), same network ({demo.train.architecture} "
          f"{demo.train.image_size}x{demo.train.image_size}), {steps} steps each; "
          f"test: {results['seed']['test_identities']:.0f} held-out identities, "
          f"{results['seed']['test_pairs']:.0f} pairs")
    print(f"{'':36} {'seed':>10} {'recommended':>12}")
    for key, label in ROWS:
        # A figure the test pairs cannot measure (VAL@FAR with too few different pairs) is n/a.
        a, b = (f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"
                for v in (results["seed"].get(key), results["recommended"].get(key)))
        print(f"{label:36} {a:>10} {b:>12}")
    print(f"{'distance':36} {results['seed']['distance']:>10} {results['recommended']['distance']:>12}")
    print(f"{'training seconds':36} {results['seed']['train_seconds']:10.0f} {results['recommended']['train_seconds']:12.0f}")
    better = results["recommended"]["test_accuracy"] > results["seed"]["test_accuracy"]
    print(f"\nrecommended beats seed on test accuracy: {'yes' if better else 'NO'} "
          f"({results['recommended']['test_accuracy']:.4f} vs {results['seed']['test_accuracy']:.4f})")

    if args.pipeline:
        from pipelines.run_local import run_pipeline

        root = Path(tempfile.mkdtemp(prefix="bench-run-"))
        start = time.perf_counter()
        summary = run_pipeline(str(ROOT / "configs/demo.yaml"), None, None, None, str(root),
                               demo_dir=str(demo_dir), enable_caching=False)
        seconds = time.perf_counter() - start
        print(f"\nwhole demo pipeline (make run, caching off): {summary['status']} in {seconds:.0f} s "
              f"(target < 600 s); test accuracy {summary['metrics'].get('test_accuracy', float('nan')):.4f} "
              f"(target >= 0.90)")
        for task in summary["tasks"]:
            print(f"  {task['display_name']:<30} {task['seconds']:7.1f} s")
    write_result(work / "results.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
