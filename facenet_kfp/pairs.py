"""Verification pairs: LFW pairs.txt parsing and checking, and balanced pair sampling from identities.

Image keys follow the LFW layout relative to the image root,
``<Person_Name>/<Person_Name>_NNNN.jpg`` (see `lfw_file_name`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facenet_kfp.errors import InputError

logger = logging.getLogger(__name__)

# Above this many possible different-person pairs, negatives are drawn by
# rejection sampling instead of enumerating every candidate pair.
_ENUMERATE_LIMIT = 2_000_000


@dataclass(frozen=True)
class Pair:
    """One verification pair from pairs.txt.

    Image indices are 1-based as in the file; `fold` is 0-based (the position of
    the fold's block in the file); `line` is the 1-based line number it was read from.
    """
    name1: str
    index1: int
    name2: str
    index2: int
    same: bool
    fold: int
    line: int = 0

    @property
    def file1(self) -> str:
        return lfw_file_name(self.name1, self.index1)

    @property
    def file2(self) -> str:
        return lfw_file_name(self.name2, self.index2)


def lfw_file_name(name: str, index: int) -> str:
    """Key of image `index` (1-based) of `name`: ``"name/name_%04d.jpg"``."""
    if not name or "/" in name or name.strip() != name:
        raise InputError(f"invalid LFW person name {name!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 1:
        raise InputError(f"LFW image index must be an integer >= 1, got {index!r} for {name!r}")
    return f"{name}/{name}_{int(index):04d}.jpg"


def _positive_int(text: str) -> int | None:
    """The value of a field of ASCII digits that is >= 1, else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value >= 1 else None


def parse_pairs_file(path: str | os.PathLike) -> list[Pair]:
    """Read an LFW pairs file into a list of `Pair`, in file order.

    Format (fields separated by tabs or spaces)::

        <folds> <n>                 View 2 (pairs.txt: "10 300"); or a single "<n>" (View 1, one fold)
        name i j                    n matched pairs of fold 0
        name1 i name2 j             n mismatched pairs of fold 0
        ...                         then fold 1, and so on

    Blank lines at the end of the file are ignored; any other deviation (wrong
    number of fields, an index that is not an integer >= 1, a matched pair of
    one image with itself, a mismatched pair of one name, missing or extra lines)
    raises InputError naming the file, the 1-based line number and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read pairs file {path}: {exc}") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()

    def fail(lineno: int, problem: str) -> InputError:
        content = lines[lineno - 1] if lineno <= len(lines) else "<end of file>"
        return InputError(f"{path}:{lineno}: {problem}: {content!r}")

    if not lines:
        raise InputError(f"{path}: empty pairs file, expected a header line '<folds> <pairs per fold>'")
    header = [_positive_int(field) for field in lines[0].split()]
    if len(header) == 2 and None not in header:
        folds, n = header
    elif len(header) == 1 and header[0] is not None:
        folds, n = 1, header[0]
    else:
        raise fail(1, "header must be '<folds> <pairs per class per fold>' or '<pairs>', integers >= 1")

    pairs: list[Pair] = []
    lineno = 1
    for fold in range(folds):
        for same in (True, False):
            for k in range(n):
                lineno += 1
                kind = "matched" if same else "mismatched"
                where = f"fold {fold + 1} of {folds}, {kind} pair {k + 1} of {n}"
                if lineno > len(lines):
                    raise fail(lineno, f"file ends early: expected {folds * 2 * n} pair lines, "
                                       f"got {len(lines) - 1} ({where} missing)")
                fields = lines[lineno - 1].split()
                if same:
                    if len(fields) != 3:
                        raise fail(lineno, f"expected a matched pair 'name i j' (3 fields) at {where}, "
                                           f"got {len(fields)} fields")
                    name1, name2, i_text, j_text = fields[0], fields[0], fields[1], fields[2]
                else:
                    if len(fields) != 4:
                        raise fail(lineno, f"expected a mismatched pair 'name1 i name2 j' (4 fields) "
                                           f"at {where}, got {len(fields)} fields")
                    name1, i_text, name2, j_text = fields
                i, j = _positive_int(i_text), _positive_int(j_text)
                if i is None or j is None:
                    raise fail(lineno, "image indices must be integers >= 1")
                if same and i == j:
                    raise fail(lineno, "a matched pair names the same image twice")
                if not same and name1 == name2:
                    raise fail(lineno, "a mismatched pair names one person twice")
                pairs.append(Pair(name1, i, name2, j, same, fold, lineno))
    if len(lines) > lineno:
        raise fail(lineno + 1, f"extra line after the {folds * 2 * n} pairs the header announces "
                               f"({folds} folds x {n} matched + {n} mismatched)")
    logger.info("read %d pairs (%d folds x %d matched + %d mismatched) from %s",
                len(pairs), folds, n, n, path)
    return pairs


def check_pairs_exist(pairs: list[Pair], available: set[str]) -> None:
    """Raise InputError if any pair names an image key not in `available`.

    `available` holds image keys relative to the image root
    (``"Name/Name_0001.jpg"``). The message counts every missing image and lists
    up to 10 of the offending pairs with their pairs-file line numbers.
    """
    problems: list[str] = []
    missing: set[str] = set()
    for pair in pairs:
        absent = [f for f in (pair.file1, pair.file2) if f not in available]
        if absent:
            missing.update(absent)
            if len(problems) < 10:
                problems.append(f"line {pair.line}: {', '.join(absent)}")
    if missing:
        bad_pairs = sum(1 for p in pairs if p.file1 not in available or p.file2 not in available)
        raise InputError(f"{bad_pairs} of {len(pairs)} pairs name {len(missing)} images that are not in the "
                         f"dataset ({len(available)} images); first: " + "; ".join(problems))


def make_pairs(images_by_identity: dict[str, list[str]], max_positive: int, seed: int
               ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different pairs from identities' images: returns (keys, index_a, index_b, same).

    * ``keys``: every image key, sorted by identity name then by key; the pair
      arrays index into this list.
    * Positive pairs: every (i, j), i < j, of two images of one identity; if
      there are more than `max_positive`, a seeded uniform subset of that size.
    * Negative pairs: as many as positives, drawn uniformly at random (seeded)
      among all unordered pairs of images of two different identities, without
      duplicates. (Uniform over image pairs, so identities with many images
      appear more often, as they do in the positives.)
    * ``index_a``, ``index_b``: int64 [P], with index_a < index_b; ``same``: bool [P].
      Pairs come in a seeded random order so that contiguous folds
      (`metrics.kfold_accuracy` without fold_ids) mix same and different pairs.

    Raises InputError if an identity has no images or a key appears twice,
    if there is no positive pair or fewer than two identities, or if there are
    fewer possible negative pairs than positives.
    """
    if isinstance(max_positive, bool) or not isinstance(max_positive, (int, np.integer)) or max_positive < 1:
        raise InputError(f"max_positive must be an integer >= 1, got {max_positive!r}")
    keys: list[str] = []
    sizes: list[int] = []
    seen: dict[str, str] = {}
    for identity in sorted(images_by_identity):
        images = sorted(images_by_identity[identity])
        if not images:
            raise InputError(f"identity {identity!r} has no images")
        for key in images:
            if key in seen:
                raise InputError(f"image {key!r} is listed twice (identities {seen[key]!r} and {identity!r})")
            seen[key] = identity
        keys.extend(images)
        sizes.append(len(images))
    if len(sizes) < 2:
        raise InputError(f"need at least 2 identities to make different-person pairs, got {len(sizes)}")
    size = np.asarray(sizes, dtype=np.int64)
    n_positive_all = int(np.sum(size * (size - 1) // 2))
    if n_positive_all == 0:
        raise InputError(f"no identity among {len(sizes)} has 2 images: no same-person pair is possible")
    rng = np.random.default_rng(seed)

    # Positives: enumerate per identity (LFW has ~240k in total, cheap) then subsample.
    starts = np.concatenate(([0], np.cumsum(size)[:-1]))
    pos_a, pos_b = [], []
    for start, k in zip(starts, size):
        if k >= 2:
            a, b = np.triu_indices(int(k), 1)
            pos_a.append(a + start)
            pos_b.append(b + start)
    pa, pb = np.concatenate(pos_a), np.concatenate(pos_b)
    if pa.size > max_positive:
        pick = np.sort(rng.choice(pa.size, size=max_positive, replace=False))
        pa, pb = pa[pick], pb[pick]
    count = int(pa.size)

    identity_of = np.repeat(np.arange(size.size), size)
    n = len(keys)
    n_negative_all = (n * n - int(np.sum(size * size))) // 2
    if count > n_negative_all:
        raise InputError(f"need {count} different-person pairs to balance the same-person pairs but only "
                         f"{n_negative_all} exist among {len(sizes)} identities / {n} images")
    if n_negative_all <= _ENUMERATE_LIMIT or 2 * count > n_negative_all:
        # Every pair (image of identity i, image of a later identity), in (a, b) order.
        a = np.concatenate([np.repeat(np.arange(s, s + k), n - s - k) for s, k in zip(starts, size)])
        b = np.concatenate([np.tile(np.arange(s + k, n), k) for s, k in zip(starts, size)])
        pick = np.sort(rng.choice(a.size, size=count, replace=False))
        na, nb = a[pick], b[pick]
    else:
        na, nb = _draw_negatives(identity_of, count, rng)

    index_a = np.concatenate((pa, na)).astype(np.int64)
    index_b = np.concatenate((pb, nb)).astype(np.int64)
    same = np.concatenate((np.ones(count, bool), np.zeros(count, bool)))
    order = rng.permutation(index_a.size)
    logger.info("made %d same and %d different pairs from %d identities / %d images "
                "(%d same-person pairs possible)", count, count, len(sizes), n, n_positive_all)
    return keys, index_a[order], index_b[order], same[order]


def _draw_negatives(identity_of: np.ndarray, count: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct unordered cross-identity image pairs, uniform, by rejection sampling.

    Only used when the possible pairs are many (see _ENUMERATE_LIMIT) and at
    least twice `count`, so the loop ends after a few rounds.
    """
    n = identity_of.size
    chosen = np.empty(0, dtype=np.int64)        # codes a * n + b with a < b, in draw order
    while chosen.size < count:
        a = rng.integers(0, n, size=2 * count)
        b = rng.integers(0, n, size=2 * count)
        ok = identity_of[a] != identity_of[b]
        lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
        codes = np.concatenate((chosen, lo * n + hi))
        _, first = np.unique(codes, return_index=True)
        chosen = codes[np.sort(first)][:count]   # keep the first occurrence, in draw order
    return chosen // n, chosen % n
