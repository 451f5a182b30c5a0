"""Benchmark the data steps and the training input pipeline at CASIA-WebFace scale (10,575 identities, 494,414 images).

Each data step runs through the `facenet-kfp` command line in its own
processes, as in its container, on a generated CASIA-layout archive (~4.2 GB
.tgz at full scale). Printed per step: wall time, CPU time of all its
processes, images/s, the peak RSS of its largest process (workers included)
and of all its processes together, and the files and MB of the artifact it
writes. Then, measured side by side:

- extract throughput / Pillow's raw decode throughput on all cores, and
  completion throughput / raw decode + augment + encode throughput (both raw
  rates on a sample of at most --sample images, timed right after the
  steps), with the CPU ratio next to each (`preprocess.print_ratios`),
  which other load on a shared machine does not move;
- the training input pipeline alone, no model: `numpy_input.open_split` and
  `numpy_input.TrainBatches` iterating --batches P x K batches of the train split
  (the TensorFlow-free path), and `tf_input.make_train_dataset` over the same
  lazy split (what the TensorFlow trainer feeds tf.data), each in its own process, at this size and at --compare-fraction of
  CASIA, to show whether their peak RSS grows with the dataset.

Targets: each step's peak RSS < 1 GB; both ratios >= 0.7; about one shard per
256 MB (--shard-size-mb, passed to extract and complete); the input pipeline's
peak RSS independent of the dataset's size.

`--fraction F` generates round(F x 10,575) identities with CASIA's
images-per-identity shape (F = 1: `facenet-kfp synth --casia-scale`); each
archive is generated once into WORK/casia-F/ (about 15 minutes on 2 cores at
full scale) and reused, the step outputs go to WORK/casia-F-steps/ and are
replaced on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.harness import OUTPUTS, machine_info, make_archive, print_machine
from benchmarks.preprocess import (Measured, Pair, Rate, _augment_chunk, _decode_chunk, _pool_rate, measure, print_ratios,
                                   run_step)
from facenet_kfp.fsutil import write_json
from facenet_kfp.shards import ShardReader, iter_manifest, read_manifest, shard_files
from facenet_kfp.splits import read_split
from facenet_kfp.synth import CASIA_IDENTITIES

STEPS = ("download", "extract", "labels", "complete", "splits")
ARTIFACTS = {"download": "archive.tgz", **OUTPUTS}
RSS_TARGET_MB = 1024


def identities_for(fraction: float) -> int:
    return max(1, round(fraction * CASIA_IDENTITIES))


def archive_for(work: Path, fraction: float) -> Path:
    """WORK/casia-F/CASIA-WebFace.tgz, generated with 4 rendered faces per identity when missing."""
    n = identities_for(fraction)
    full = n == CASIA_IDENTITIES
    archive, _ = make_archive(work / f"casia-{fraction:g}", identities=n, layout="casia",
                              counts=None if full else "casia", casia_scale=full, pool=4)
    return archive


def run_data_steps(archive: Path, out: Path, shard_size_mb: int) -> dict[str, Measured]:
    """The five data steps on `archive`, each measured, outputs in `out` (replaced)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    a = {step: str(out / name) for step, name in ARTIFACTS.items()}
    sha256 = Path(f"{archive}.sha256").read_text().split()[0]
    argvs = {
        "download": ["download", str(archive), "--out", a["download"], "--sha256", sha256],
        "extract": ["extract", str(archive), "--out", a["extract"], "--shard-size-mb", str(shard_size_mb)],
        "labels": ["labels", a["extract"], "--out", a["labels"]],
        "complete": ["complete", a["extract"], a["labels"], "--out", a["complete"],
                     "--shard-size-mb", str(shard_size_mb)],
        "splits": ["splits", a["labels"], "--out", a["splits"]],
    }
    results = {}
    for step in STEPS:
        print(f"  {step} ...", end=" ", flush=True)
        results[step] = run_step(argvs[step])
        print(f"{results[step].seconds:.1f} s", flush=True)
    return results


def artifact_files(path: Path) -> tuple[int, float, list[int]]:
    """(files, MB, shard sizes in bytes) of one step's output (a file or a folder)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    shards = [p.stat().st_size for p in shard_files(path)] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files) / 1e6, shards


def _every(rows: list, most: int) -> list:
    """At most `most` rows spread evenly over `rows`."""
    return rows[::max(1, -(-len(rows) // most))]


def codec_rates(out: Path, sample: int, workers: int) -> tuple[Rate, Rate]:
    """Rates of raw decode and of raw decode + augment + encode on `workers` processes, on sampled images."""
    real = read_manifest(out / "images")
    generated = _every(read_manifest(out / "completion"), sample)
    needed = {g["source"] for g in generated}
    with ShardReader(out / "images") as reader:
        decode = [reader.read(row) for row in _every(real, sample)]
        sources = {row["file"]: reader.read(row) for row in real if row["file"] in needed}
    del real
    # Each generated image's own source and augmentation, as its manifest row records them.
    jobs = [(sources[g["source"]], g["augmentation"]) for g in generated]
    return (_pool_rate(_decode_chunk, decode, workers),
            _pool_rate(_augment_chunk, jobs, workers) if jobs else Rate(float("nan"), float("nan")))


# ----------------------------------------------------------------------------- input pipeline children

def iterate_train_batches(out: str, batches: str, report: str) -> None:
    """Child process: open the train split lazily, iterate `batches` TrainBatches with train's defaults."""
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.numpy_input import TrainBatches, open_split

    config, out = TrainConfig(), Path(out)
    start = time.perf_counter()
    with open_split(out / "images", out / "completion", out / "labels", out / "splits", "train") as split:
        opened = time.perf_counter()
        with TrainBatches(split, split.labels, config.p, config.k, config.image_size, config.crop_fraction,
                          config.augment, config.seed) as stream:
            for _ in range(int(batches)):
                next(stream)
        write_json(report, {"images": len(split), "open_seconds": opened - start,
                            "images_per_second": int(batches) * config.p * config.k / (time.perf_counter() - opened),
                            "cache_mb": split.cache.nbytes / 2**20})


def iterate_tf_batches(out: str, batches: str, report: str) -> None:
    """Child process: the TensorFlow trainer's input, `tf_input.make_train_dataset` over the lazy train split."""
    from facenet_kfp.config import TrainConfig
    from facenet_kfp.tf_input import make_train_dataset
    from facenet_kfp.numpy_input import open_split

    config, out = TrainConfig(), Path(out)
    with open_split(out / "images", out / "completion", out / "labels", out / "splits", "train") as split:
        start = time.perf_counter()
        dataset = make_train_dataset(split, split.labels, config.p, config.k, config.image_size,
                                     config.crop_fraction, config.augment, config.seed)
        for _ in dataset.take(int(batches)):
            pass
        write_json(report, {"images": len(split), "images_per_second":
                            int(batches) * config.p * config.k / (time.perf_counter() - start)})


def _child(function: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from benchmarks.scale import {function}; {function}(*sys.argv[1:])",
            *args]


def validation_bytes_mb(out: Path) -> float:
    """Encoded MB of the val identities with >= 2 real images (train reads only the batches it draws)."""
    val = {name for name, count in read_split(out / "splits", "val") if count >= 2}
    return sum(row["size"] for row in iter_manifest(out / "images") if row["identity"] in val) / 2**20


def measure_input(out: Path, batches: int, tensorflow: bool) -> dict:
    """Peak RSS of the input pipeline's two paths on the dataset in `out`, each in a fresh process."""
    result: dict = {}
    report = out / "input-report.json"
    result["lazy"] = measure(_child("iterate_train_batches", str(out), str(batches), str(report)))
    result["lazy_report"] = json.loads(report.read_text())
    if tensorflow:
        result["tf"] = measure(_child("iterate_tf_batches", str(out), str(batches), str(report)))
        result["tf_report"] = json.loads(report.read_text())
    result["val_mb"] = validation_bytes_mb(out)
    return result


# ----------------------------------------------------------------------------- report

def count_images(dataset: Path) -> int:
    return sum(1 for _ in iter_manifest(dataset))


def print_steps(name: str, out: Path, results: dict[str, Measured],
                artifacts: dict[str, tuple[int, float, list[int]]]) -> None:
    real, generated = count_images(out / "images"), count_images(out / "completion")
    identities = len(json.loads((out / "labels" / "labels.json").read_text()))
    print(f"\n{name}: {identities:,} identities, {real:,} images, {generated:,} generated")
    print(f"{'step':<9} {'wall s':>8} {'CPU s':>7} {'images/s':>9} {'peak RSS MB':>12} {'all procs MB':>13} "
          f"{'files':>6} {'MB':>9} {'shards':>7} {'MB/shard':>9}")
    for step, run in results.items():
        files, mb, shards = artifacts[step]
        images = generated if step == "complete" else real
        per_shard = f"{sum(shards) / len(shards) / 1e6:9.0f}" if shards else f"{'-':>9}"
        total = f"{run.total_mb:13.0f}" if run.total_mb else f"{'-':>13}"     # over before the first sample
        print(f"{step:<9} {run.seconds:8.1f} {run.cpu_seconds:7.1f} {images / run.seconds:9.0f} {run.peak_mb:12.0f} "
              f"{total} {files:6d} {mb:9.2f} {len(shards):7d} {per_shard}")
    worst = max(results, key=lambda step: results[step].peak_mb)
    print(f"largest process: {results[worst].peak_mb:.0f} MB ({worst}; target < {RSS_TARGET_MB}); images/s "
          f"counts real images, generated ones for complete; all procs: summed PSS, sampled")


def print_input(sizes: list[tuple[str, dict]]) -> None:
    print(f"\ntraining input pipeline alone (train split, {sizes[0][1]['batches']} batches of P x K), "
          f"each in a fresh process:")
    print(f"{'dataset':<30} {'path':<36} {'images':>8} {'peak RSS MB':>12} {'all procs MB':>13} {'detail':>0}")
    for name, run in sizes:
        lazy, report = run["lazy"], run["lazy_report"]
        print(f"{name:<30} {'open_split + TrainBatches':<36} {report['images']:8,d} {lazy.peak_mb:12.0f} "
              f"{lazy.total_mb:13.0f} {report['images_per_second']:.0f} images/s, cache "
              f"{report['cache_mb']:.0f} MB, open {report['open_seconds']:.1f} s")
        if "tf" in run:
            print(f"{'':<30} {'make_train_dataset (TF trainer)':<36} {run['tf_report']['images']:8,d} "
                  f"{run['tf'].peak_mb:12.0f} {run['tf'].total_mb:13.0f} "
                  f"{run['tf_report']['images_per_second']:.0f} images/s")
        print(f"{'':<30} {'validation split (read as drawn)':<36} {'':>8} {'':>12} {'':>13} "
              f"{run['val_mb']:.0f} MB of image bytes on disk")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of CASIA-WebFace's identities (default 1)")
    parser.add_argument("--compare-fraction", type=float, default=None,
                        help="second, smaller dataset for the input pipeline and the steps (default fraction / 10)")
    parser.add_argument("--work", default="data/bench-scale", help="working folder (archives kept for reuse)")
    parser.add_argument("--shard-size-mb", type=int, default=256, help="extract's and complete's shard size (default 256)")
    parser.add_argument("--batches", type=int, default=200, help="P x K batches the input pipeline iterates (default 200)")
    parser.add_argument("--sample", type=int, default=20_000, help="images timed for the raw codec rates (default 20,000)")
    parser.add_argument("--no-tensorflow", action="store_true", help="leave out the TensorFlow trainer's input")
    args = parser.parse_args(argv)
    compare = args.fraction / 10 if args.compare_fraction is None else args.compare_fraction
    if not 0 < args.fraction <= 1 or not 0 < compare < args.fraction:
        parser.error(f"need 0 < --compare-fraction < --fraction <= 1, got {compare:g} and {args.fraction:g}")
    work, workers = Path(args.work), os.cpu_count() or 1
    tensorflow = not args.no_tensorflow

    runs = []
    for fraction in (args.fraction, compare):
        archive = archive_for(work, fraction)
        out = work / f"casia-{fraction:g}-steps"
        name = f"CASIA x {fraction:g} ({archive.stat().st_size / 1e9:.2f} GB .tgz)"
        print(f"{name}: data steps ...", flush=True)
        steps = run_data_steps(archive, out, args.shard_size_mb)
        artifacts = {step: artifact_files(out / ARTIFACTS[step]) for step in STEPS}
        (out / ARTIFACTS["download"]).unlink()     # the same bytes as the archive; frees the disk
        if not runs:     # right after the steps, so that other load on the machine is alike
            print(f"{name}: raw codec rates on {workers} processes (at most {args.sample:,} images) ...", flush=True)
            rates = codec_rates(out, args.sample, workers)
        print(f"{name}: input pipeline ...", flush=True)
        runs.append((name, out, steps, artifacts,
                     measure_input(out, args.batches, tensorflow) | {"batches": args.batches}))

    print()
    print_machine(machine_info())
    for name, out, steps, artifacts, _ in runs:
        print_steps(name, out, steps, artifacts)
    name, out, steps = runs[0][:3]
    print(f"\n{name}, raw codec work on {workers} processes (at most {args.sample:,} images):")
    print_ratios("extract", "Pillow raw decode", [Pair(steps["extract"], rates[0], count_images(out / "images"))])
    print_ratios("completion", "raw decode+augment+encode",
                 [Pair(steps["complete"], rates[1], count_images(out / "completion"))])
    print_input([(run[0], run[4]) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
