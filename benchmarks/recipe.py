"""The flagship recipe against the seed recipe (configs/seed.yaml: the original TF1 implementation's), at the same budget.

`make bench-recipe` generates the LFW-scale demo archive (`facenet-kfp synth
--lfw-scale`: LFW's 5,749 people, 13,233 images and histogram), runs the five
data steps once, then trains two recipes on the same images and splits:

- recommended: configs/lfw.yaml's training section (nn4_small2 at 96 px,
  16 x 4 batches, batch-hard, margin 0.2 on squared L2, cosine schedule with
  warm-up, augmentation);
- seed: configs/seed.yaml's (nn4_small2 at 96 px, 6 x 4 batches, batch-all,
  margin 0.5 on plain L2, constant learning rate, no augmentation).

The budget is a number of training images (steps x batch size), the same for
both: each recipe's `max_steps` is the budget divided by its batch size, and
the warm-up keeps its share of the schedule. Each recipe trains and is
evaluated in a subprocess of its own, so its peak RSS is its own. Printed side
by side: held-out verification accuracy (threshold chosen on validation
pairs), 10-fold accuracy, AUC, VAL@FAR=1e-3, training images/s and peak RSS.
The default budget (25,600 images) takes about 30 minutes on 2 CPU cores, the
LFW-scale archive included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import machine_info, make_archive, peak_rss_mb, prepare_data, print_machine, write_result
from facenet_kfp.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"recommended": "configs/lfw.yaml", "seed": "configs/seed.yaml"}
ROWS = [("test_accuracy", "held-out accuracy (val threshold)", "{:.4f}"),
        ("test_kfold_accuracy_mean", "10-fold accuracy", "{:.4f}"),
        ("test_auc", "ROC AUC", "{:.4f}"),
        ("test_val_at_far_0.001", "VAL @ FAR=1e-3", "{:.4f}"),
        ("train_images_per_second", "training images/s", "{:.1f}"),
        ("train_seconds", "training seconds", "{:.0f}"),
        ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")]


def recipe_config(name: str, budget_images: int):
    """The train and evaluate config of one recipe, its steps cut to `budget_images`."""
    config = load_config(ROOT / RECIPES[name])
    full = config.train
    steps = max(1, budget_images // (full.p * full.k))
    warmup = round(full.warmup_steps * steps / full.max_steps)
    every = max(1, steps // 4)
    train = dataclasses.replace(full, max_steps=steps, warmup_steps=warmup, validate_every=every,
                                checkpoint_every=every, log_every=max(1, steps // 20),
                                precision="float32")
    return config, train


def run_one(name: str, budget_images: int, work: Path, data_dir: Path) -> dict:
    """Train and evaluate one recipe in this process; its figures (also written as JSON)."""
    from benchmarks.quality import run_recipe

    config, train = recipe_config(name, budget_images)
    data = prepare_data(data_dir, work, data=config.data)
    result = run_recipe(name, train, config.evaluate, data, work)
    result["train_images_per_second"] = result["train"].get("images_per_second", float("nan"))
    result["peak_rss_mb"] = peak_rss_mb()
    result["steps"], result["batch"] = train.max_steps, train.p * train.k
    write_result(work / f"result-{name}.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/lfw-scale", help="LFW-scale demo archive folder (generated when missing)")
    parser.add_argument("--work", default="data/bench/recipe", help="working folder (data steps are reused)")
    parser.add_argument("--budget-images", type=int, default=25_600, help="training images per recipe")
    parser.add_argument("--identities", type=int, default=0,
                        help="a smaller demo archive of this many identities instead of the LFW-scale one "
                             "(a quick check of the benchmark itself)")
    parser.add_argument("--one", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data_dir, work = Path(args.data_dir), Path(args.work)
    if args.one:
        run_one(args.one, args.budget_images, work, data_dir)
        return 0

    make_archive(data_dir, identities=args.identities or 120, lfw_scale=not args.identities)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ("recommended", "seed"):
        _, train = recipe_config(name, args.budget_images)
        print(f"{name}: {RECIPES[name]}, {train.max_steps} steps of {train.p}x{train.k}, {train.loss}, "
              f"margin {train.margin}, lr {train.learning_rate} {train.lr_schedule}", flush=True)
        command = [sys.executable, "-m", "benchmarks.recipe", "--one", name, "--data-dir", str(data_dir),
                   "--work", str(work), "--budget-images", str(args.budget_images)]
        subprocess.run(command, check=True, cwd=ROOT)
        results[name] = json.loads((work / f"result-{name}.json").read_text())

    first = results["recommended"]
    print()
    print_machine(machine_info())
    print(f"same images and splits ({data_dir / 'lfw.tgz'}), {args.budget_images:,} training images per "
          f"recipe; test: {first['test_identities']:.0f} held-out identities, {first['test_pairs']:.0f} pairs")
    print(f"{'':36} {'recommended':>12} {'seed':>10}")
    print(f"{'steps x batch':36} {first['steps']:>7} x {first['batch']:<2} "
          f"{results['seed']['steps']:>5} x {results['seed']['batch']}")
    for key, label, fmt in ROWS:
        # A figure the test pairs cannot measure (VAL@FAR with too few different pairs) is n/a.
        values = [fmt.format(results[name][key]) if isinstance(results[name].get(key), (int, float)) else "n/a"
                  for name in ("recommended", "seed")]
        print(f"{label:36} {values[0]:>12} {values[1]:>10}")
    write_result(work / "results.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
