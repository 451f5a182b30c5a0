"""Verification pairs: LFW pairs.txt parsing and checking, and pair sampling balanced across identities.

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

# Above this many possible different-person pairs, negatives are drawn in bulk
# with repeats dropped instead of enumerating every candidate pair.
_ENUMERATE_LIMIT = 2_000_000
# Bulk rounds before giving up: each round draws twice the pairs still missing.
_MAX_ROUNDS = 1000


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


def make_pairs(images_by_identity: dict[str, list[str]], *, max_positive: int, max_per_identity: int,
               seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Same/different pairs balanced across identities, as LFW's pairs.txt: returns (keys, index_a, index_b, same).

    * ``keys``: every image key, sorted by identity name then by key; the pair
      arrays index into this list.
    * Positive pairs: per identity, a seeded uniform sample of at most
      `max_per_identity` of its image pairs (i, j), i < j. When those add up to
      more than `max_positive`, the per-identity cap is lowered evenly
      (`positive_quotas`), so that no identity dominates the same-person pairs.
    * Negative pairs: as many as positives. Each is drawn by choosing two
      distinct identities uniformly, then one image of each uniformly; a pair
      drawn before is drawn again (`draw_negatives`). Every identity, also one
      with a single image, is then as likely as any other to appear.
    * ``index_a``, ``index_b``: int64 [P], with index_a < index_b; ``same``: bool [P].
      Pairs come in a seeded random order so that contiguous folds
      (`metrics.kfold_accuracy` without fold_ids) mix same and different pairs.

    Raises InputError if an identity has no images or a key appears twice,
    if there is no positive pair or fewer than two identities, or if there are
    fewer possible negative pairs than positives.
    """
    for name, value in (("max_positive", max_positive), ("max_per_identity", max_per_identity)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
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
    possible = size * (size - 1) // 2
    if int(possible.sum()) == 0:
        raise InputError(f"no identity among {len(sizes)} has 2 images: no same-person pair is possible")
    rng = np.random.default_rng(seed)

    starts = np.concatenate(([0], np.cumsum(size)[:-1]))
    quota = positive_quotas(possible, int(max_per_identity), int(max_positive), rng)
    pos_a, pos_b = [], []
    for start, k, q in zip(starts, size, quota):
        if q:
            a, b = np.triu_indices(int(k), 1)
            pick = np.sort(rng.choice(a.size, size=int(q), replace=False))
            pos_a.append(a[pick] + start)
            pos_b.append(b[pick] + start)
    pa, pb = np.concatenate(pos_a), np.concatenate(pos_b)
    count = int(pa.size)

    n = len(keys)
    n_negative_all = (n * n - int(np.sum(size * size))) // 2
    if count > n_negative_all:
        raise InputError(f"need {count} different-person pairs to balance the same-person pairs but only "
                         f"{n_negative_all} exist among {len(sizes)} identities / {n} images")
    na, nb = draw_negatives(size, count, rng)

    index_a = np.concatenate((pa, na)).astype(np.int64)
    index_b = np.concatenate((pb, nb)).astype(np.int64)
    same = np.concatenate((np.ones(count, bool), np.zeros(count, bool)))
    order = rng.permutation(index_a.size)
    logger.info("made %d same and %d different pairs from %d identities / %d images (%d identities in "
                "same-person pairs, at most %d each)", count, count, len(sizes), n, int(np.sum(quota > 0)),
                int(quota.max()))
    return keys, index_a[order], index_b[order], same[order]


def positive_quotas(possible: np.ndarray, max_per_identity: int, max_positive: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Same-person pairs to draw per identity (int64, shape of `possible`), at most max_positive in all.

    ``min(possible, max_per_identity)`` when that fits in `max_positive`; else
    ``min(possible, c)`` for the largest level c that fits, plus one more pair
    for a seeded choice among the identities that have more than c, until the
    total is exactly `max_positive` (water-filling: identities differ by at
    most one pair unless they have fewer to give).
    """
    possible = np.asarray(possible, dtype=np.int64)
    quota = np.minimum(possible, max_per_identity)
    if int(quota.sum()) <= max_positive:
        return quota
    low, high = 0, max_per_identity          # sum(min(possible, low)) fits, sum(min(possible, high)) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if int(np.minimum(possible, mid).sum()) <= max_positive else (low, mid)
    quota = np.minimum(possible, low)
    extra = rng.choice(np.flatnonzero(possible > low), size=max_positive - int(quota.sum()), replace=False)
    quota[extra] += 1
    return quota


def draw_negatives(sizes: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct different-identity image pairs (a < b, int64 [count] each) over images grouped by identity.

    Images are numbered identity by identity (`sizes[i]` images of identity
    i). Each pair is drawn as: two distinct identities uniformly, then one
    image of each uniformly; a pair drawn before is drawn again. So image pair
    (a, b) of identities (i, j) has probability 1 / (C(I, 2) * sizes[i] * sizes[j])
    per draw, I = len(sizes).

    Where there are few possible pairs (at most _ENUMERATE_LIMIT, or fewer than
    twice `count`), every pair is enumerated and `count` are drawn without
    replacement with those probabilities (numpy's weighted choice, which is
    the same repeated draw); otherwise draws are made in bulk and repeats
    dropped. Both give pairs in draw order; their random streams differ.
    """
    size = np.asarray(sizes, dtype=np.int64)
    n = int(size.sum())
    starts = np.concatenate(([0], np.cumsum(size)[:-1]))
    n_all = (n * n - int(np.sum(size * size))) // 2
    if n_all <= _ENUMERATE_LIMIT or 2 * count > n_all:
        # Every pair (image of identity i, image of a later identity j), in (a, b) order.
        a = np.concatenate([np.repeat(np.arange(s, s + k), n - s - k) for s, k in zip(starts, size)])
        b = np.concatenate([np.tile(np.arange(s + k, n), k) for s, k in zip(starts, size)])
        identity_of = np.repeat(np.arange(size.size), size)
        weight = 1.0 / (size[identity_of[a]] * size[identity_of[b]])
        pick = rng.choice(a.size, size=count, replace=False, p=weight / weight.sum())
        return a[pick], b[pick]
    chosen = np.empty(0, dtype=np.int64)        # codes a * n + b with a < b, in draw order
    for _ in range(_MAX_ROUNDS):
        if chosen.size >= count:
            return chosen // n, chosen % n
        i = rng.integers(0, size.size, size=2 * count)
        j = rng.integers(0, size.size - 1, size=2 * count)
        j += j >= i                              # uniform over identities other than i
        x = starts[i] + rng.integers(0, size[i])
        y = starts[j] + rng.integers(0, size[j])
        codes = np.concatenate((chosen, np.minimum(x, y) * n + np.maximum(x, y)))
        _, first = np.unique(codes, return_index=True)
        chosen = codes[np.sort(first)][:count]   # keep the first occurrence, in draw order
    raise InputError(f"could not draw {count} distinct different-person pairs in {_MAX_ROUNDS} rounds "
                     f"among {size.size} identities / {n} images")
