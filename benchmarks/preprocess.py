"""Benchmark the five data steps on an LFW-scale demo archive (5,749 identities, 13,233 images).

Prints each step's wall time, images/s and peak RSS (each step runs in its own
process through the `facenet-kfp` command line, as in its container), and two
ratios measured side by side in this run:

- extract throughput / Pillow's raw decode throughput of the same images on all cores;
- completion throughput / raw decode + augment + encode throughput on all cores.

Targets: both ratios >= 0.7; labels and splits < 2 s; every step's peak RSS < 1 GB.
The archive is generated once into data/bench/ and reused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from facenet_kfp.augment import sample_params
from facenet_kfp.complete import augmentation_rng, generate_image
from facenet_kfp.shards import ShardReader, read_manifest

CLI = [sys.executable, "-m", "facenet_kfp.cli", "-q"]


def run_step(args: list[str]) -> tuple[float, float]:
    """Run one CLI step in a child process; returns (seconds, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step failed: {' '.join(args)}")
    return seconds, usage.ru_maxrss / 1024


def _decode(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.width


def _decode_chunk(chunk: list[bytes]) -> int:
    return sum(_decode(d) > 0 for d in chunk)


def _augment_chunk(chunk: list[tuple[bytes, dict]]) -> int:
    return sum(len(generate_image(data, params)[0]) > 0 for data, params in chunk)


def _pool_rate(func, items: list, workers: int) -> float:
    chunks = [items[i:i + 64] for i in range(0, len(items), 64)]
    start = time.perf_counter()
    with get_context("spawn").Pool(workers) as pool:
        done = sum(pool.imap(func, chunks))
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="data/bench", help="working folder (archive kept for reuse)")
    parser.add_argument("--identities", type=int, default=0, help="smaller archive instead of LFW scale (quick look)")
    args = parser.parse_args()
    work = Path(args.work)
    name = f"synth-{args.identities}" if args.identities else "lfw-scale"
    archive_dir = work / name
    if not (archive_dir / "lfw.tgz").is_file():
        print(f"generating the {name} archive in {archive_dir} (once) ...", flush=True)
        synth = ["synth", "--out", str(archive_dir)]
        synth += ["--identities", str(args.identities)] if args.identities else ["--lfw-scale"]
        seconds, _ = run_step(synth)
        print(f"  generated in {seconds:.0f} s", flush=True)
    out = work / f"{name}-steps"
    shutil.rmtree(out, ignore_errors=True)
    workers = os.cpu_count() or 1

    results = {}
    steps = [
        ("extract", ["extract", str(archive_dir / "lfw.tgz"), "--out", str(out / "images")]),
        ("labels", ["labels", str(out / "images"), "--out", str(out / "labels")]),
        ("complete", ["complete", str(out / "images"), str(out / "labels"), "--out", str(out / "completion")]),
        ("splits", ["splits", str(out / "labels"), "--out", str(out / "splits")]),
    ]
    download_seconds, download_rss = run_step(["download", str(archive_dir / "lfw.tgz"), "--out",
                                               str(out / "archive.tgz"), "--sha256",
                                               (archive_dir / "lfw.tgz.sha256").read_text().split()[0]])
    results["download"] = (download_seconds, download_rss)
    for step, argv in steps:
        results[step] = run_step(argv)

    rows = read_manifest(out / "images")
    generated = read_manifest(out / "completion")
    with ShardReader(out / "images") as reader:
        real_bytes = [reader.read(r) for r in rows]
    by_file = {r["file"]: i for i, r in enumerate(rows)}
    labels = json.loads((out / "labels" / "labels.json").read_text())
    jobs = [(real_bytes[by_file[g["source"]]], sample_params(augmentation_rng(0, labels[g["identity"]], i)))
            for i, g in enumerate(generated)]

    decode_rate = _pool_rate(_decode_chunk, real_bytes, workers)
    augment_rate = _pool_rate(_augment_chunk, jobs, workers) if jobs else float("nan")
    extract_rate = len(rows) / results["extract"][0]
    complete_rate = len(generated) / results["complete"][0] if generated else float("nan")

    counts = {"download": len(rows), "extract": len(rows), "labels": len(rows),
              "complete": len(generated), "splits": len(labels)}
    print(f"\n{name}: {len(labels):,} identities, {len(rows):,} images, {len(generated):,} generated; {workers} cores")
    print(f"{'step':<10} {'seconds':>8} {'items/s':>10} {'peak RSS MB':>12}")
    for step, (seconds, rss) in results.items():
        print(f"{step:<10} {seconds:8.2f} {counts[step] / seconds:10.0f} {rss:12.0f}")
    print(f"\nPillow raw decode, {workers} processes:         {decode_rate:8.0f} images/s")
    print(f"extract throughput:                         {extract_rate:8.0f} images/s   ratio {extract_rate / decode_rate:.2f} (target >= 0.7)")
    print(f"raw decode+augment+encode, {workers} processes: {augment_rate:8.0f} images/s")
    print(f"completion throughput:                      {complete_rate:8.0f} images/s   ratio {complete_rate / augment_rate:.2f} (target >= 0.7)")
    print(f"labels {results['labels'][0]:.2f} s, splits {results['splits'][0]:.2f} s (target < 2 s each); "
          f"max peak RSS {max(r for _, r in results.values()):.0f} MB (target < 1024)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
