"""Benchmark the five data steps on an LFW-scale demo archive (5,749 identities, 13,233 images).

Prints each step's wall time, images/s and peak RSS (each step runs in its own
process through the `facenet-kfp` command line, as in its container; `measure`
reports its largest process, workers included, and the sum over its
processes), and two ratios measured side by side in this run:

- extract throughput / Pillow's raw decode throughput of the same images on all cores;
- completion throughput / raw decode + augment + encode throughput on all cores.

Each ratio is measured in `--rounds` pairs, the step and then its raw work right
after it, and the median pair is the figure: a shared machine has slow spells
of seconds to minutes (the same extract took 2.4 s and 3.2 s a minute apart),
and a pair measured back to back sees the same spell on both sides. Every pair
is printed.

With the mtcnn package (the train extra) it also times the align step
(`facenet-kfp align`, face detection and five-point alignment on the CPU) on
the first `--align-images` real images and on a third of them: the
difference of the two runs is the per-image cost without the detector's
one-off load, printed as images/s and images/s per core.

Targets: both ratios >= 0.7; labels and splits < 2 s; every step's peak RSS < 1 GB.
The archive is generated once into data/bench/ and reused.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from benchmarks.harness import machine_info, make_archive, print_machine
from facenet_kfp.complete import generate_image
from facenet_kfp.shards import ShardReader, ShardWriter, read_manifest

CLI = [sys.executable, "-m", "facenet_kfp.cli", "-q"]


# Runs the measured command as its only child and prints the largest ru_maxrss among it and
# every descendant it reaped (the kernel folds a reaped child's RUSAGE_CHILDREN into its parent's),
# and their CPU time, summed.
_MEASURING_PARENT = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime, code)
"""
SAMPLE_SECONDS = 0.2


class Measured(NamedTuple):
    """One command's wall time, memory and CPU time."""
    seconds: float
    peak_mb: float      # peak RSS of its largest process (the command or any worker), MiB
    total_mb: float     # peak of the summed PSS of all its processes, sampled every SAMPLE_SECONDS, MiB
    cpu_seconds: float  # user + system CPU time of all its processes


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process this user may see in /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue    # ended while we looked
            children[ppid].append(int(entry.name))
    return children


def _pss_mb(pid: int) -> float:
    """Proportional set size of a process in MiB (pages shared with forked workers count once overall)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass        # ended while we looked
    return 0.0


def _tree_pss_mb(root: int) -> float:
    """Summed PSS of `root`'s descendants (not `root` itself)."""
    children = _children()
    todo, total = list(children.get(root, [])), 0.0
    while todo:
        pid = todo.pop()
        total += _pss_mb(pid)
        todo.extend(children.get(pid, []))
    return total


def measure(argv: list[str]) -> Measured:
    """Run `argv` (stdout discarded, stderr shown) and measure it; SystemExit when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _MEASURING_PARENT, *argv], stdout=subprocess.PIPE, text=True)
    peak_total = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_total
        while not done.wait(SAMPLE_SECONDS):
            peak_total = max(peak_total, _tree_pss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    maxrss_kb, cpu, code = out.split()
    if int(code) != 0:
        raise SystemExit(f"failed with exit status {code}: {' '.join(argv)}")
    return Measured(seconds, int(maxrss_kb) / 1024, peak_total, float(cpu))


def run_step(args: list[str]) -> Measured:
    """Run one `facenet-kfp` step in its own processes and measure it."""
    return measure(CLI + args)


def _decode(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.width


def _decode_chunk(chunk: list[bytes]) -> tuple[int, float]:
    """(images decoded, CPU seconds it took)."""
    start = time.process_time()
    return sum(_decode(d) > 0 for d in chunk), time.process_time() - start


def _augment_chunk(chunk: list[tuple[bytes, dict]]) -> tuple[int, float]:
    """(images decoded, augmented and encoded, CPU seconds it took)."""
    start = time.process_time()
    return sum(len(generate_image(data, params)[0]) > 0 for data, params in chunk), time.process_time() - start


class Rate(NamedTuple):
    """Raw codec work on all cores."""
    per_second: float       # items per wall-clock second
    cpu_per_item: float     # CPU seconds per item


def _pool_rate(func, items: list, workers: int) -> Rate:
    """How fast `func` handles `items` on `workers` processes, their start-up not counted."""
    chunks = [items[i:i + 64] for i in range(0, len(items), 64)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(func, [[]] * (4 * workers), chunksize=1)     # workers started, modules imported
        start = time.perf_counter()
        done = cpu = 0
        for count, seconds in pool.imap(func, chunks):
            done, cpu = done + count, cpu + seconds
    return Rate(done / (time.perf_counter() - start), cpu / max(done, 1))


class Pair(NamedTuple):
    """One step run and its raw codec work measured right after it."""
    run: Measured
    raw: Rate
    count: int          # images the step handled

    @property
    def ratio(self) -> float:
        return self.count / self.run.seconds / self.raw.per_second

    @property
    def cpu_ratio(self) -> float:
        return self.raw.cpu_per_item * self.count / self.run.cpu_seconds


def median_pair(pairs: list[Pair]) -> Pair:
    """The pair with the median ratio (the lower middle one of an even number)."""
    ordered = sorted(pairs, key=lambda pair: pair.ratio)
    return ordered[(len(ordered) - 1) // 2]


def print_ratios(step: str, label: str, pairs: list[Pair]) -> None:
    """A step against the raw codec work of the same images on all cores: every pair, then the median one.

    ratio: throughput / raw throughput (target >= 0.7), which other load on
    the machine moves; CPU ratio: the raw work's CPU time / the step's (all
    its processes), the best ratio perfect use of the cores would give.
    """
    for i, pair in enumerate(pairs if len(pairs) > 1 else [], 1):
        print(f"  pair {i}: {step} {pair.count / pair.run.seconds:7.0f} images/s, {label} "
              f"{pair.raw.per_second:7.0f} images/s, ratio {pair.ratio:.2f}")
    pair = median_pair(pairs)
    of = f"median of {len(pairs)} pairs; " if len(pairs) > 1 else ""
    print(f"{label + ':':<27} {pair.raw.per_second:7.0f} images/s, {pair.raw.cpu_per_item * 1e3:5.2f} CPU ms/image")
    print(f"{step + ' throughput:':<27} {pair.count / pair.run.seconds:7.0f} images/s, "
          f"{pair.run.cpu_seconds / max(pair.count, 1) * 1e3:5.2f} CPU ms/image   ratio {pair.ratio:.2f} "
          f"({of}target >= 0.7), CPU ratio {pair.cpu_ratio:.2f}")


def step_argvs(archive: Path, out: Path) -> dict[str, list[str]]:
    """The `facenet-kfp` command line of each data step on `archive`, outputs in `out`."""
    return {
        "download": ["download", str(archive), "--out", str(out / "archive.tgz"),
                     "--sha256", Path(f"{archive}.sha256").read_text().split()[0]],
        "extract": ["extract", str(archive), "--out", str(out / "images")],
        "labels": ["labels", str(out / "images"), "--out", str(out / "labels")],
        "complete": ["complete", str(out / "images"), str(out / "labels"), "--out", str(out / "completion")],
        "splits": ["splits", str(out / "labels"), "--out", str(out / "splits")],
    }


def codec_work(out: Path) -> tuple[list[bytes], list[tuple[bytes, dict]]]:
    """(every real image's bytes, (source bytes, augmentation) of every generated image) of the steps' outputs."""
    rows = read_manifest(out / "images")
    with ShardReader(out / "images") as reader:
        real_bytes = [reader.read(r) for r in rows]
    by_file = {r["file"]: i for i, r in enumerate(rows)}
    # Each generated image's own source and augmentation, as its manifest row records them.
    generated = read_manifest(out / "completion")
    return real_bytes, [(real_bytes[by_file[g["source"]]], g["augmentation"]) for g in generated]


def ratio_pairs(argvs: dict[str, list[str]], results: dict[str, Measured], out: Path, rounds: int,
                workers: int) -> dict[str, list[Pair]]:
    """Each ratio's pairs: the step (again after its first run, into a fresh folder) and its raw work right after it."""
    real_bytes, jobs = codec_work(out)
    pairs: dict[str, list[Pair]] = {"extract": [], "complete": []}
    for round_ in range(rounds):
        for step, func, items in (("extract", _decode_chunk, real_bytes), ("complete", _augment_chunk, jobs)):
            if round_:
                again = [*argvs[step][:-1], str(out / f"{step}-again")]
                shutil.rmtree(again[-1], ignore_errors=True)
                run = run_step(again)
            else:
                run = results[step]
            raw = _pool_rate(func, items, workers) if items else Rate(float("nan"), float("nan"))
            pairs[step].append(Pair(run, raw, len(items)))
    return pairs


def report(name: str, out: Path, results: dict[str, Measured], pairs: dict[str, list[Pair]], workers: int) -> None:
    real, generated = len(read_manifest(out / "images")), len(read_manifest(out / "completion"))
    identities = len(json.loads((out / "labels" / "labels.json").read_text()))
    counts = {"download": real, "extract": real, "labels": real, "complete": generated, "splits": identities}
    print()
    print_machine(machine_info())
    print(f"{name}: {identities:,} identities, {real:,} images, {generated:,} generated; {workers} cores")
    print(f"{'step':<10} {'seconds':>8} {'items/s':>10} {'peak RSS MB':>12} {'all processes MB':>17}")
    for step, run in results.items():
        print(f"{step:<10} {run.seconds:8.2f} {counts[step] / run.seconds:10.0f} {run.peak_mb:12.0f} "
              f"{run.total_mb:17.0f}")
    print()
    print_ratios("extract", "Pillow raw decode", pairs["extract"])
    print_ratios("completion", "raw decode+augment+encode", pairs["complete"])
    print(f"labels {results['labels'].seconds:.2f} s, splits {results['splits'].seconds:.2f} s (target < 2 s each); "
          f"max peak RSS {max(r.peak_mb for r in results.values()):.0f} MB (largest process; target < 1024)")


def align_subset(images: Path, out: Path, count: int) -> int:
    """A packed dataset at `out` holding the first `count` real images of `images` (fewer when it has fewer)."""
    rows = read_manifest(images)[:count]
    shutil.rmtree(out, ignore_errors=True)
    with ShardReader(images) as reader, ShardWriter(out) as writer:
        for row in rows:
            writer.add(row["identity"], row["file"], reader.read(row))
    return len(rows)


def time_align(out: Path, count: int) -> None:
    """The align step on `count` and on count // 3 images; prints the per-image figures of the difference."""
    try:
        import mtcnn  # noqa: F401
    except ImportError:
        print("align: skipped, it needs the mtcnn package (the train extra)")
        return
    runs = {}
    for n in (count // 3, count):
        subset = out / f"align-input-{n}"
        n = align_subset(out / "images", subset, n)
        target = out / f"aligned-{n}"
        shutil.rmtree(target, ignore_errors=True)
        runs[n] = run_step(["align", str(subset), "--out", str(target), "--max-fallback-fraction", "1"])
    (small, a), (large, b) = sorted(runs.items())
    seconds, cpu = b.seconds - a.seconds, b.cpu_seconds - a.cpu_seconds
    print(f"align (mtcnn, CPU): {large:,} images in {b.seconds:.1f} s, {small:,} in {a.seconds:.1f} s; the "
          f"difference: {(large - small) / seconds:.1f} images/s, {(large - small) / cpu:.1f} images/s per core "
          f"({cpu / (large - small) * 1e3:.0f} CPU ms/image); peak RSS {b.peak_mb:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="data/bench", help="working folder (archive kept for reuse)")
    parser.add_argument("--identities", type=int, default=0, help="smaller archive instead of LFW scale (quick look)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of (step, raw work) measured for each ratio")
    parser.add_argument("--align-images", type=int, default=300,
                        help="real images the align step is timed on (and a third of them); 0 leaves it out")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    work = Path(args.work)
    name = f"synth-{args.identities}" if args.identities else "lfw-scale"
    archive, _ = make_archive(work / name, identities=args.identities or 120, lfw_scale=not args.identities)
    out = work / f"{name}-steps"
    shutil.rmtree(out, ignore_errors=True)
    workers = os.cpu_count() or 1
    argvs = step_argvs(archive, out)
    results = {step: run_step(argv) for step, argv in argvs.items()}     # download first, as the pipeline
    report(name, out, results, ratio_pairs(argvs, results, out, args.rounds, workers), workers)
    if args.align_images >= 3:
        time_align(out, args.align_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
