"""Step 4: complete every identity to a multiple of K images with face-safe augmented copies.

P x K batches need K images of each identity. An identity with n real images
gets (-n) mod K generated ones, made by cycling through its real images in
sorted file order (the 1st generated from real image 1, the 2nd from real
image 2, ..., wrapping) and augmenting each copy (`facenet_kfp.augment`).

The output folder holds only the generated images, packed like the input
(`facenet_kfp.shards`, shard prefix "completion"), plus ``completion.json``.
Each image's augmentation comes from its own RNG, keyed by (seed, label id,
generated index), so the bytes do not depend on the number of workers or on
which other identities are present.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from facenet_kfp import augment
from facenet_kfp.codec import UnusableImage, open_image
from facenet_kfp.config import DataConfig
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir, no_space_named, remove_stale_temps, write_json
from facenet_kfp.labels import COUNTS_JSON, LABELS_JSON, load_labels
from facenet_kfp.progress import Progress
from facenet_kfp.provenance import check_inputs, write_provenance
from facenet_kfp.shards import ShardReader, ShardWriter, iter_manifest
from facenet_kfp.workers import available_cpus

log = logging.getLogger(__name__)

SUMMARY_FILE = "completion.json"
SHARD_PREFIX = "completion"
JPEG_QUALITY = 92
MAX_CHUNK = 32          # images per worker task: amortises inter-process traffic
CHUNKS_PER_WORKER = 4   # ...but small datasets still get split over every worker
WINDOW_PER_WORKER = 2   # chunks in flight per worker: keeps cores busy, bounds memory
SOURCE_FIELDS = ("file", "shard", "offset", "size")   # what a job needs of its real image's manifest row


class CompletionJob(NamedTuple):
    """One image to generate."""
    identity: str
    label: int                  # the identity's id in labels.json (RNG key)
    index: int                  # 0-based among this identity's generated images (RNG key)
    file: str                   # output name, "<identity>/<identity>_cNNNN.jpg"
    source: dict[str, Any]      # the real image's manifest row: file, shard, offset, size


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _real_images(dataset_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Manifest rows grouped by identity, each group sorted by file name.

    Rows keep only `SOURCE_FIELDS` (a third of a full row's memory), read from the streamed manifest.
    """
    by_identity: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    files: set[str] = set()
    for row in iter_manifest(dataset_dir):
        if row["synthetic"]:
            raise InputError(f"{dataset_dir}: manifest row {row['file']!r} is synthetic; completion "
                             f"expects the extract step's real images only")
        if row["file"] in files:
            raise InputError(f"{dataset_dir}: manifest lists {row['file']!r} twice")
        files.add(row["file"])
        by_identity[row["identity"]].append({key: row[key] for key in SOURCE_FIELDS})
    for rows in by_identity.values():
        rows.sort(key=lambda row: row["file"])
    return dict(by_identity)


def _check_agreement(real: dict[str, list[dict[str, Any]]], labels: dict[str, int],
                     counts: dict[str, int], dataset_dir: Path, labels_dir: Path) -> None:
    for identity, rows in real.items():
        if identity not in labels:
            raise InputError(f"identity {identity!r} has {len(rows)} image(s) in {dataset_dir} "
                             f"but is missing from {labels_dir / LABELS_JSON}")
        if counts[identity] != len(rows):
            raise InputError(f"identity {identity!r}: {dataset_dir} has {len(rows)} real image(s) "
                             f"but {labels_dir / COUNTS_JSON} says {counts[identity]}")
    for identity in labels:
        if identity not in real:
            raise InputError(f"identity {identity!r}: {labels_dir / COUNTS_JSON} says {counts[identity]} "
                             f"image(s) but {dataset_dir} has 0")


def plan_completion(real: dict[str, list[dict[str, Any]]], labels: dict[str, int],
                    multiple: int, min_images: int) -> tuple[list[CompletionJob], list[str]]:
    """The images to generate, and the identities excluded for having fewer than `min_images`.

    `real` maps each identity to its real manifest rows sorted by file. An
    identity with n >= min_images real images gets (-n) mod `multiple` jobs; job
    k copies real image k mod n and is named ``<identity>_c<n+k+1:04d>.jpg``.
    Jobs come in identity order, then k. Raises InputError when a generated name
    is already a real file.
    """
    real_files = {row["file"] for rows in real.values() for row in rows}
    jobs: list[CompletionJob] = []
    excluded: list[str] = []
    for identity in sorted(real):
        rows = real[identity]
        count = len(rows)
        if count < min_images:
            excluded.append(identity)
            continue
        for k in range((-count) % multiple):
            name = f"{identity}/{identity}_c{count + k + 1:04d}.jpg"
            if name in real_files:
                raise InputError(f"generated name {name!r} collides with a real image of the dataset; "
                                 f"was it completed already?")
            source = rows[k % count]
            jobs.append(CompletionJob(identity, labels[identity], k, name,
                                      {key: source[key] for key in SOURCE_FIELDS}))
    return jobs, excluded


def augmentation_rng(seed: int, label: int, index: int) -> np.random.Generator:
    """The RNG of one generated image, keyed by (seed, label id, generated index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, label, index]))


def generate_image(data: bytes, params: dict[str, Any], where: str = "image") -> tuple[bytes, int, int]:
    """Decode `data`, apply `params`, encode as JPEG (quality 92); returns (bytes, width, height).

    An image `codec.open_image` refuses (extract skips those; an older or
    hand-made dataset may hold one) raises InputError naming `where`.
    """
    try:
        image = open_image(data)
    except UnusableImage as exc:
        if exc.wrong_size:
            raise InputError(f"{where}: cannot generate images from it: {exc.reason}; re-run extract on "
                             f"the archive, which skips such images") from None
        raise InputError(f"{where}: not a readable image ({exc.reason})") from exc
    out = augment.apply_augmentation(image, params)
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), out.width, out.height


def generate_chunk(dataset_dir: str, seed: int, jobs: list[CompletionJob]
                   ) -> list[tuple[bytes, dict[str, Any], int, int]]:
    """Worker task: read, augment and encode each job's source; returns (jpeg, params, width, height)."""
    results = []
    with ShardReader(dataset_dir) as reader:
        for job in jobs:
            data = reader.read(job.source)
            params = augment.sample_params(augmentation_rng(seed, job.label, job.index))
            where = f"{Path(dataset_dir) / job.source['shard']}: {job.source['file']}"
            jpeg, width, height = generate_image(data, params, where)
            results.append((jpeg, params, width, height))
    return results


def _run_jobs(dataset_dir: Path, jobs: list[CompletionJob], seed: int, workers: int
              ) -> Iterator[tuple[CompletionJob, tuple[bytes, dict[str, Any], int, int]]]:
    """Yield (job, result) in job order, computing chunks on `workers` processes.

    At most WINDOW_PER_WORKER chunks per worker are in flight, so memory stays
    bounded whatever the dataset size.
    """
    size = max(1, min(MAX_CHUNK, math.ceil(len(jobs) / (workers * CHUNKS_PER_WORKER))))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from zip(chunk, generate_chunk(str(dataset_dir), seed, chunk))
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)))
    pending: collections.deque[tuple[list[CompletionJob], Future]] = collections.deque()
    todo = iter(chunks)
    try:
        for chunk in todo:
            pending.append((chunk, pool.submit(generate_chunk, str(dataset_dir), seed, chunk)))
            if len(pending) >= workers * WINDOW_PER_WORKER:
                break
        while pending:
            chunk, future = pending.popleft()
            results = future.result()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(generate_chunk, str(dataset_dir), seed, following)))
            yield from zip(chunk, results)
    finally:
        # On an error (or an abandoned generator) drop queued chunks instead of finishing them.
        pool.shutdown(wait=True, cancel_futures=True)


def complete_dataset(dataset_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, multiple: int = 4, seed: int = 0,
                     min_images: int = 1, shard_size_mb: int = DataConfig.shard_size_mb, workers: int | None = None
                     ) -> dict[str, Any]:
    """Generate the images that bring each identity's count up to a multiple of `multiple`.

    dataset_dir: packed real images (the extract step's output). labels_dir:
    ``labels.json`` and ``image_counts.json`` (the labels step's output), which
    must be made from this dataset (its provenance) and agree with the
    manifest. out_dir: written atomically; holds only the generated images
    (manifest rows add ``source``, ``augmentation``, ``width``, ``height``;
    ``synthetic`` is true), ``completion.json`` and ``provenance.json`` (the
    dataset and labels fingerprints, `multiple`, `min_images`, `seed`).

    Identities with fewer than `min_images` real images are excluded (not
    completed; whether they need completing or not) and listed in
    ``completion.json`` under ``excluded``. `seed` keys the augmentations;
    `workers` processes (default: all usable cores) do the image work.

    Returns the summary {generated, identities_completed, identities_excluded,
    multiple, seed, min_images}; the list of excluded names, which can be
    long, is only in ``completion.json``. InputError for labels of another
    dataset, a count that disagrees with the manifest, a bad `multiple`,
    `min_images` or `seed`, or a source image the codec refuses (named).
    """
    _check_int("multiple", multiple, 1)
    _check_int("min_images", min_images, 1)
    _check_int("seed", seed, 0)
    _check_int("shard_size_mb", shard_size_mb, 1)
    if workers is None:
        workers = available_cpus()
    _check_int("workers", workers, 1)

    dataset_dir, labels_dir = Path(dataset_dir), Path(labels_dir)
    labels, counts = load_labels(labels_dir)
    fingerprints = check_inputs(images=dataset_dir, labels=labels_dir)
    real = _real_images(dataset_dir)
    _check_agreement(real, labels, counts, dataset_dir, labels_dir)
    jobs, excluded = plan_completion(real, labels, multiple, min_images)
    completed = len({job.identity for job in jobs})
    log.info("completion: %d identities, %d real images; generating %d images for %d identities "
             "(multiple=%d, %d excluded with fewer than %d images, %d workers)",
             len(real), sum(map(len, real.values())), len(jobs), completed, multiple,
             len(excluded), min_images, workers)

    summary = {"generated": len(jobs), "identities_completed": completed,
               "identities_excluded": len(excluded), "excluded": excluded,
               "multiple": multiple, "seed": seed, "min_images": min_images}
    remove_stale_temps(out_dir)
    with no_space_named(Path(out_dir).absolute().parent, f"the completion images {out_dir}"), \
            atomic_dir(out_dir, step="complete") as tmp:
        with ShardWriter(tmp, shard_size_mb << 20, prefix=SHARD_PREFIX) as writer, \
                Progress("completion", total=len(jobs), unit="images", logger=log) as progress:
            for job, (jpeg, params, width, height) in _run_jobs(dataset_dir, jobs, seed, workers):
                writer.add(job.identity, job.file, jpeg, synthetic=True, source=job.source["file"],
                           augmentation=params, width=width, height=height)
                progress.update()
        write_json(tmp / SUMMARY_FILE, summary)
        write_provenance(tmp, "completion", images=fingerprints["images"], labels=fingerprints["labels"],
                         multiple=multiple, min_images=min_images, seed=seed)
    return {key: value for key, value in summary.items() if key != "excluded"}
