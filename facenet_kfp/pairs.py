"""Verification pairs: LFW pairs.txt parsing and checking, and pair sampling balanced across identities.

Image keys follow the LFW layout relative to the image root,
``<Person_Name>/<Person_Name>_NNNN.jpg`` (see `lfw_file_name`).
`check_pairs_source` is the pipeline's "check pairs" step: it fetches a
pairs.txt, checks it against the packed dataset it refers to and writes the
checked-pairs folder that evaluation reads (`read_checked_pairs`).
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp.errors import InputError

logger = logging.getLogger(__name__)

# Above this many possible different-person pairs, negatives are drawn in bulk
# with repeats dropped instead of enumerating every candidate pair.
_ENUMERATE_LIMIT = 2_000_000
# Bulk rounds before giving up: each round draws twice the pairs still missing.
_MAX_ROUNDS = 1000
# The checked-pairs folder: the pairs file as fetched, and what the check found.
PAIRS_TXT, PAIRS_JSON = "pairs.txt", "pairs.json"
# A pairs file larger than this is refused while it downloads (LFW's pairs.txt is 0.1 MB).
MAX_PAIRS_MB = 64


@dataclass(frozen=True)
class Pair:
    """One verification pair from pairs.txt.

    Image indices are 1-based as in the file; `fold` is 0-based (the position of
    the fold's block in the file); `line` is the 1-based line number it was read from
    and `text` that line (for messages; not compared).
    """
    name1: str
    index1: int
    name2: str
    index2: int
    same: bool
    fold: int
    line: int = 0
    text: str = field(default="", compare=False)

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


def parse_pairs_file(path: str | os.PathLike, source: str = "") -> list[Pair]:
    """Read an LFW pairs file into a list of `Pair`, in file order.

    Format (fields separated by tabs or spaces)::

        <folds> <n>                 View 2 (pairs.txt: "10 300"); or a single "<n>" (View 1, one fold)
        name i j                    n matched pairs of fold 0
        name1 i name2 j             n mismatched pairs of fold 0
        ...                         then fold 1, and so on

    The file is UTF-8; a byte order mark at its start is accepted. Lines end
    with LF, CRLF or CR; names are read in Unicode NFC (as extract stores them).
    Blank lines at the end of the file are ignored; any other deviation (wrong
    number of fields, an index that is not an integer >= 1, a matched pair of
    one image with itself, a mismatched pair of one name, a name holding a
    slash, missing or extra lines) raises InputError naming `source` (the URI
    the user gave; default: `path`), the 1-based line number and the line.
    """
    path = Path(path)
    where = source or str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise InputError(f"{where} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise InputError(f"cannot read pairs file {where}: {exc.strerror or exc}") from exc
    lines = re.split(r"\r\n|\r|\n", text)
    while lines and not lines[-1].strip():
        lines.pop()

    def fail(lineno: int, problem: str) -> InputError:
        content = lines[lineno - 1] if lineno <= len(lines) else "<end of file>"
        return InputError(f"{where} line {lineno}: {problem}: {content!r}")

    if not lines:
        raise InputError(f"{where}: empty pairs file, expected a header line '<folds> <pairs per fold>'")
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
                place = f"fold {fold + 1} of {folds}, {kind} pair {k + 1} of {n}"
                if lineno > len(lines):
                    raise fail(lineno, f"file ends early: expected {folds * 2 * n} pair lines, "
                                       f"got {len(lines) - 1} ({place} missing)")
                fields = lines[lineno - 1].split()
                if same:
                    if len(fields) != 3:
                        raise fail(lineno, f"expected a matched pair 'name i j' (3 fields) at {place}, "
                                           f"got {len(fields)} fields")
                    name1, name2, i_text, j_text = fields[0], fields[0], fields[1], fields[2]
                else:
                    if len(fields) != 4:
                        raise fail(lineno, f"expected a mismatched pair 'name1 i name2 j' (4 fields) "
                                           f"at {place}, got {len(fields)} fields")
                    name1, i_text, name2, j_text = fields
                # Names as extract stores them (NFC), so "José" typed either way is one person.
                name1, name2 = unicodedata.normalize("NFC", name1), unicodedata.normalize("NFC", name2)
                i, j = _positive_int(i_text), _positive_int(j_text)
                if i is None or j is None:
                    raise fail(lineno, "image indices must be integers >= 1")
                if same and i == j:
                    raise fail(lineno, "a matched pair names the same image twice")
                if not same and name1 == name2:
                    raise fail(lineno, "a mismatched pair names one person twice")
                if any(sep in name for name in (name1, name2) for sep in "/\\"):
                    raise fail(lineno, "a person name may not contain '/' or '\\'")
                pairs.append(Pair(name1, i, name2, j, same, fold, lineno, lines[lineno - 1]))
    if len(lines) > lineno:
        raise fail(lineno + 1, f"extra line after the {folds * 2 * n} pairs the header announces "
                               f"({folds} folds x {n} matched + {n} mismatched)")
    logger.info("read %d pairs (%d folds x %d matched + %d mismatched) from %s",
                len(pairs), folds, n, n, where)
    return pairs


def declared_folds(pairs: list[Pair]) -> int:
    """Folds the pairs file's header declares (every fold holds pairs, so the last pair's fold + 1)."""
    return pairs[-1].fold + 1 if pairs else 0


def duplicate_pairs(pairs: list[Pair]) -> list[Pair]:
    """Pairs naming the same two images as an earlier pair (in either order), in file order."""
    seen: set[tuple[str, str]] = set()
    repeats = []
    for pair in pairs:
        key = tuple(sorted((pair.file1, pair.file2)))
        if key in seen:
            repeats.append(pair)
        seen.add(key)
    return repeats


def check_pairs_exist(pairs: list[Pair], available: set[str], source: str = "",
                      dataset_images: int | None = None) -> None:
    """Raise InputError if any pair names an image key not in `available`.

    `available` holds image keys relative to the image root
    (``"Name/Name_0001.jpg"``). The message starts with `source` (the pairs
    file's URI) when given, counts every missing image and lists up to 10 of
    the offending pairs with their pairs-file line numbers, saying for each
    image whether the dataset has no image of that name at all or the index
    is past the images it has of that name. `dataset_images` is the dataset's
    size for the message when `available` holds only the images of the names
    the pairs use (default: len(available)).
    """
    missing: set[str] = set()
    bad: list[Pair] = []
    for pair in pairs:
        absent = [f for f in (pair.file1, pair.file2) if f not in available]
        if absent:
            missing.update(absent)
            bad.append(pair)
    if not missing:
        return
    wanted = {key.split("/", 1)[0] for key in missing}
    indices: dict[str, list[int]] = {name: [] for name in wanted}
    for key in available:
        name, _, rest = key.partition("/")
        if name in indices:
            number = rest.rsplit("_", 1)[-1].split(".", 1)[0]
            indices[name].append(int(number) if number.isascii() and number.isdigit() else 0)

    def why(name: str, index: int) -> str:
        have = indices[name]
        if not have:
            return f"{name!r} is not in the dataset"
        if index > max(have):
            return (f"{lfw_file_name(name, index)}: index {index} is out of range: the dataset has {len(have)} "
                    f"image(s) of {name!r}, highest index {max(have)}")
        return f"{lfw_file_name(name, index)} is not in the dataset ({len(have)} image(s) of {name!r})"

    problems = []
    for pair in bad[:10]:
        reasons = [why(name, index) for name, index, key in ((pair.name1, pair.index1, pair.file1),
                                                             (pair.name2, pair.index2, pair.file2))
                   if key not in available]
        problems.append(f"line {pair.line}" + (f" {pair.text!r}" if pair.text else "") + ": "
                        + "; ".join(dict.fromkeys(reasons)))
    prefix = f"{source}: " if source else ""
    size = len(available) if dataset_images is None else dataset_images
    raise InputError(f"{prefix}{len(bad)} of {len(pairs)} pairs name {len(missing)} images that are not in the "
                     f"dataset ({size} images); first: " + "; ".join(problems))


def check_pairs_source(pairs_uri: str, pairs_sha256: str, dataset_dir: str | os.PathLike,
                       out_dir: str | os.PathLike) -> dict[str, Any]:
    """The "check pairs" step: fetch `pairs_uri`, check it against a packed dataset, write the checked pairs.

    The file is downloaded (`facenet_kfp.download`, verified by `pairs_sha256`
    when given; at most `MAX_PAIRS_MB`), parsed (`parse_pairs_file`) and every
    image it names must be a real image of `dataset_dir` (`check_pairs_exist`).
    Every error names `pairs_uri` and, where it is about a line, the line.
    Pairs naming the same two images as an earlier pair are counted and
    warned about, not refused (the figures then count them twice).

    `out_dir` gets, atomically: ``pairs.txt`` (the bytes as fetched) and
    ``pairs.json`` with the source URI, size, sha256 and whether it was
    checked against a given one, the counts (pairs, same and different, folds
    the header declares and pairs per class per fold, duplicates, identities
    and images named) and the fingerprint of the dataset it was checked
    against. With an empty `pairs_uri` only ``pairs.json`` is written, saying
    no pairs file was given. Returns the content of ``pairs.json``. InputError
    (DownloadError when fetching fails) naming `pairs_uri`, and the line where
    there is one, for a file that cannot be fetched, is not UTF-8 text, does
    not parse, or names an image `dataset_dir` does not hold.
    """
    from facenet_kfp.download import download
    from facenet_kfp.fsutil import atomic_dir, write_json
    from facenet_kfp.provenance import dataset_fingerprint
    from facenet_kfp.shards import MANIFEST, iter_manifest

    if pairs_uri and not pairs_uri.strip():
        raise InputError(f"pairs_uri {pairs_uri!r} is blank; give a pairs file's URI or leave it empty")
    pairs_uri, pairs_sha256 = (pairs_uri or "").strip(), (pairs_sha256 or "").strip()
    dataset_dir = Path(dataset_dir)
    if not pairs_uri:
        if pairs_sha256:
            raise InputError(f"pairs_sha256 is set ({pairs_sha256[:12]}…) but pairs_uri is empty; give the pairs "
                             f"file (data.pairs_uri) or clear pairs_sha256")
        summary: dict[str, Any] = {"pairs_uri": "", "pairs": 0,
                                   "note": "no pairs file given (data.pairs_uri is empty)"}
        with atomic_dir(out_dir, step="check_pairs") as tmp:
            write_json(tmp / PAIRS_JSON, summary)
        logger.info("no pairs file given: evaluation draws its pairs from the splits")
        return summary
    with atomic_dir(out_dir, step="check_pairs") as tmp:
        fetched = download(pairs_uri, tmp / PAIRS_TXT, sha256=pairs_sha256, max_download_gb=MAX_PAIRS_MB / 1000,
                           size_hint=f"a pairs file is at most {MAX_PAIRS_MB} MB (LFW's pairs.txt is 0.1 MB); "
                                     f"is {pairs_uri} a pairs file?")
        pairs = parse_pairs_file(fetched.path, source=pairs_uri)
        # Streamed: only the images of the names the pairs use are kept (memory ~ pairs, not dataset).
        names = {name for p in pairs for name in (p.name1, p.name2)}
        available: set[str] = set()
        real = 0
        for row in iter_manifest(dataset_dir):
            if not row["synthetic"]:
                real += 1
                if row["file"].split("/", 1)[0] in names:
                    available.add(row["file"])
        if not real:
            raise InputError(f"{dataset_dir / MANIFEST}: no real images to check {pairs_uri} against")
        check_pairs_exist(pairs, available, source=pairs_uri, dataset_images=real)
        repeats = duplicate_pairs(pairs)
        same = sum(p.same for p in pairs)
        summary = {
            "pairs_uri": pairs_uri, "size": fetched.size, "sha256": fetched.sha256,
            "sha256_checked": bool(pairs_sha256),
            "pairs": len(pairs), "same_pairs": same, "different_pairs": len(pairs) - same,
            "folds": declared_folds(pairs), "pairs_per_fold": len(pairs) // (2 * declared_folds(pairs)),
            "duplicates": len(repeats), "duplicate_lines": [p.line for p in repeats[:20]],
            "identities": len(names), "images": len({key for p in pairs for key in (p.file1, p.file2)}),
            "dataset_images": real, "images_fingerprint": dataset_fingerprint(dataset_dir),
        }
        write_json(tmp / PAIRS_JSON, summary)
    if repeats:
        first = repeats[0]
        logger.warning("%s: %d duplicate pair(s) name the same two images as an earlier pair (first: line %d, "
                       "%s and %s); each is counted as often as it is listed", pairs_uri, len(repeats), first.line,
                       first.file1, first.file2)
    logger.info("%s: %d pairs (%d same, %d different) in %d fold(s), every image in %s", pairs_uri, len(pairs),
                same, len(pairs) - same, summary["folds"], dataset_dir)
    return summary


def read_checked_pairs(folder: str | os.PathLike) -> tuple[str, list[Pair]]:
    """(pairs URI, pairs) of a checked-pairs folder (`check_pairs_source`); ("", []) when it holds no pairs file.

    The pairs file must still have the sha256 the check recorded; errors name
    the pairs URI, so a message about a line points at the user's file.
    """
    from facenet_kfp.fsutil import file_sha256, read_json

    folder = Path(folder)
    summary = read_json(folder / PAIRS_JSON)
    if not isinstance(summary, dict) or not isinstance(summary.get("pairs_uri"), str):
        raise InputError(f"{folder / PAIRS_JSON}: not a checked-pairs record (no 'pairs_uri'); is {folder} "
                         f"the output of the check pairs step?")
    uri = summary["pairs_uri"]
    if not uri:
        return "", []
    path = folder / PAIRS_TXT
    if not path.is_file():
        raise InputError(f"{path}: not found, though {folder / PAIRS_JSON} records the pairs file {uri}")
    if file_sha256(path) != summary.get("sha256"):
        raise InputError(f"{path}: changed since {uri} was checked (sha256 differs from {folder / PAIRS_JSON})")
    return uri, parse_pairs_file(path, source=uri)


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
