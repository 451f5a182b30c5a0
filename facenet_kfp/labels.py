"""Step 3: integer labels for identities, in sorted name order so every machine agrees."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir, read_json, write_json
from facenet_kfp.provenance import dataset_fingerprint, write_provenance
from facenet_kfp.shards import iter_manifest

log = logging.getLogger(__name__)

LABELS_JSON = "labels.json"
COUNTS_JSON = "image_counts.json"


def count_real_images(dataset_dir: str | os.PathLike) -> dict[str, int]:
    """Real (non-synthetic) images per identity of a packed dataset, keys sorted by name.

    Raises InputError when the manifest is empty, a row's identity or synthetic
    flag has the wrong type, or an identity has only synthetic images.
    """
    manifest = Path(dataset_dir) / "manifest.jsonl"
    real: Counter[str] = Counter()
    identities = set()
    number = 0
    for number, row in enumerate(iter_manifest(dataset_dir), start=1):   # streamed: memory ~ identities
        identity, synthetic = row["identity"], row["synthetic"]
        if not isinstance(identity, str) or not identity:
            raise InputError(f"{manifest}: row {number}: identity must be a non-empty string, got {identity!r}")
        if not isinstance(synthetic, bool):
            raise InputError(f"{manifest}: row {number}: synthetic must be true or false, got {synthetic!r}")
        identities.add(identity)
        if not synthetic:
            real[identity] += 1
    if not number:
        raise InputError(f"{manifest}: no images")
    only_synthetic = sorted(identities - set(real))
    if only_synthetic:
        raise InputError(f"{manifest}: identity {only_synthetic[0]!r} has only synthetic images "
                         f"({len(only_synthetic)} such identities)")
    return {name: real[name] for name in sorted(real)}


def build_labels(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write ``labels.json`` and ``image_counts.json`` for a packed dataset into `out_dir`.

    ``labels.json`` is ``{"Person_Name": id}`` with ids 0..n-1 assigned in sorted
    name order (Python string order, i.e. by code point); ``image_counts.json``
    is ``{"Person_Name": number of real images}``. Synthetic manifest rows are
    not counted. ``provenance.json`` records the dataset's fingerprint
    (`facenet_kfp.provenance`). The folder is written atomically.

    Returns ``{"identities": n, "images": real images in total, "max_images":
    largest count, "singletons": identities with exactly one real image}``.
    InputError for a malformed manifest row (named by its number), a dataset
    without images, an identity with only generated images, or an `out_dir`
    holding something this step did not write.
    """
    counts = count_real_images(dataset_dir)
    images = dataset_fingerprint(dataset_dir)
    labels = {name: index for index, name in enumerate(counts)}
    summary = {
        "identities": len(counts),
        "images": sum(counts.values()),
        "max_images": max(counts.values()),
        "singletons": sum(1 for count in counts.values() if count == 1),
    }
    with atomic_dir(out_dir, step="labels") as tmp:
        write_json(tmp / LABELS_JSON, labels)
        write_json(tmp / COUNTS_JSON, counts)
        write_provenance(tmp, "labels", images=images)
    log.info("%s: %d identities, %d real images (max %d per identity, %d singletons)", out_dir,
             summary["identities"], summary["images"], summary["max_images"], summary["singletons"])
    return summary


def load_labels(labels_dir: str | os.PathLike) -> tuple[dict[str, int], dict[str, int]]:
    """Read ``(labels, counts)`` written by `build_labels`, checking both files agree.

    Labels must be distinct integers 0..n-1, counts integers >= 1, and both
    files must have the same identities; otherwise InputError names the file
    and the offending key.
    """
    labels_dir = Path(labels_dir)
    labels_path, counts_path = labels_dir / LABELS_JSON, labels_dir / COUNTS_JSON
    labels, counts = read_json(labels_path), read_json(counts_path)
    for path, mapping, minimum in ((labels_path, labels, 0), (counts_path, counts, 1)):
        if not isinstance(mapping, dict) or not mapping:
            raise InputError(f"{path}: expected a non-empty JSON object of name -> integer")
        for name, value in mapping.items():
            if not name:
                raise InputError(f"{path}: empty identity name")
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{path}: {name!r} must map to an integer >= {minimum}, got {value!r}")
    if sorted(labels.values()) != list(range(len(labels))):
        raise InputError(f"{labels_path}: ids must be distinct and cover 0..{len(labels) - 1}")
    only_labels = sorted(set(labels) - set(counts))
    only_counts = sorted(set(counts) - set(labels))
    if only_labels or only_counts:
        where = (f"{only_labels[0]!r} is in {LABELS_JSON} but not {COUNTS_JSON}" if only_labels
                 else f"{only_counts[0]!r} is in {COUNTS_JSON} but not {LABELS_JSON}")
        raise InputError(f"{labels_dir}: inconsistent files: {where} "
                         f"({len(only_labels) + len(only_counts)} mismatched names)")
    return labels, counts
