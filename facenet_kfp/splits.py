"""Step 5: identity-disjoint train/val/test splits, seeded and stratified by image count."""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_dir, write_json, write_text
from facenet_kfp.labels import load_labels
from facenet_kfp.provenance import check_inputs, read_provenance, write_provenance

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUMMARY_JSON = "summary.json"


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def validate_fractions(fractions) -> tuple[float, float, float]:
    """Check (train, val, test): exactly three numbers, each > 0, summing to 1 within 1e-6."""
    try:
        values = tuple(fractions)
    except TypeError:
        raise InputError(f"fractions must be a sequence of three numbers, got {fractions!r}") from None
    if len(values) != 3:
        raise InputError(f"fractions must be exactly three numbers (train, val, test), "
                         f"got {len(values)}: {values!r}")
    for name, value in zip(SPLITS, values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InputError(f"{name} fraction must be a finite number, got {value!r}")
        if value <= 0:
            raise InputError(f"{name} fraction must be > 0, got {value!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise InputError(f"fractions must sum to 1, got {values!r} (sum {sum(values):.6g})")
    return tuple(float(value) for value in values)


def split_sizes(n_identities: int, n_with_pairs: int, fractions: tuple[float, float, float],
                test_split: bool = True) -> tuple[int, int, int]:
    """Number of identities in (train, val, test).

    The rule: val and test draw only from the M identities with >= 2 real
    images (they need positive pairs); identities with one image all go to
    train. Each of val and test gets ``round(fraction * M)`` identities
    (rounding half up), at least 1. When there are no single-image identities
    (M = N, the total) this is ``round(fraction * N)``; otherwise the share of
    M is the cap, so train keeps its ``train`` fraction of the identities with
    pairs, which triplet mining needs. (With LFW, round(0.15 * 5749) = 862 for
    each of val and test would take 1,724 of the 1,680 identities with pairs
    and leave train none.) If the minimum of 1 pushes val + test above M, the
    larger one shrinks. Train gets everything else.

    Without `test_split` (a separate archive is the test set) test is empty
    and its share goes to train.

    Raises InputError when val or test would be empty (M < 2) or train would be.
    """
    _, f_val, f_test = fractions
    if n_with_pairs < (2 if test_split else 1):
        split = "val" if n_with_pairs == 0 else "test"
        raise InputError(f"split {split!r} would be empty: val and test need one identity each with "
                         f"at least 2 real images, and {n_with_pairs} of {n_identities} identities have them")
    n_val = max(1, _round_half_up(f_val * n_with_pairs))
    n_test = max(1, _round_half_up(f_test * n_with_pairs)) if test_split else 0
    while n_val + n_test > n_with_pairs:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    n_train = n_identities - n_val - n_test
    if n_train < 1:
        raise InputError(f"split 'train' would be empty: all {n_identities} identities are needed for "
                         f"val ({n_val}) and test ({n_test}); at least {n_identities + 1} are required")
    return n_train, n_val, n_test


def make_splits(labels_dir: str | os.PathLike, out_dir: str | os.PathLike,
                fractions=(0.70, 0.15, 0.15), seed: int = 0, test_split: bool = True) -> dict:
    """Split the identities of `labels_dir` (see `build_labels`) into train, val and test.

    Without `test_split` test.txt is empty and the test fraction's identities
    are trained on: the test pairs come from a separate evaluation archive.

    Identities with >= 2 real images are shuffled with
    ``numpy.random.default_rng(seed).permutation`` (over the sorted names, so
    the result depends only on the names, counts and seed); the first go to
    val, the next to test, the rest to train with every single-image identity.
    Sizes follow `split_sizes`.

    Writes ``train.txt``, ``val.txt``, ``test.txt`` (``Name<TAB>real_count`` per
    line, sorted by name), ``summary.json`` and ``provenance.json`` (the
    fingerprints of the labels and of the dataset they came from) into
    `out_dir` atomically.

    Returns ``{split: {"identities", "images", "identities_with_pairs"}, ...,
    "fractions": [train, val, test], "seed": seed}``, also the content of
    summary.json. InputError for fractions that are not three numbers above
    0 summing to 1, or a split that would be empty (val and test need one
    identity each with at least 2 real images; train needs one left).
    """
    fractions = validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    _, counts = load_labels(labels_dir)
    labels_fingerprint = check_inputs(labels=labels_dir)["labels"]
    images_fingerprint = read_provenance(labels_dir, "labels")["images"]
    names = sorted(counts)
    with_pairs = [name for name in names if counts[name] >= 2]
    singles = [name for name in names if counts[name] == 1]
    n_train, n_val, n_test = split_sizes(len(names), len(with_pairs), fractions, test_split)

    order = np.random.default_rng(int(seed)).permutation(len(with_pairs))
    shuffled = [with_pairs[i] for i in order]
    members = {
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val:n_val + n_test]),
        "train": sorted(shuffled[n_val + n_test:] + singles),
    }
    assert len(members["train"]) == n_train

    summary: dict = {}
    for split in SPLITS:
        chosen = members[split]
        summary[split] = {
            "identities": len(chosen),
            "images": sum(counts[name] for name in chosen),
            "identities_with_pairs": sum(1 for name in chosen if counts[name] >= 2),
        }
    summary["fractions"] = list(fractions)
    summary["seed"] = int(seed)
    summary["test_split"] = bool(test_split)

    with atomic_dir(out_dir, step="splits") as tmp:
        for split in SPLITS:
            write_text(tmp / f"{split}.txt", "".join(f"{name}\t{counts[name]}\n" for name in members[split]))
        write_json(tmp / SUMMARY_JSON, summary)
        write_provenance(tmp, "splits", images=images_fingerprint, labels=labels_fingerprint,
                         fractions=list(fractions), seed=int(seed), test_split=bool(test_split))
    log.info("%s: %s", out_dir, ", ".join(
        f"{split} {summary[split]['identities']} identities / {summary[split]['images']} images"
        for split in SPLITS))
    return summary


def read_split(splits_dir: str | os.PathLike, name: str) -> list[tuple[str, int]]:
    """Read ``<splits_dir>/<name>.txt`` as [(identity, real_count), ...] in file order.

    Blank lines are ignored; any other line must be ``Name<TAB>count`` with a
    non-empty name and an integer count >= 1, names unique, and the file must
    list at least one identity. Errors name the file, line number and content.
    """
    if name not in SPLITS:
        raise InputError(f"split name must be one of {', '.join(SPLITS)}, got {name!r}")
    path = Path(splits_dir) / f"{name}.txt"
    if not path.is_file():
        raise InputError(f"{path}: split file not found")
    entries: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            fields = text.split("\t")
            if len(fields) != 2 or not fields[0] or not re.fullmatch(r"[0-9]+", fields[1].strip()):
                raise InputError(f"{path}:{number}: expected 'Name<TAB>count', got {text!r}")
            identity, count = fields[0], int(fields[1])
            if count < 1:
                raise InputError(f"{path}:{number}: count must be >= 1, got {text!r}")
            if identity in seen:
                raise InputError(f"{path}:{number}: identity {identity!r} listed twice")
            seen.add(identity)
            entries.append((identity, count))
    if not entries:
        raise InputError(f"{path}: no identities listed")
    return entries
