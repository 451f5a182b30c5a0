"""Training objectives side by side at one budget: the triplet recipe, ArcFace, CosFace (and the seed recipe).

`make bench-recipe` trains every recipe on the same images and splits for the
same budget of training images, on two datasets, and prints a table for each:

- lfw: the LFW-scale demo archive (`facenet-kfp synth --lfw-scale`: LFW's
  5,749 people, 13,233 images and histogram, seed 0); test pairs from its
  held-out test identities. Recipes: recommended, seed, arcface, cosface.
- casia: a CASIA-layout demo archive (`facenet-kfp synth --layout casia
  --counts casia`: 1,000 identities with CASIA-WebFace's images-per-identity
  shape, ~47,000 images, seed 1) for training and validation (the threshold),
  and the LFW-layout archive above, with its pairs.txt (10 x 300 pairs), as a
  separate evaluation archive, as the pipeline's data.eval_source_uri does.
  Different seeds draw different faces and the two layouts name people
  differently, so the evaluation identities are disjoint from training (the
  table shows the count of shared names, 0). Recipes: recommended, arcface,
  cosface. 1,000 identities, not CASIA's 10,575: at this budget each of
  CASIA's 9,500 training identities would come up in a batch about 2.7 times,
  too few for a margin objective's class centre to learn from; that would
  measure starvation, not the objectives.

The recipes, each a config's training section:

- recommended: the dataset's config (configs/lfw.yaml: 16 x 4 batches, lr 5e-4;
  configs/casia.yaml: 32 x 4, lr 1e-3) with the batch-hard triplet loss:
  nn4_small2 at 96 px, margin 0.2 on squared L2, cosine schedule with
  warm-up, augmentation (configs/casia.yaml itself trains CosFace, the
  CASIA-layout table's winner);
- arcface, cosface: the same network, image size, batches, schedule and
  augmentation with the loss switched: ArcFace's additive angular margin
  m = 0.5, CosFace's cosine margin m = 0.35, both at scale s = `MARGIN_SCALE`;
- seed: configs/seed.yaml's (6 x 4 batches, batch-all, margin 0.5 on plain
  L2, constant learning rate, no augmentation).

The budget is a number of training images, the same for every recipe: each
recipe's `max_steps` is the budget divided by its batch size, and the warm-up
keeps its share of the schedule. The data steps run once per dataset in this
process; each recipe then trains and is evaluated in a subprocess of its own,
so its peak RSS is its own. Printed per recipe: held-out verification
accuracy (threshold chosen on validation pairs), 10-fold accuracy, AUC,
VAL@FAR=1e-3 and 1e-2 with the FAR each validation threshold reaches on the
test pairs, training images/s and peak RSS; then which recipe wins on held-out
accuracy, and by how much. Results: WORK/<dataset>-<size>/results.json.

The default (25,600 images per recipe, both datasets) takes about 70 minutes
on 2 CPU cores (lfw ~40, casia ~30), generating both archives included
(~3 minutes); `--dataset` runs one. `--identities N` makes both archives N
identities (at least 40), a check of the benchmark itself: `--identities 60
--budget-images 512` takes ~15 minutes, mostly each recipe's start-up (its
LFW table's test pairs are too few to measure VAL@FAR: n/a). Archives stay
in data/ (data/lfw-scale, data/casia-1000-seed1; data/lfw-N,
data/casia-N-seed1) and are reused, as are the data steps' outputs
(WORK/<dataset>-<size>/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import (DataPaths, archive_name, extract_only, machine_info, make_archive, peak_rss_mb,
                                prepare_data, print_machine, write_result)
from facenet_kfp.config import load_config
from facenet_kfp.errors import FacenetError

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("lfw", "casia")
# Each dataset's config: the recommended recipe's training section, the data steps' and evaluation's settings.
DATASET_CONFIGS = {"lfw": "configs/lfw.yaml", "casia": "configs/casia.yaml"}
CASIA_IDENTITIES = 1_000         # the casia dataset's default size (the module docstring says why not 10,575)
CASIA_SEED = 1                   # the LFW-layout evaluation archive is seed 0: other faces
CASIA_POOL = 4                   # faces rendered per identity, every image derived from one (as benchmarks/scale.py)
# The smallest --identities the casia dataset takes: configs/casia.yaml's batches hold 32 identities, and
# its train split is 90% of them.
MIN_CASIA_IDENTITIES = 40

# The margin objectives' logit scale: 24, not the papers' 64 (meant for 10k-85k identities and 100k+
# steps), chosen from the softmax's saturation, not from any test figure. A sample's gradient fades once
# its true-class probability nears 1; with C training identities p reaches 0.9 where
# s phi(theta) = ln(9 (C - 1)) (the other cosines near 0), phi = cos(theta + m) or cos(theta) - m.
# At C = 4,000 (the LFW-scale train split) and s = 64 that is at theta = 52 degrees (ArcFace) and 59
# (CosFace) from the class centre: a network this short of training has most of its samples there
# already, so most of each batch would stop teaching. At s = 24: 35 and 38 degrees (C = 900: 39 and 44).
# At s = 16 CosFace would never reach 0.9, even at theta = 0 (s (1 - m) = 10.4 < ln(9 x 3,999) = 10.5).
# A validation-only check agreed (300-identity CASIA-layout archive, 6,400 images, validation pairs'
# AUC): ArcFace 0.833 at s = 24, 0.784 at 64; CosFace 0.835 and 0.782.
# One scale for both objectives and both datasets, so only the loss and its margin differ.
MARGIN_SCALE = 24.0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe: the training section of `config` (None: the dataset's own config) with `changes`."""
    config: str | None
    changes: dict[str, Any]


RECIPES = {
    # The dataset config's network, batches and schedule with the batch-hard triplet loss: configs/lfw.yaml's
    # own objective; configs/casia.yaml trains CosFace, this benchmark's CASIA-layout winner.
    "recommended": Recipe(None, {"loss": "batch_hard", "margin": 0.2}),
    "seed": Recipe("configs/seed.yaml", {}),
    # Same P x K batches as the triplet recipe (train.sampling pk), so the loss is the only change.
    "arcface": Recipe(None, {"loss": "arcface", "margin": 0.5, "scale": MARGIN_SCALE}),
    "cosface": Recipe(None, {"loss": "cosface", "margin": 0.35, "scale": MARGIN_SCALE}),
}
# Which recipes each dataset trains, in table order.
DATASET_RECIPES = {"lfw": ("recommended", "seed", "arcface", "cosface"),
                   "casia": ("recommended", "arcface", "cosface")}
ROWS = [("test_accuracy", "held-out accuracy (val threshold)", "{:.4f}"),
        ("test_kfold_accuracy_mean", "10-fold accuracy", "{:.4f}"),
        ("test_auc", "ROC AUC", "{:.4f}"),
        ("test_val_at_far_0.001", "VAL @ FAR=1e-3", "{:.4f}"),
        ("test_far_at_far_0.001", "FAR reached (1e-3 threshold)", "{:.4f}"),
        ("test_val_at_far_0.01", "VAL @ FAR=1e-2", "{:.4f}"),
        ("test_far_at_far_0.01", "FAR reached (1e-2 threshold)", "{:.4f}"),
        ("train_images_per_second", "training images/s", "{:.1f}"),
        ("train_seconds", "training seconds", "{:.0f}"),
        ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where one dataset's archives and outputs are, and how its training archive is drawn."""
    dataset: str
    identities: int          # of the training archive; 0: LFW scale (lfw only)
    archive_dir: Path        # the training archive's folder
    eval_dir: Path | None    # the separate LFW-layout evaluation archive's folder (with pairs.txt), or None
    work: Path               # this dataset's data steps, models, reports and results
    lfw_identities: int      # of the LFW-layout archive (the lfw dataset's, casia's evaluation archive); 0: LFW scale

    @property
    def layout(self) -> str:
        return "casia" if self.dataset == "casia" else "lfw"

    @property
    def seed(self) -> int:
        return CASIA_SEED if self.dataset == "casia" else 0

    @property
    def label(self) -> str:
        """The dataset and its size: lfw-scale, lfw-60, casia-1000."""
        return f"{self.dataset}-{self.identities or 'scale'}"


def lfw_dir(identities: int) -> Path:
    """The default folder of the LFW-layout demo archive of `identities` people (0: LFW scale)."""
    return Path("data/lfw-scale" if not identities else f"data/lfw-{identities}")


def plan_for(dataset: str, identities: int, work: Path, data_dir: Path | None = None,
             casia_dir: Path | None = None) -> Plan:
    """The plan of `dataset` at `identities` people (0: full size), its folders defaulting under data/."""
    lfw = Path(data_dir) if data_dir else lfw_dir(identities)
    if dataset == "lfw":
        plan = Plan("lfw", identities, lfw, None, Path(work), identities)
    else:
        size = identities or CASIA_IDENTITIES
        archive = Path(casia_dir) if casia_dir else Path(f"data/casia-{size}-seed{CASIA_SEED}")
        plan = Plan("casia", size, archive, lfw, Path(work), identities)
    return dataclasses.replace(plan, work=Path(work) / plan.label)


def recipe_config(name: str, budget_images: int, dataset: str = "lfw"):
    """(the dataset's config, the recipe's train config with its steps cut to `budget_images`)."""
    config = load_config(ROOT / DATASET_CONFIGS[dataset])
    recipe = RECIPES[name]
    source = config.train if recipe.config is None else load_config(ROOT / recipe.config).train
    full = dataclasses.replace(source, **recipe.changes)
    steps = max(1, budget_images // (full.p * full.k))
    warmup = round(full.warmup_steps * steps / full.max_steps)
    every = max(1, steps // 4)
    train = dataclasses.replace(full, max_steps=steps, warmup_steps=warmup, validate_every=every,
                                checkpoint_every=every, log_every=max(1, steps // 20),
                                precision="float32")
    return config, train


def prepare(plan: Plan, config) -> tuple[DataPaths, Path | None]:
    """The plan's archives (generated when missing) and data steps (reused when done): (the training data, the
    evaluation archive's extracted images or None)."""
    make_archive(plan.archive_dir, identities=plan.identities or 120, seed=plan.seed, layout=plan.layout,
                 lfw_scale=plan.dataset == "lfw" and not plan.identities,
                 counts="casia" if plan.layout == "casia" else None,
                 pool=CASIA_POOL if plan.layout == "casia" else None)
    eval_images = None
    if plan.eval_dir is not None:
        archive, _ = make_archive(plan.eval_dir, identities=plan.lfw_identities or 120,
                                  lfw_scale=not plan.lfw_identities)
        eval_images = extract_only(archive, plan.work / "eval-images", config.data)
    data = prepare_data(plan.archive_dir, plan.work, identities=plan.identities or 120, seed=plan.seed,
                        data=config.data, layout=plan.layout)
    return data, eval_images


def run_one(name: str, budget_images: int, plan: Plan) -> dict:
    """Train and evaluate one recipe in this process; its figures (also written as JSON)."""
    from benchmarks.quality import run_recipe

    config, train = recipe_config(name, budget_images, plan.dataset)
    data, eval_images = prepare(plan, config)
    separate = {} if eval_images is None else {"eval_dataset_dir": eval_images,
                                                "pairs_uri": str(plan.eval_dir / "pairs.txt")}
    try:
        result = run_recipe(name, train, config.evaluate, data, plan.work, **separate)
        result["train_images_per_second"] = result["train"].get("images_per_second", float("nan"))
    except FacenetError as exc:
        # The training monitor stopped it (collapse, divergence): a result of the recipe, not of the benchmark.
        result = {"failed": str(exc).splitlines()[0]}
    result["peak_rss_mb"] = peak_rss_mb()
    result["steps"], result["batch"] = train.max_steps, train.p * train.k
    result["recipe"] = {key: getattr(train, key) for key in ("loss", "margin", "scale", "sampling", "p", "k",
                                                             "learning_rate", "lr_schedule", "augment")}
    write_result(plan.work / f"result-{name}.json", result)
    return result


def figure(result: dict, key: str) -> float | None:
    """A finite figure of `result`, or None (a figure the test pairs cannot measure: VAL@FAR with too few
    different pairs)."""
    value = result.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def winner(results: dict[str, dict]) -> dict[str, Any]:
    """The recipe with the best held-out accuracy, and how far ahead of each other recipe it is.

    `standard_error` is one accuracy's binomial standard error on these test pairs, sqrt(a (1 - a) / n):
    a lead well under twice it is within the noise of one draw of pairs."""
    # A recipe whose test pairs were too few for an accuracy (evaluate withholds it) is not ranked.
    ranked = sorted((name for name in results if figure(results[name], "test_accuracy") is not None),
                    key=lambda name: -results[name]["test_accuracy"])
    if not ranked:
        return {"recipe": None, "runner_up": None, "lead": {}}
    best = results[ranked[0]]
    pairs = best["test_same_pairs"] + best["test_different_pairs"]
    lead = {name: {key: best[key] - results[name][key]
                   for key in ("test_accuracy", "test_kfold_accuracy_mean", "test_auc")}
            for name in ranked[1:]}
    return {"recipe": ranked[0], "test_accuracy": best["test_accuracy"], "runner_up": ranked[1] if lead else None,
            "lead": lead, "test_pairs": pairs,
            "standard_error": math.sqrt(best["test_accuracy"] * (1 - best["test_accuracy"]) / pairs)}


def table_lines(plan: Plan, budget_images: int, results: dict[str, dict], best: dict[str, Any]) -> list[str]:
    """One dataset's table and its verdict, as printed."""
    names = list(results)
    finished = [r for r in results.values() if "failed" not in r]
    first = finished[0] if finished else {"test_identities": math.nan, "test_pairs": math.nan,
                                          "eval_identities": math.nan, "eval_identities_in_training_archive": math.nan}
    if plan.eval_dir is None:
        where = (f"{plan.label}: {plan.archive_dir / archive_name()}; test: {first['test_identities']:.0f} held-out "
                 f"identities, {first['test_pairs']:.0f} pairs")
    else:
        where = (f"{plan.label}: trained on {plan.archive_dir / archive_name('casia')} (threshold on its validation "
                 f"identities); test: the separate {plan.eval_dir / archive_name()}'s pairs.txt, "
                 f"{first['test_pairs']:.0f} pairs of {first['eval_identities']:.0f} identities, "
                 f"{first['eval_identities_in_training_archive']:.0f} of them in the training archive")
    lines = [where, f"same images, splits and budget: {budget_images:,} training images per recipe",
             f"{'':36}" + "".join(f" {name:>12}" for name in names)]
    cells = {"steps x batch": [f"{r['steps']} x {r['batch']}" for r in results.values()],
             "training": ["stopped" if "failed" in r else "finished" for r in results.values()],
             "loss": [r["recipe"]["loss"] for r in results.values()],
             "margin, scale": [f"{r['recipe']['margin']:g}" + (f", s={r['recipe']['scale']:g}"
                                                               if r["recipe"]["loss"] in ("arcface", "cosface")
                                                               else "") for r in results.values()]}
    for label, values in cells.items():
        lines.append(f"{label:36}" + "".join(f" {value:>12}" for value in values))
    for key, label, fmt in ROWS:
        values = [figure(r, key) for r in results.values()]
        lines.append(f"{label:36}" + "".join(f" {'n/a' if v is None else fmt.format(v):>12}" for v in values))
    for name, result in results.items():
        if "failed" in result:
            lines.append(f"{name}: stopped by the training monitor, no figures: {result['failed']}")
    if best["runner_up"] is None:
        return lines
    lead = best["lead"][best["runner_up"]]
    lines.append(f"winner ({plan.label}, held-out accuracy): {best['recipe']} {best['test_accuracy']:.4f}, "
                 f"{lead['test_accuracy']:+.4f} over {best['runner_up']} (10-fold "
                 f"{lead['test_kfold_accuracy_mean']:+.4f}, AUC {lead['test_auc']:+.4f}); one accuracy's standard "
                 f"error on {best['test_pairs']:,.0f} test pairs: {best['standard_error']:.4f}")
    if best["recipe"] != "recommended" and "recommended" in best["lead"]:
        lines.append(f"  over the triplet recipe (recommended): {best['lead']['recommended']['test_accuracy']:+.4f}")
    return lines


def recipes_of(dataset: str, chosen: str | None) -> tuple[str, ...]:
    """The recipes a dataset's table runs: all of DATASET_RECIPES[dataset], or those of `chosen` (a comma
    list from --recipes) that the dataset has, in its order."""
    if not chosen:
        return DATASET_RECIPES[dataset]
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    return tuple(name for name in DATASET_RECIPES[dataset] if name in names)


def run_dataset(plan: Plan, budget_images: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare one dataset, train and evaluate each of its recipes in a subprocess; its results (also as JSON)."""
    config, _ = recipe_config("recommended", budget_images, plan.dataset)
    prepare(plan, config)
    results = {}
    for name in recipes_of(plan.dataset, args.recipes):
        _, train = recipe_config(name, budget_images, plan.dataset)
        print(f"{plan.label} {name}: {train.max_steps} steps of {train.p}x{train.k}, {train.loss}, margin "
              f"{train.margin}" + (f", scale {train.scale}" if name in ("arcface", "cosface") else "")
              + f", lr {train.learning_rate} {train.lr_schedule}", flush=True)
        command = [sys.executable, "-m", "benchmarks.recipe", "--one", name, "--dataset", plan.dataset,
                   "--identities", str(args.identities), "--work", str(args.work),
                   "--budget-images", str(budget_images)]
        command += ["--data-dir", str(args.data_dir)] if args.data_dir else []
        command += ["--casia-dir", str(args.casia_dir)] if args.casia_dir else []
        subprocess.run(command, check=True, cwd=ROOT)
        results[name] = json.loads((plan.work / f"result-{name}.json").read_text())
    report = {"dataset": plan.dataset, "label": plan.label, "budget_images": budget_images,
              "archive": plan.archive_dir, "eval_archive": plan.eval_dir, "recipes": results,
              "winner": winner(results)}
    write_result(plan.work / "results.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both", help="which tables (default both)")
    parser.add_argument("--data-dir", help="LFW-layout demo archive folder, also casia's evaluation archive "
                                           "(default data/lfw-scale, or data/lfw-N with --identities N; "
                                           "generated when missing)")
    parser.add_argument("--casia-dir", help=f"CASIA-layout archive folder (default data/casia-N-seed{CASIA_SEED}, "
                                            f"N = {CASIA_IDENTITIES:,} or --identities; generated when missing)")
    parser.add_argument("--work", default="data/bench/recipe",
                        help="working folder: a subfolder per dataset and size (its data steps are reused)")
    parser.add_argument("--budget-images", type=int, default=25_600, help="training images per recipe")
    parser.add_argument("--identities", type=int, default=0,
                        help=f"both archives this many identities instead of LFW's and 1,000, at least "
                             f"{MIN_CASIA_IDENTITIES} with casia (a quick check of the benchmark itself)")
    parser.add_argument("--recipes", default=None,
                        help="a comma list of the recipes to run where a dataset has them (default: all of "
                             "each dataset's); recommended, the triplet recipe the others are compared with, "
                             "must be among them")
    parser.add_argument("--one", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.recipes is not None:
        names = {name.strip() for name in args.recipes.split(",") if name.strip()}
        if unknown := sorted(names - set(RECIPES)):
            parser.error(f"--recipes: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(sorted(RECIPES))}")
        if "recommended" not in names:
            parser.error("--recipes must include recommended, the triplet recipe the others are compared with")
    if args.identities < 0 or args.budget_images < 1:
        parser.error("--identities must be >= 0 and --budget-images >= 1")
    datasets = DATASETS if args.dataset == "both" else (args.dataset,)
    if "casia" in datasets and 0 < args.identities < MIN_CASIA_IDENTITIES:
        parser.error(f"--identities {args.identities}: the casia dataset needs at least {MIN_CASIA_IDENTITIES} "
                     f"(configs/casia.yaml's batches hold 32 training identities); or --dataset lfw")
    plans = [plan_for(d, args.identities, Path(args.work), args.data_dir, args.casia_dir) for d in datasets]
    if args.one:
        if args.dataset == "both" or args.one not in DATASET_RECIPES[args.dataset]:
            parser.error("--one needs --dataset lfw or casia and one of its recipes")
        run_one(args.one, args.budget_images, plans[0])
        return 0

    reports = [run_dataset(plan, args.budget_images, args) for plan in plans]
    print()
    print_machine(machine_info())
    for plan, report in zip(plans, reports):
        print()
        for line in table_lines(plan, args.budget_images, report["recipes"], report["winner"]):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
