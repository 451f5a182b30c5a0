"""Procedural demo dataset: an `lfw.tgz` look-alike of drawn faces plus a View 2 `pairs.txt`.

The archive has LFW's layout (`lfw/<First_Last>/<First_Last>_NNNN.jpg`, 250x250
RGB JPEG, face roughly centred) and LFW's long-tailed images-per-person shape,
so every pipeline step runs on it unchanged, offline and in seconds. The same
faces also come in the layouts of the large training sets (`LAYOUTS`):
CASIA-WebFace (`CASIA-WebFace/0000045/001.jpg`), VGGFace2
(`vggface2/{train,test}/n000002/0001_01.jpg`, images of varying size and
aspect with the face somewhere inside, and `vggface2/bb_landmark/loose_bb_*.csv`
face boxes) and a nested identity-per-folder tree (`faces/set1/[more/]<Name>/1.jpg`),
as .tgz, .tar or .zip, streamed to disk. At CASIA-WebFace's size (494,414
images) rendering every face is slow; `pool` renders a few faces per identity
and derives every image from one of them by a shift, a mirror and a
brightness change (cheap Pillow operations).

Determinism: every random choice comes from `numpy.random.SeedSequence` keyed
by `(seed, domain, ...)`, e.g. image `j` of identity `i` uses
`(seed, _SEED_IMAGE, i, j)`. The archive bytes therefore depend on the seed
only, not on the number of worker processes; tar metadata and the gzip header
are fixed.

Faces are drawn by `facenet_kfp.faces`; images per identity, names and ids
come from `facenet_kfp.population`. This module lays them out as archives.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import zipfile
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from facenet_kfp.errors import InputError
from facenet_kfp.faces import (  # noqa: F401  (re-exported: the synth API)
    BEARDS, DEFAULT_VARIATION, HAIR_STYLES, LFW_IMAGE_SIZE, MIN_IMAGE_SIZE, FaceIdentity, Variation, _background,
    contact_sheet, identity_params, render_face, render_jpeg, sample_identity)
from facenet_kfp.fsutil import atomic_file, file_sha256, write_text
from facenet_kfp.population import (  # noqa: F401  (re-exported: the synth API)
    BIN_ALPHA, CASIA_IDENTITIES, CASIA_IMAGES, CASIA_MIN_IMAGES, COUNT_BINS, DEMO_BIN_FRACTIONS, DEMO_LARGEST,
    DEMO_MEAN_IMAGES, DEMO_REFERENCE_IDENTITIES, LFW_BIN_PEOPLE, LFW_IDENTITIES, LFW_IMAGES, LFW_LARGEST,
    MIN_IDENTITIES, MIN_PAIRED, MIN_TRAINABLE, TAIL_ALPHA, VGGFACE2_IDENTITIES, VGGFACE2_TEST_IDENTITIES,
    _SEED_FILES, _SEED_GEOMETRY, _SEED_IMAGE, _SEED_PAIRS, _SEED_POOL, _SEED_VARIANT, _check_identities,
    _check_seed, _rng, casia_counts, casia_ids, identity_names, image_counts, vggface2_ids)
from facenet_kfp.progress import Progress

log = logging.getLogger(__name__)

PAIR_FOLDS = 10
MAX_PAIRS_PER_FOLD = 300                # LFW View 2: 10 folds x 300 matched + 300 mismatched

# Image width as a fraction of image_size (180-400 px at 250), height / width, and the pasted
# face scene's side as a fraction of the shorter side: loose crops, face anywhere inside.
VGGFACE2_WIDTH = (0.72, 1.6)
VGGFACE2_ASPECT = (1.0, 1.3)
VGGFACE2_FACE = (0.6, 0.85)
# The loose box's (width, height) as fractions of the face scene's side: 1.3 x the box's longer
# side (extract's BOX_SCALE) gives the scene back, framed like an LFW image.
VGGFACE2_BOX = (0.62, 0.77)

LAYOUTS = ("lfw", "casia", "vggface2", "nested")
ARCHIVE_FORMATS = ("tgz", "tar", "zip")
# The archive's top folder (and file name stem) per layout.
TOP_FOLDERS = {"lfw": "lfw", "casia": "CASIA-WebFace", "vggface2": "vggface2", "nested": "faces"}
COUNT_SHAPES = ("lfw", "casia")
# Pool renders are this fraction of image_size larger on each side; a derived image is a crop
# shifted by up to this much (about LFW's +-5 px at 250).
POOL_SHIFT = 0.03

# Fixed tar metadata: 2008-01-01 00:00 UTC, the year LFW was published.
_TAR_MTIME = 1_199_145_600
_IMAGES_PER_TASK = 32                   # rendering work unit: balances load on large identities


@dataclass(frozen=True)
class SynthResult:
    """What `generate_demo_archive` wrote."""
    archive: Path        # out_dir / "lfw.tgz" (the layout's top folder and the format's suffix)
    pairs: Path | None   # out_dir / "pairs.txt"; None for layouts other than lfw
    sha256: str          # hex sha256 of the archive; also in out_dir / "<archive name>.sha256"
    identities: int
    images: int
    layout: str = "lfw"


# --- the layouts' images: rendering tasks, pools of rendered faces, VGGFace2 geometry -----------

class _Task(NamedTuple):
    """Images start..stop-1 (0-based) of one identity, for a rendering worker."""
    seed: int
    index: int           # identity index
    start: int
    stop: int
    size: int            # image_size
    style: str = "square"   # "square" (size x size) or "vggface2" (`vggface2_geometry`)
    pool: int = 0        # faces rendered per identity to derive the images from; 0: render each


def _render_task(task: _Task) -> list[bytes]:
    """JPEG bytes of the task's images."""
    identity = identity_params(task.seed, task.index)
    if task.style == "square" and not task.pool:
        return [render_jpeg(task.seed, task.index, j, task.size, identity) for j in range(task.start, task.stop)]
    pool = [render_face(identity, _rng(task.seed, _SEED_POOL, task.index, k), task.size + 2 * _margin(task.size))
            for k in range(task.pool)]
    out = []
    for j in range(task.start, task.stop):
        if task.style == "vggface2":
            image, rng = _vggface2_image(task.seed, task.index, j, task.size, identity, pool)
        else:
            image, rng = derive_face(pool, task.seed, task.index, j, task.size)
        out.append(_jpeg(image, rng))
    return out


def _margin(size: int) -> int:
    return max(1, round(size * POOL_SHIFT))


def _jpeg(image: Image.Image, rng: np.random.Generator, variation: Variation = DEFAULT_VARIATION) -> bytes:
    out = io.BytesIO()
    low, high = variation.jpeg_quality
    image.save(out, format="JPEG", quality=int(rng.integers(low, high + 1)))
    return out.getvalue()


def derive_face(pool: Sequence[Image.Image], seed: int, identity_index: int, image_index: int,
                size: int = LFW_IMAGE_SIZE, variation: Variation = DEFAULT_VARIATION
                ) -> tuple[Image.Image, np.random.Generator]:
    """Image `image_index` of an identity, derived from its rendered `pool` (scenes of size + 2m px).

    Pool face j mod len(pool), cropped to size x size at an offset of 0..2m px
    per axis (m = max(1, round(size * POOL_SHIFT))), mirrored with probability
    1/2, brightness times `variation.gain`: ~0.5 ms against ~12 ms for a render
    at 250 px. Returns the image and its RNG (for the JPEG quality).
    """
    rng = _rng(seed, _SEED_VARIANT, identity_index, image_index)
    base = pool[image_index % len(pool)]
    dx, dy = (int(v) for v in rng.integers(0, base.width - size + 1, 2))
    image = base.crop((dx, dy, dx + size, dy + size))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Blending with black at alpha = gain scales every channel by the gain (clipped), in C.
    return Image.blend(Image.new("RGB", image.size), image, float(rng.uniform(*variation.gain))), rng


class Geometry(NamedTuple):
    """Where the face scene sits in a VGGFace2-style image, and the loose box around its face."""
    width: int
    height: int
    face: int                 # side of the pasted square face scene
    left: int                 # its top-left corner
    top: int
    box: tuple[int, int, int, int]   # (x, y, w, h), the loose_bb csv's X, Y, W, H


def vggface2_geometry(seed: int, identity_index: int, image_index: int, size: int = LFW_IMAGE_SIZE) -> Geometry:
    """The layout of one VGGFace2-style image: width in `VGGFACE2_WIDTH` x size, height / width
    in `VGGFACE2_ASPECT`, scene side in `VGGFACE2_FACE` x the shorter side at a uniform position,
    and a box of `VGGFACE2_BOX` x the side (each +-4%) centred on the scene (+-3% of the side)."""
    rng = _rng(seed, _SEED_GEOMETRY, identity_index, image_index)
    width = int(rng.integers(round(VGGFACE2_WIDTH[0] * size), round(VGGFACE2_WIDTH[1] * size) + 1))
    height = round(width * rng.uniform(*VGGFACE2_ASPECT))
    face = round(min(width, height) * rng.uniform(*VGGFACE2_FACE))
    left, top = int(rng.integers(0, width - face + 1)), int(rng.integers(0, height - face + 1))
    cx, cy = np.array([left, top]) + face / 2 + rng.uniform(-0.03, 0.03, 2) * face
    w, h = np.array(VGGFACE2_BOX) * face * rng.uniform(0.96, 1.04, 2)
    box = (round(cx - w / 2), round(cy - h / 2), max(round(w), 1), max(round(h), 1))
    return Geometry(width, height, face, left, top, box)


def _vggface2_image(seed: int, identity_index: int, image_index: int, size: int, identity: FaceIdentity,
                    pool: Sequence[Image.Image]) -> tuple[Image.Image, np.random.Generator]:
    """A VGGFace2-style image: a face scene (rendered, or derived from `pool`) scaled to its
    `vggface2_geometry` side and pasted on a larger, identity-independent scene."""
    g = vggface2_geometry(seed, identity_index, image_index, size)
    rng = _rng(seed, _SEED_IMAGE, identity_index, image_index)
    if pool:
        face, _ = derive_face(pool, seed, identity_index, image_index, size)
    else:
        face = render_face(identity, rng, size)
    canvas = _background(rng, max(g.width, g.height)).crop((0, 0, g.width, g.height))
    canvas.paste(face.resize((g.face, g.face), Image.BILINEAR) if g.face != size else face, (g.left, g.top))
    return canvas, rng


# --- pairs.txt -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pairs:
    """LFW View 2 pairs: per fold `per_fold` matched (name, i, j) and mismatched (a, i, b, j), 1-based."""
    folds: int
    per_fold: int
    matched: tuple[tuple[tuple[str, int, int], ...], ...]
    mismatched: tuple[tuple[tuple[str, int, str, int], ...], ...]

    def to_text(self) -> str:
        lines = [f"{self.folds}\t{self.per_fold}"]
        for matched, mismatched in zip(self.matched, self.mismatched):
            lines += [f"{name}\t{i}\t{j}" for name, i, j in matched]
            lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in mismatched]
        return "\n".join(lines) + "\n"


def _positive_stream(rng: np.random.Generator, count: int) -> Iterator[tuple[int, int]]:
    """Distinct unordered image pairs (i < j, 1-based) of one identity, in random order."""
    total = count * (count - 1) // 2
    if total <= 4096:
        pairs = [(i, j) for i in range(1, count + 1) for j in range(i + 1, count + 1)]
        for index in rng.permutation(total):
            yield pairs[index]
        return
    # Large identities: rejection sampling; we never need more than a small part of the pairs.
    seen: set[tuple[int, int]] = set()
    while len(seen) < total:
        i, j = sorted(int(v) for v in rng.choice(count, size=2, replace=False) + 1)
        if (i, j) not in seen:
            seen.add((i, j))
            yield i, j


def make_pairs(names: Sequence[str], counts: Sequence[int], seed: int, folds: int = PAIR_FOLDS,
               max_per_fold: int = MAX_PAIRS_PER_FOLD) -> Pairs:
    """Draw LFW View 2 style pairs, distinct across the whole file.

    per_fold = min(max_per_fold, P // folds, Q // folds) where P = sum C(k, 2)
    matched and Q = (T^2 - sum k^2) / 2 mismatched image pairs exist. Matched
    pairs are taken round-robin over identities (a shuffled order), so small
    identities are represented and large ones do not dominate; mismatched pairs
    pick two different identities uniformly, then one image of each. Both lists
    are shuffled before being dealt into folds and sorted by name within a fold.
    Unlike LFW, folds are not identity-disjoint (that needs >= 2 people per fold
    with >= 2 images); 10-fold threshold selection does not rely on it.
    """
    if len(names) != len(counts):
        raise InputError(f"names and counts differ in length: {len(names)} vs {len(counts)}")
    k = np.asarray(counts, dtype=np.int64)
    positives = int((k * (k - 1) // 2).sum())
    negatives = int((k.sum() ** 2 - (k ** 2).sum()) // 2)
    per_fold = min(max_per_fold, positives // folds, negatives // folds)
    if per_fold < 1:
        raise InputError(f"too few images for {folds} pair folds: {positives} matched and "
                         f"{negatives} mismatched pairs available")
    need = per_fold * folds
    rng = _rng(seed, _SEED_PAIRS)

    streams = {int(i): _positive_stream(rng, int(k[i])) for i in rng.permutation(len(k)) if k[i] >= 2}
    matched: list[tuple[str, int, int]] = []
    while len(matched) < need:
        for index in list(streams):
            pair = next(streams[index], None)
            if pair is None:
                del streams[index]
                continue
            matched.append((names[index], *pair))
            if len(matched) == need:
                break

    seen: set[tuple[str, int, str, int]] = set()
    mismatched: list[tuple[str, int, str, int]] = []
    while len(mismatched) < need:
        a, b = sorted(int(v) for v in rng.choice(len(k), size=2, replace=False))
        pair = (names[a], int(rng.integers(1, k[a] + 1)), names[b], int(rng.integers(1, k[b] + 1)))
        if pair not in seen:
            seen.add(pair)
            mismatched.append(pair)

    matched = [matched[i] for i in rng.permutation(need)]
    mismatched = [mismatched[i] for i in rng.permutation(need)]
    return Pairs(
        folds=folds, per_fold=per_fold,
        matched=tuple(tuple(sorted(matched[f * per_fold:(f + 1) * per_fold])) for f in range(folds)),
        mismatched=tuple(tuple(sorted(mismatched[f * per_fold:(f + 1) * per_fold])) for f in range(folds)),
    )


# --- the archive -----------------------------------------------------------------------------

_ZIP_TIME = (2008, 1, 1, 0, 0, 0)       # = _TAR_MTIME


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = _TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _ArchiveWriter:
    """Streams folders and files into a .tgz (gzip level 6), .tar or .zip (stored) with fixed metadata.

    Nothing but the current member is held: tarfile's member list is cleared
    after each file; a zip keeps its central directory (~100 bytes a member).
    """

    def __init__(self, handle, fmt: str, inner_name: str):
        self._stack = contextlib.ExitStack()
        self._zip = self._tar = None
        if fmt == "zip":
            self._zip = self._stack.enter_context(zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED))
            return
        if fmt == "tgz":
            handle = self._stack.enter_context(gzip.GzipFile(filename=inner_name, mode="wb", fileobj=handle,
                                                             mtime=0, compresslevel=6))
        self._tar = self._stack.enter_context(tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT))

    def __enter__(self) -> "_ArchiveWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def folder(self, name: str) -> None:
        if self._tar is not None:
            self._tar.addfile(_tar_info(name, directory=True))
            return
        info = zipfile.ZipInfo(name + "/", _ZIP_TIME)
        info.external_attr = (0o40755 << 16) | 0x10   # Unix mode and the MS-DOS folder flag
        self._zip.writestr(info, b"")

    def file(self, name: str, data: bytes | None = None, stream=None, size: int = 0) -> None:
        """Add `data`, or `size` bytes read from the file object `stream`."""
        size = len(data) if data is not None else size
        if self._tar is not None:
            self._tar.addfile(_tar_info(name, size=size), io.BytesIO(data) if data is not None else stream)
            # The member list would otherwise grow with the archive; we never read it back.
            self._tar.members.clear()
            return
        info = zipfile.ZipInfo(name, _ZIP_TIME)
        info.external_attr = 0o100644 << 16
        info.file_size = size
        if data is not None:
            self._zip.writestr(info, data)
        else:
            with self._zip.open(info, "w") as out:
                shutil.copyfileobj(stream, out)


def _ordered_map(fn: Callable, tasks: Sequence, workers: int) -> Iterator:
    """fn(task) for each task, in order, by `workers` processes with at most 2 * workers tasks
    in flight, so results never pile up in memory when the writer is slower than the renderers."""
    if workers == 1:
        yield from map(fn, tasks)
        return
    # spawn: a parent that imported threaded libraries (TF, gRPC) is not safe to fork.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        todo = iter(tasks)
        pending: collections.deque[Future] = collections.deque()
        for task in todo:
            pending.append(pool.submit(fn, task))
            if len(pending) == 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            task = next(todo, None)
            if task is not None:
                pending.append(pool.submit(fn, task))
            yield result
    finally:
        pool.shutdown(cancel_futures=True)


def _identity_folders(layout: str, identities: int, seed: int) -> list[tuple[str, ...]]:
    """Each identity's folder (path components), in identity order (its sorted names or ids)."""
    top = TOP_FOLDERS[layout]
    if layout == "casia":
        return [(top, name) for name in casia_ids(identities, seed)]
    if layout == "vggface2":
        return [(top, split, name) for split, name in vggface2_ids(identities, seed)]
    names = identity_names(identities, seed)
    if layout == "lfw":
        return [(top, name) for name in names]
    # nested: round-robin over set1..setG, every third identity of a set one level deeper.
    groups = max(2, math.ceil(identities / 50))
    return [(top, f"set{i % groups + 1}", *(("more",) if (i // groups) % 3 == 2 else ()), name)
            for i, name in enumerate(names)]


def _file_names(layout: str, seed: int, index: int, name: str, count: int) -> list[str]:
    """The file names of one identity's `count` images, in image order."""
    if layout == "lfw":
        return [f"{name}_{j + 1:04d}.jpg" for j in range(count)]
    if layout == "casia":
        return [f"{j + 1:03d}.jpg" for j in range(count)]
    if layout == "nested":
        return [f"{j + 1}.jpg" for j in range(count)]
    # VGGFace2: <image id>_<face id>.jpg; image ids increase with gaps, a few images hold a second face.
    rng = _rng(seed, _SEED_FILES, index)
    numbers = np.cumsum(rng.integers(1, 4, count))
    faces = 1 + (rng.random(count) < 0.05)
    return [f"{int(n):04d}_{int(f):02d}.jpg" for n, f in zip(numbers, faces)]


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def generate_demo_archive(out_dir: str | os.PathLike, identities: int = 120, seed: int = 0,
                          lfw_scale: bool = False, image_size: int = LFW_IMAGE_SIZE,
                          workers: int | None = None, *, layout: str = "lfw", archive_format: str = "tgz",
                          counts: str | None = None, casia_scale: bool = False, pool: int | None = None,
                          boxes: bool = True) -> SynthResult:
    """Write an archive of drawn faces, its `.sha256` and (lfw layout) `pairs.txt` into `out_dir`.

    The default is `lfw.tgz`, a gzip tar laid out as LFW's: `lfw/`, `lfw/<Name>/`,
    `lfw/<Name>/<Name>_NNNN.jpg` (1-based, 4 digits), sorted, with fixed
    metadata, so the same seed gives byte-identical output for any `workers`.
    `lfw_scale=True` ignores `identities` and produces LFW's 5,749 people and
    13,233 images with its histogram, and 10 x 300 pairs. Images are rendered
    by `workers` processes (default: all CPUs) and streamed to disk.

    Args:
        layout: `LAYOUTS`: "lfw"; "casia" (`CASIA-WebFace/<7-digit id>/NNN.jpg`);
            "vggface2" (`vggface2/{train,test}/n<6 digits>/NNNN_FF.jpg`, images of
            `vggface2_geometry`'s varying size and aspect, and with `boxes`
            `vggface2/bb_landmark/loose_bb_{train,test}.csv`: NAME_ID,X,Y,W,H);
            "nested" (`faces/set<g>/[more/]<Name>/<n>.jpg`). The archive is named
            after its top folder (`TOP_FOLDERS`), e.g. `CASIA-WebFace.tgz`; only
            lfw gets a pairs.txt (LFW's file names are what pairs refer to).
        archive_format: "tgz", "tar" or "zip" (`ARCHIVE_FORMATS`).
        counts: images per identity: "lfw" (`image_counts`, LFW's shape) or
            "casia" (`casia_counts`); default "casia" with `casia_scale`, else "lfw".
        casia_scale: CASIA-WebFace's size: 10,575 identities and 494,414 images
            (`identities` is ignored); use it with `pool` to be done in minutes.
        pool: render this many faces per identity and derive every image from
            one of them (`derive_face`), ~20x faster at 250 px; None renders each image.
    """
    if not lfw_scale and not casia_scale:
        _check_identities(identities)
    _check_seed(seed)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_int("workers", workers, 1)
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("archive_format", archive_format, ARCHIVE_FORMATS)
    if lfw_scale and casia_scale:
        raise InputError("lfw_scale and casia_scale exclude each other; choose one size")
    counts = counts or ("casia" if casia_scale else "lfw")
    _check_choice("counts", counts, COUNT_SHAPES)
    if (lfw_scale and counts != "lfw") or (casia_scale and counts != "casia"):
        raise InputError(f"counts {counts!r} contradicts {'lfw' if lfw_scale else 'casia'}_scale, "
                         f"which sets the counts' shape")
    if pool is not None:
        _check_int("pool", pool, 1)
    out_dir = Path(out_dir)
    n = LFW_IDENTITIES if lfw_scale else CASIA_IDENTITIES if casia_scale else int(identities)

    folders = _identity_folders(layout, n, seed)
    per_identity = image_counts(n, seed) if counts == "lfw" else casia_counts(n, seed)
    total = sum(per_identity)
    order = sorted(range(n), key=lambda i: folders[i])
    style = "vggface2" if layout == "vggface2" else "square"
    step = max(per_identity) if pool else _IMAGES_PER_TASK   # a pool is rendered once per task
    tasks = [_Task(seed, i, start, min(start + step, per_identity[i]), image_size, style, pool or 0)
             for i in order for start in range(0, per_identity[i], step)]
    workers = min(workers, len(tasks))
    log.info("synth: %s layout, %d identities, %d images at %s px, seed %d, %s, %d worker(s) -> %s",
             layout, n, total, f"{image_size}x{image_size}" if style == "square" else "varying", seed,
             f"{pool} rendered faces per identity" if pool else "every face rendered", workers, out_dir)

    top = TOP_FOLDERS[layout]
    archive = out_dir / f"{top}.{archive_format}"
    box_rows: dict[str, tempfile.SpooledTemporaryFile] = {}
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(atomic_file(archive, "wb"))
        writer = stack.enter_context(_ArchiveWriter(handle, archive_format, f"{top}.tar"))
        progress = stack.enter_context(Progress("synth: render faces", total=total, unit="images"))
        results = stack.enter_context(contextlib.closing(_ordered_map(_render_task, tasks, workers)))
        written: set[tuple] = set()
        names: list[str] = []
        for task, jpegs in zip(tasks, results):
            folder = folders[task.index]
            for depth in range(1, len(folder) + 1):
                if folder[:depth] not in written:
                    written.add(folder[:depth])
                    writer.folder("/".join(folder[:depth]))
            if task.start == 0:
                names = _file_names(layout, seed, task.index, folder[-1], per_identity[task.index])
            for j, data in enumerate(jpegs, task.start):
                writer.file("/".join(folder) + "/" + names[j], data)
                if layout == "vggface2" and boxes:
                    if folder[1] not in box_rows:
                        box_rows[folder[1]] = stack.enter_context(tempfile.SpooledTemporaryFile(16 << 20))
                        box_rows[folder[1]].write(b"NAME_ID,X,Y,W,H\n")
                    x, y, w, h = vggface2_geometry(seed, task.index, j, image_size).box
                    box_rows[folder[1]].write(f'"{folder[-1]}/{names[j].rsplit(".", 1)[0]}",{x},{y},{w},{h}\n'
                                              .encode())
            progress.update(len(jpegs))
        if box_rows:
            writer.folder(f"{top}/bb_landmark")
        for split, rows in sorted(box_rows.items()):
            size = rows.tell()
            rows.seek(0)
            writer.file(f"{top}/bb_landmark/loose_bb_{split}.csv", stream=rows, size=size)
    sha256 = file_sha256(archive)
    write_text(out_dir / f"{archive.name}.sha256", f"{sha256}  {archive.name}\n")

    pairs_path = None
    if layout == "lfw":
        pairs_path = out_dir / "pairs.txt"
        pairs = make_pairs([folder[-1] for folder in folders], per_identity, seed)
        write_text(pairs_path, pairs.to_text())
        log.info("synth: wrote %s (sha256 %s) and %s (%d folds x %d pairs per class)",
                 archive, sha256, pairs_path, pairs.folds, pairs.per_fold)
    else:
        log.info("synth: wrote %s (sha256 %s)", archive, sha256)
    return SynthResult(archive=archive, pairs=pairs_path, sha256=sha256, identities=n, images=total,
                       layout=layout)
