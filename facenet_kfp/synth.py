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

Each identity is a fixed set of facial parameters (face shape, skin, hair,
eyes, brows, nose, mouth, glasses, beard) drawn from its own seeded RNG. Each
image re-draws everything that is *not* identity: pose (rotation, shift, scale,
yaw), expression, lighting, background, clothes, blur and JPEG quality. The
background and clothes never depend on the identity, so a network can only
tell people apart by their faces.

Determinism: every random choice comes from `numpy.random.SeedSequence` keyed
by `(seed, domain, ...)`, e.g. image `j` of identity `i` uses
`(seed, _SEED_IMAGE, i, j)`. The archive bytes therefore depend on the seed
only, not on the number of worker processes; tar metadata and the gzip header
are fixed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
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
from PIL import Image, ImageDraw, ImageFilter

from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import atomic_file, file_sha256, write_text
from facenet_kfp.progress import Progress

log = logging.getLogger(__name__)

# --- LFW facts (from LFW's published statistics) -------------------------------------------------------------
LFW_IDENTITIES = 5749
LFW_IMAGES = 13233
LFW_LARGEST = 530                       # George_W_Bush
# Images-per-person bins as LFW's statistics report them; None = open-ended.
COUNT_BINS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 2), (3, 5), (6, 7), (8, 20), (21, None))
LFW_BIN_PEOPLE = (4069, 779, 590, 94, 160, 57)

# --- demo shape ---------------------------------------------------------------------------
# At small sizes LFW's shape (71% singletons, 2.3 images per person) leaves too little to
# train on, so the demo uses this shape at <= DEMO_REFERENCE_IDENTITIES and slides
# log-linearly to LFW's exact shape at LFW_IDENTITIES.
DEMO_REFERENCE_IDENTITIES = 120
DEMO_BIN_FRACTIONS = (0.34, 0.10, 0.20, 0.10, 0.20, 0.06)   # people per bin, sums to 1
DEMO_MEAN_IMAGES = 6.0                                        # images per person
DEMO_LARGEST = 40                                             # images of the largest identity
MIN_PAIRED = 10       # at least min(MIN_PAIRED, N // 2) identities get >= 2 images (pairs, val/test)
MIN_TRAINABLE = 8     # at least min(MIN_TRAINABLE, N // 2) get >= 6 images (a P x K batch, K = 4)
# Within a bin, P(k) ~ k^-alpha: LFW's per-count frequencies fall off roughly as a power law.
# With these exponents the expected LFW-sized total is 13,229, so the final nudge is small.
BIN_ALPHA = 2.0
TAIL_ALPHA = 2.8

MIN_IDENTITIES = 10
MIN_IMAGE_SIZE = 64
LFW_IMAGE_SIZE = 250
PAIR_FOLDS = 10
MAX_PAIRS_PER_FOLD = 300                # LFW View 2: 10 folds x 300 matched + 300 mismatched

# --- CASIA-WebFace and VGGFace2 facts ------------------------------------------------------
CASIA_IDENTITIES = 10_575
CASIA_IMAGES = 494_414
CASIA_MIN_IMAGES = 2                    # every identity can form a matched pair
# Images per identity: 2 + a share of the rest proportional to a lognormal(0, sigma) weight,
# capped at _CASIA_CAP x its median: a long tail whose largest identity has ~750 images at full
# scale (an approximation of CASIA-WebFace's shape, whose totals it matches exactly).
_CASIA_SIGMA = 0.9
_CASIA_CAP = 25.0
VGGFACE2_IDENTITIES = 9_131
VGGFACE2_TEST_IDENTITIES = 500          # the test split; train and test identities are disjoint
_VGGFACE2_LARGEST_ID = 9_294            # ids are drawn from n000001..n009294, so they have gaps
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

# SeedSequence domains, so that streams for different purposes never coincide.
_SEED_COUNTS, _SEED_NAMES, _SEED_IDENTITY, _SEED_IMAGE, _SEED_PAIRS = 1, 2, 3, 4, 5
_SEED_FOLDERS, _SEED_FILES, _SEED_VARIANT, _SEED_GEOMETRY, _SEED_POOL = 6, 7, 8, 9, 10

# Fixed tar metadata: 2008-01-01 00:00 UTC, the year LFW was published.
_TAR_MTIME = 1_199_145_600
_IMAGES_PER_TASK = 32                   # rendering work unit: balances load on large identities
_SUPERSAMPLE = 2                        # faces are drawn at 2x and reduced: anti-aliased edges

_FIRST_NAMES = (
    "Aaron", "Abigail", "Adrian", "Aisha", "Alan", "Alba", "Alice", "Amara", "Andre", "Anita",
    "Arjun", "Astrid", "Beatriz", "Benedict", "Bianca", "Boris", "Bruno", "Camille", "Carlos",
    "Carmen", "Chen", "Chloe", "Clara", "Daniel", "Dara", "David", "Diego", "Dmitri", "Elena",
    "Elias", "Emma", "Erik", "Esther", "Fatima", "Felix", "Fiona", "Gabriel", "Greta", "Hana",
    "Hannah", "Hassan", "Helen", "Hugo", "Igor", "Ines", "Irene", "Isaac", "Ivan", "Jack",
    "Jamal", "Jana", "Javier", "Jean", "Julia", "Kai", "Karim", "Kenji", "Laila", "Lars",
    "Laura", "Leon", "Lina", "Lucas", "Lucia", "Maria", "Marek", "Marta", "Mateo", "Maya",
    "Mei", "Miguel", "Mira", "Nadia", "Naomi", "Nikolai", "Nina", "Noah", "Olga", "Omar",
    "Oscar", "Paolo", "Petra", "Priya", "Rafael", "Rahul", "Rosa", "Ruth", "Samir", "Sara",
    "Sofia", "Stefan", "Tariq", "Teresa", "Thomas", "Tomas", "Ursula", "Vera", "Victor",
    "Wei", "Yara", "Yusuf", "Zara",
)
_SURNAME_STARTS = (
    "Al", "Bar", "Bel", "Bran", "Car", "Cor", "Dal", "Dor", "El", "Fair", "Fen", "Gar", "Gold",
    "Hal", "Har", "Hol", "Kel", "Kin", "Lan", "Lind", "Mar", "Mel", "Mor", "Nor", "Oak", "Pen",
    "Ral", "Ren", "Ros", "Sal", "Sand", "Ster", "Tal", "Thorn", "Val", "Ver", "Wal", "West",
    "Win", "Yar",
)
_SURNAME_ENDS = (
    "berg", "bury", "by", "dale", "den", "er", "field", "ford", "gate", "ham", "hart", "ley",
    "lin", "low", "man", "mont", "more", "ney", "ova", "rich", "ridge", "sen", "son", "stead",
    "ston", "ton", "vale", "well", "wick", "win", "wood", "worth", "ez", "ini", "ski", "etti",
    "ander", "ens", "ino", "ard",
)


@dataclass(frozen=True)
class SynthResult:
    """What `generate_demo_archive` wrote."""
    archive: Path        # out_dir / "lfw.tgz" (the layout's top folder and the format's suffix)
    pairs: Path | None   # out_dir / "pairs.txt"; None for layouts other than lfw
    sha256: str          # hex sha256 of the archive; also in out_dir / "<archive name>.sha256"
    identities: int
    images: int
    layout: str = "lfw"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")


def _check_identities(identities: int) -> None:
    if isinstance(identities, bool) or not isinstance(identities, (int, np.integer)) \
            or identities < MIN_IDENTITIES:
        raise InputError(f"identities must be an integer >= {MIN_IDENTITIES}, got {identities!r}")


# --- images per identity --------------------------------------------------------------------

def _largest_remainder(values: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative `values` to integers summing to `total` (Hamilton's method)."""
    floors = np.floor(values).astype(np.int64)
    short = total - int(floors.sum())
    # Stable sort: ties go to the earlier bin, so the result is deterministic.
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:short]] += 1
    return floors


def _bin_people(identities: int, lfw_weight: float) -> np.ndarray:
    """People per COUNT_BINS bin: the blended shape rounded to `identities`, floors applied."""
    lfw_fractions = np.array(LFW_BIN_PEOPLE, dtype=np.float64) / LFW_IDENTITIES
    fractions = (1.0 - lfw_weight) * np.array(DEMO_BIN_FRACTIONS) + lfw_weight * lfw_fractions
    people = _largest_remainder(identities * fractions, identities)
    # Floors for tiny N, where rounding can leave too few identities to train or pair.
    need_trainable = min(MIN_TRAINABLE, identities // 2)
    while people[3:].sum() < need_trainable:
        donor = int(np.flatnonzero(people[:3])[0])
        people[donor] -= 1
        people[3] += 1
    need_paired = min(MIN_PAIRED, identities // 2)
    while people[1:].sum() < need_paired:
        people[0] -= 1
        people[1] += 1
    return people


def _power_law_draw(rng: np.random.Generator, low: int, high: int, alpha: float, n: int) -> np.ndarray:
    """`n` integers in [low, high] with P(k) ~ k^-alpha, stratified: one per CDF quantile band.

    Stratifying (u_i = (i + U(0, 1)) / n) keeps the sum close to its expectation, so a
    heavy tail cannot throw the total off and force a large correction.
    """
    values = np.arange(low, high + 1)
    cdf = np.cumsum(values.astype(np.float64) ** -alpha)
    cdf /= cdf[-1]
    quantiles = (np.arange(n) + rng.uniform(size=n)) / n
    return values[np.minimum(np.searchsorted(cdf, quantiles), len(values) - 1)]


def image_counts(identities: int, seed: int) -> list[int]:
    """Images per identity (a list of `identities` ints >= 1, in identity order) with LFW's shape.

    Bins of COUNT_BINS get their people from a blend of the demo shape
    (DEMO_BIN_FRACTIONS, about a third singletons) and LFW's bins, with LFW weight
    w = clip(log(N / 120) / log(5749 / 120), 0, 1). The total is
    round(N * ((1 - w) * 6.0 + w * 13233 / 5749)) images and the largest identity
    has round(40^(1 - w) * 530^w) images. Within a bin counts follow P(k) ~ k^-alpha
    and are then nudged (+-1, bigger identities more often) to hit the total.
    At N = 5,749 this is LFW's histogram exactly: 13,233 images, largest 530.
    """
    _check_identities(identities)
    _check_seed(seed)
    rng = _rng(seed, _SEED_COUNTS)
    weight = float(np.clip(math.log(identities / DEMO_REFERENCE_IDENTITIES)
                           / math.log(LFW_IDENTITIES / DEMO_REFERENCE_IDENTITIES), 0.0, 1.0))
    people = _bin_people(identities, weight)
    largest = round(math.exp((1 - weight) * math.log(DEMO_LARGEST) + weight * math.log(LFW_LARGEST)))
    target = round(identities * ((1 - weight) * DEMO_MEAN_IMAGES + weight * LFW_IMAGES / LFW_IDENTITIES))

    counts, lows, highs = [], [], []
    for (low, high), n in zip(COUNT_BINS, people):
        n = int(n)
        if n == 0:
            continue
        if high is None:
            # The tail holds the single largest identity; the others fall below it.
            high = largest - 1
            counts.append(np.array([largest]))
            lows.append(np.array([largest]))
            highs.append(np.array([largest]))
            n -= 1
            alpha = TAIL_ALPHA
        else:
            alpha = BIN_ALPHA
        counts.append(_power_law_draw(rng, low, high, alpha, n))
        lows.append(np.full(n, low))
        highs.append(np.full(n, high))
    count = np.concatenate(counts).astype(np.int64)
    low = np.concatenate(lows)
    high = np.concatenate(highs)
    # Tiny N can make the target unreachable inside the bins; the bins win.
    target = int(np.clip(target, low.sum(), high.sum()))

    while (diff := target - int(count.sum())) != 0:
        step = 1 if diff > 0 else -1
        movable = np.flatnonzero(count < high) if step > 0 else np.flatnonzero(count > low)
        take = min(abs(diff), movable.size)
        # Weight by size so the adjustment scales the distribution instead of flattening it.
        weights = count[movable].astype(np.float64)
        chosen = rng.choice(movable, size=take, replace=False, p=weights / weights.sum())
        count[chosen] += step
    return [int(c) for c in rng.permutation(count)]


def casia_counts(identities: int, seed: int) -> list[int]:
    """Images per identity (`identities` ints, in identity order) with CASIA-WebFace's mean.

    The total is round(N * 494414 / 10575) images (494,414 at N = 10,575). Each
    identity gets `CASIA_MIN_IMAGES` plus a share of the rest proportional to a
    weight w ~ lognormal(0, 0.9) capped at 25 (times the median weight, 1),
    shares rounded by largest remainder: median ~32, largest ~750 at full scale.
    """
    _check_identities(identities)
    _check_seed(seed)
    rng = _rng(seed, _SEED_COUNTS, 1)
    total = round(identities * CASIA_IMAGES / CASIA_IDENTITIES)
    rest = total - CASIA_MIN_IMAGES * identities
    weights = np.minimum(rng.lognormal(0.0, _CASIA_SIGMA, identities), _CASIA_CAP)
    return [CASIA_MIN_IMAGES + int(c) for c in _largest_remainder(weights * (rest / weights.sum()), rest)]


# --- names -----------------------------------------------------------------------------------

def identity_names(identities: int, seed: int) -> list[str]:
    """`identities` unique `First_Last` names from fixed lists, sorted (the identity order)."""
    _check_identities(identities)
    _check_seed(seed)
    capacity = len(_FIRST_NAMES) * len(_SURNAME_STARTS) * len(_SURNAME_ENDS)
    if identities > capacity // 4:
        # Rejection sampling slows down near capacity; far more than LFW needs anyway.
        raise InputError(f"identities must be <= {capacity // 4} for unique names, got {identities}")
    rng = _rng(seed, _SEED_NAMES)
    names: set[str] = set()
    while len(names) < identities:
        first = _FIRST_NAMES[rng.integers(len(_FIRST_NAMES))]
        last = _SURNAME_STARTS[rng.integers(len(_SURNAME_STARTS))] \
            + _SURNAME_ENDS[rng.integers(len(_SURNAME_ENDS))]
        names.add(f"{first}_{last}")
    return sorted(names)


def casia_ids(identities: int, seed: int) -> list[str]:
    """`identities` distinct sorted 7-digit ids (CASIA-WebFace's folder names, e.g. "0000045")."""
    _check_identities(identities)
    _check_seed(seed)
    ids = _rng(seed, _SEED_NAMES, 1).choice(10**7 - 1, size=identities, replace=False) + 1
    return [f"{int(v):07d}" for v in np.sort(ids)]


def vggface2_ids(identities: int, seed: int) -> list[tuple[str, str]]:
    """`identities` (split, id) of VGGFace2's form, sorted by id: ids "n000002" drawn from
    n000001..n009294 (more when needed), about 500 / 9131 of them in "test", the rest in
    "train" (both splits non-empty)."""
    _check_identities(identities)
    _check_seed(seed)
    rng = _rng(seed, _SEED_NAMES, 2)
    ids = np.sort(rng.choice(max(_VGGFACE2_LARGEST_ID, 2 * identities), size=identities, replace=False) + 1)
    test = rng.random(identities) < VGGFACE2_TEST_IDENTITIES / VGGFACE2_IDENTITIES
    if not test.any():
        test[int(rng.integers(identities))] = True
    if test.all():
        test[0] = False
    return [("test" if t else "train", f"n{int(v):06d}") for t, v in zip(test, ids)]


# --- faces -----------------------------------------------------------------------------------

_SKIN_ANCHORS = np.array([(255, 226, 204), (241, 196, 160), (224, 170, 125), (198, 134, 90),
                          (160, 100, 62), (120, 74, 46), (84, 52, 34)], dtype=np.float64)
_HAIR_COLOURS = {"black": (24, 20, 20), "dark_brown": (58, 38, 28), "brown": (105, 70, 42),
                 "auburn": (140, 62, 32), "red": (178, 82, 40), "blonde": (222, 190, 118),
                 "ash": (176, 160, 128), "grey": (148, 148, 146), "white": (228, 226, 218)}
_EYE_COLOURS = ((78, 48, 28), (40, 26, 20), (66, 112, 170), (76, 124, 78), (116, 126, 138),
                (128, 96, 48))
_FRAME_COLOURS = ((20, 20, 20), (92, 58, 30), (186, 186, 196), (170, 30, 40), (30, 60, 150))
HAIR_STYLES = ("short", "side_part", "long", "curly", "afro", "bald", "buzz")
BEARDS = ("none", "moustache", "goatee", "full")


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed look of one synthetic person.

    Lengths are pixels of a 250-px image (scaled for other sizes), positions are
    relative to the face centre with y pointing down; colours are RGB 0-255.
    """
    face_rx: float               # half width of the face outline
    face_ry: float               # half height
    squareness: float            # superellipse exponent: 2 = ellipse, 3 = boxy
    chin_taper: float            # narrowing of the lower face towards the chin
    skin: tuple[int, int, int]
    hair_colour: tuple[int, int, int]
    hair_style: str              # one of HAIR_STYLES
    hair_volume: float           # hair thickness beyond the outline
    hairline: float              # hairline height above the centre, fraction of face_ry
    hairline_recede: float       # how much the hairline rises at the temples
    hair_part: float             # hairline tilt (side parting), -1..1
    eye_y: float                 # eye line above the centre, fraction of face_ry
    eye_spacing: float           # eye centre offset from the midline, fraction of face_rx
    eye_w: float                 # eye half width
    eye_h: float                 # eye half height when fully open
    iris_colour: tuple[int, int, int]
    brow_thickness: float
    brow_arch: float             # rise of the brow middle
    brow_tilt: float             # inner end lower (+) or higher (-)
    brow_gap: float              # gap between eye top and brow
    nose_length: float           # eye line to nose base, fraction of face_ry
    nose_width: float
    mouth_width: float           # fraction of face_rx
    lip_thickness: float
    lip_colour: tuple[int, int, int]
    ear_size: float              # fraction of face_ry
    beard: str                   # one of BEARDS
    glasses: tuple[int, int, int] | None   # frame colour; None = no glasses
    glasses_round: bool
    blush: float                 # cheek redness alpha, 0..1
    moles: tuple[tuple[float, float], ...]   # positions (fractions of rx, ry)


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw one identity's fixed facial parameters from `rng`."""
    tone = rng.uniform(0, len(_SKIN_ANCHORS) - 1)
    base = int(tone)
    frac = tone - base
    skin = (1 - frac) * _SKIN_ANCHORS[base] + frac * _SKIN_ANCHORS[min(base + 1, len(_SKIN_ANCHORS) - 1)]
    skin = np.clip(skin + rng.normal(0, 9, 3), 0, 255)
    # Darker skin goes with darker hair more often, as in the population LFW samples.
    hair_names = list(_HAIR_COLOURS)
    weights = np.array([3, 3, 2, 1, 0.6, 1.2, 0.8, 1.2, 0.5]) if tone < 2.5 else \
        np.array([6, 3, 1, 0.3, 0.1, 0.1, 0.1, 0.8, 0.4])
    hair_name = hair_names[rng.choice(len(hair_names), p=weights / weights.sum())]
    hair = np.clip(np.array(_HAIR_COLOURS[hair_name]) + rng.normal(0, 14, 3), 0, 255)
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=[0.26, 0.16, 0.18, 0.1, 0.08, 0.1, 0.12])]
    beard = BEARDS[rng.choice(len(BEARDS), p=[0.62, 0.14, 0.1, 0.14])]
    lip = np.clip(skin * np.array([0.86, 0.58, 0.58]) + np.array([28, 0, 4]), 0, 255)
    glasses = _FRAME_COLOURS[rng.integers(len(_FRAME_COLOURS))] if rng.random() < 0.3 else None
    moles = tuple((float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.1, 0.6)))
                  for _ in range(rng.choice(3, p=[0.6, 0.3, 0.1])))
    return FaceIdentity(
        face_rx=float(rng.uniform(42, 58)),
        face_ry=float(rng.uniform(54, 70)),
        squareness=float(rng.uniform(1.9, 3.0)),
        chin_taper=float(rng.uniform(0.0, 0.3)),
        skin=_rgb(skin),
        hair_colour=_rgb(hair),
        hair_style=style,
        hair_volume=float(rng.uniform(4, 16)),
        hairline=float(rng.uniform(0.42, 0.72)),
        hairline_recede=float(rng.uniform(0.0, 0.35)),
        hair_part=float(rng.uniform(-1, 1)),
        eye_y=float(rng.uniform(0.06, 0.22)),
        eye_spacing=float(rng.uniform(0.34, 0.48)),
        eye_w=float(rng.uniform(7.5, 12.5)),
        eye_h=float(rng.uniform(3.2, 5.2)),
        iris_colour=_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))],
        brow_thickness=float(rng.uniform(2.0, 6.0)),
        brow_arch=float(rng.uniform(0.0, 5.0)),
        brow_tilt=float(rng.uniform(-3.0, 3.0)),
        brow_gap=float(rng.uniform(3.0, 8.0)),
        nose_length=float(rng.uniform(0.36, 0.56)),
        nose_width=float(rng.uniform(7.0, 13.0)),
        mouth_width=float(rng.uniform(0.38, 0.62)),
        lip_thickness=float(rng.uniform(2.0, 5.0)),
        lip_colour=_rgb(lip),
        ear_size=float(rng.uniform(0.22, 0.32)),
        beard=beard,
        glasses=glasses,
        glasses_round=bool(rng.random() < 0.5),
        blush=float(rng.uniform(0.0, 0.35)),
        moles=moles,
    )


def identity_params(seed: int, identity_index: int) -> FaceIdentity:
    """The fixed parameters of identity `identity_index` (position in sorted name order)."""
    return sample_identity(_rng(seed, _SEED_IDENTITY, identity_index))


def _rgb(colour: Sequence[float], alpha: int | None = None) -> tuple[int, ...]:
    rgb = tuple(int(round(float(c))) for c in colour[:3])
    return rgb if alpha is None else (*rgb, alpha)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, ...]:
    """(1 - t) * a + t * b, as an RGB tuple."""
    return _rgb((1 - t) * np.array(a[:3], dtype=np.float64) + t * np.array(b[:3], dtype=np.float64))


def _shade(colour: Sequence[float], factor: float, alpha: int | None = None) -> tuple[int, ...]:
    return _rgb(np.clip(np.array(colour[:3], dtype=np.float64) * factor, 0, 255), alpha)


def _outline(rx: float, ry: float, squareness: float, taper: float, n: int = 72) -> np.ndarray:
    """Face outline, (n, 2) points clockwise from the right: a superellipse narrowed below the centre.

    x = rx * sgn(cos t) |cos t|^(2/p), y = ry * sgn(sin t) |sin t|^(2/p), then
    x *= 1 - taper * (y / ry)^2 for y > 0 (the jaw narrows towards the chin).
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e = 2.0 / squareness
    x = rx * np.sign(np.cos(t)) * np.abs(np.cos(t)) ** e
    y = ry * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** e
    lower = y > 0
    x[lower] *= 1 - taper * (y[lower] / ry) ** 2
    return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class Variation:
    """Ranges of the per-image, identity-independent variation (lengths in px of a 250 image)."""
    rotation_deg: float = 7.0                  # in-plane rotation, uniform +-
    shift_px: float = 5.0                      # face centre shift per axis, uniform +-
    scale: tuple[float, float] = (0.9, 1.1)    # face scale
    yaw_squash: float = 0.1                    # width x (1 - yaw_squash * |yaw|), yaw in -1..1
    # Lighting is kept moderate: stronger gain and cast swamp skin tone, the most
    # salient identity cue, and cut a small CNN's held-out verification accuracy
    # from ~0.90 to ~0.83 in a test with 120 identities.
    gain: tuple[float, float] = (0.88, 1.12)   # overall brightness factor
    cast_sigma: float = 0.03                   # per-channel colour cast, N(1, sigma)
    gradient: float = 0.2                      # light falloff across the image, up to +-
    contrast: tuple[float, float] = (0.9, 1.1)
    noise_sigma: float = 6.0                   # luminance noise, sigma uniform in [0, this]
    blur_probability: float = 0.3              # Gaussian blur of radius 0.3-1.1 px
    jpeg_quality: tuple[int, int] = (60, 95)   # inclusive


DEFAULT_VARIATION = Variation()


@dataclass(frozen=True)
class _Expression:
    """Per-image, identity-independent variation drawn into the face layer."""
    yaw: float           # -1..1: inner features shift towards the turned side
    smile: float         # -0.4..1: mouth-corner lift
    mouth_open: float    # px
    brow_raise: float    # px
    eye_open: float      # 0..1 of eye_h
    gaze: tuple[float, float]
    clothes: tuple[int, int, int]
    collar: tuple[int, int, int]


def _sample_expression(rng: np.random.Generator) -> _Expression:
    blink = rng.random() < 0.06
    return _Expression(
        yaw=float(rng.uniform(-1, 1)),
        smile=float(rng.uniform(-0.4, 1.0)),
        mouth_open=float(rng.uniform(2, 7)) if rng.random() < 0.25 else 0.0,
        brow_raise=float(rng.uniform(-2, 4)),
        eye_open=float(rng.uniform(0.1, 0.3)) if blink else float(rng.uniform(0.6, 1.0)),
        gaze=(float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-0.8, 0.8))),
        clothes=_rgb(rng.integers(0, 256, 3)),
        collar=_rgb(rng.integers(0, 256, 3)),
    )


def _draw_head(face: FaceIdentity, expr: _Expression, canvas: int) -> Image.Image:
    """The person in canonical pose on a transparent (canvas, canvas) RGBA layer."""
    # Extra rows below, so rotating and shrinking the layer never lifts the bottom edge of
    # the shoulders into view.
    layer = Image.new("RGBA", (canvas, canvas + canvas // 4), (0, 0, 0, 0))
    # Every fill is opaque: drawing a translucent fill onto an RGBA layer replaces the
    # layer's alpha (it does not blend), which would punch holes showing the background.
    draw = ImageDraw.Draw(layer)
    # Canvas px per unit of FaceIdentity lengths: faces are drawn 10% larger than the
    # units say, so the face fills a 60% centre crop about as much as in LFW.
    k = canvas / LFW_IMAGE_SIZE * 1.1
    cx, cy = canvas / 2, canvas / 2 + 6 * k        # LFW faces sit slightly below the centre

    def pts(points) -> list[tuple[float, float]]:
        return [(cx + float(x) * k, cy + float(y) * k) for x, y in points]

    def box(x0, y0, x1, y1) -> list[float]:
        return [cx + x0 * k, cy + y0 * k, cx + x1 * k, cy + y1 * k]

    rx, ry = face.face_rx, face.face_ry
    skin = face.skin
    hair = face.hair_colour
    if face.hair_style == "buzz":
        hair = _mix(hair, skin, 0.45)
    shift = expr.yaw * 0.12 * rx                   # inner features move with head yaw
    outline = _outline(rx, ry, face.squareness, face.chin_taper)

    # Shoulders and neck: clothes are per image so they carry no identity.
    draw.ellipse(box(-118, ry + 28, 118, ry + 170), fill=expr.clothes)
    draw.polygon(pts([(-0.3 * rx, ry + 22), (0, ry + 48), (0.3 * rx, ry + 22)]), fill=expr.collar)
    draw.rectangle(box(-0.42 * rx, 0.3 * ry, 0.42 * rx, ry + 30), fill=_shade(skin, 0.86))
    draw.polygon(pts([(-0.3 * rx, ry + 26), (0, ry + 42), (0.3 * rx, ry + 26)]), fill=_shade(skin, 0.86))

    # Hair behind the head.
    vol = face.hair_volume + (14 if face.hair_style == "afro" else 0)
    if face.hair_style == "long":
        draw.rounded_rectangle(box(-(rx + vol), -0.4 * ry, rx + vol, ry * 1.35), radius=24 * k, fill=hair)
    if face.hair_style != "bald":
        back = _outline(rx + vol, ry + vol, face.squareness, 0.0)
        back[:, 1] -= vol * 0.5
        cut = 0.15 * ry if face.hair_style != "buzz" else -0.2 * ry
        back = back[back[:, 1] <= cut]
        if face.hair_style in ("curly", "afro"):
            for x, y in back[::2]:
                r = vol * 0.9 + 3
                draw.ellipse(box(x - r, y - r, x + r, y + r), fill=hair)
        draw.polygon(pts(back), fill=hair)
    else:
        # A fringe of hair around the back of the head, at ear height only.
        side = _outline(rx + 4, ry + 4, face.squareness, 0.0)
        side = side[(side[:, 1] > -0.4 * ry) & (side[:, 1] < 0.15 * ry)]
        for sign in (-1, 1):
            part = side[side[:, 0] * sign > 0]
            draw.polygon(pts(np.vstack([part, [[0.7 * sign * rx, 0.0]]])), fill=hair)

    # Ears, then the face.
    ear_w, ear_h = 0.2 * rx, face.ear_size * ry
    for sign in (-1, 1):
        ex = sign * (rx * 0.96) - shift * 0.3
        draw.ellipse(box(ex - ear_w, 0.05 * ry - ear_h, ex + ear_w, 0.05 * ry + ear_h), fill=_shade(skin, 0.93))
        draw.ellipse(box(ex - ear_w * 0.45, 0.05 * ry - ear_h * 0.6, ex + ear_w * 0.45, 0.05 * ry + ear_h * 0.6),
                     fill=_shade(skin, 0.78))
    draw.polygon(pts(outline), fill=skin)

    # Hair over the forehead: outline above the temples closed by the hairline curve.
    if face.hair_style not in ("bald",):
        temple = -0.22 * ry
        top = outline[outline[:, 1] < temple]
        # Order left -> over the top -> right so the hairline closes the polygon.
        top = top[np.argsort(np.arctan2(top[:, 1], top[:, 0]))]
        xs = np.linspace(top[-1, 0], top[0, 0], 24)
        line_y = -face.hairline * ry - face.hairline_recede * ry * (xs / rx) ** 2 \
            + face.hair_part * 0.12 * xs
        fringe = np.vstack([top * [1.02, 1.02], np.stack([xs, np.minimum(line_y, temple)], axis=1)])
        if face.hair_style in ("curly", "afro"):
            for x, y in fringe[len(top):][::2]:
                r = 5.0
                draw.ellipse(box(x - r, y - r, x + r, y + r), fill=hair)
        draw.polygon(pts(fringe), fill=hair)

    # Cheeks and moles.
    if face.blush > 0.02:
        for sign in (-1, 1):
            bx = sign * 0.52 * rx + shift
            draw.ellipse(box(bx - 0.2 * rx, 0.12 * ry, bx + 0.2 * rx, 0.34 * ry),
                         fill=_mix(skin, (214, 96, 96), face.blush * 0.5))
    for mx, my in face.moles:
        px, py = mx * rx + shift, my * ry
        draw.ellipse(box(px - 1.6, py - 1.6, px + 1.6, py + 1.6), fill=_shade(skin, 0.45))

    # Beard (under the mouth), drawn semi-opaque so the jaw line shows through.
    eye_line = -face.eye_y * ry
    nose_base = eye_line + face.nose_length * ry
    mouth_y = nose_base + (ry - nose_base) * 0.4
    beard_fill = _mix(hair, skin, 0.12)
    if face.beard == "full":
        # Jaw from the right ear round the chin to the left ear (atan2 runs 0 -> pi for y >= 0),
        # closed by a line over the cheeks and the upper lip.
        jaw = outline[outline[:, 1] >= 0]
        jaw = jaw[np.argsort(np.arctan2(jaw[:, 1], jaw[:, 0]))]
        inner = [(-0.97 * rx, 0.0), (-0.6 * rx, mouth_y - 14), (-0.25 * rx + shift, mouth_y - 10),
                 (0.25 * rx + shift, mouth_y - 10), (0.6 * rx, mouth_y - 14), (0.97 * rx, 0.0)]
        draw.polygon(pts(np.vstack([jaw, np.array(inner)])), fill=beard_fill)
    if face.beard == "goatee":
        draw.ellipse(box(-0.3 * rx + shift, mouth_y + 2, 0.3 * rx + shift, ry + 2), fill=beard_fill)
    if face.beard in ("moustache", "full", "goatee"):
        half = face.mouth_width * rx * 0.55
        draw.polygon(pts([(shift - half, mouth_y - 1), (shift - 0.6 * half, mouth_y - 10),
                          (shift + 0.6 * half, mouth_y - 10), (shift + half, mouth_y - 1),
                          (shift, mouth_y - 5)]), fill=beard_fill)

    # Eyes.
    for sign in (-1, 1):
        ex = sign * face.eye_spacing * rx + shift
        w = face.eye_w * (1 - 0.12 * expr.yaw * sign)
        h = max(face.eye_h * expr.eye_open, 0.6)
        draw.ellipse(box(ex - w - 2, eye_line - face.eye_h - 2, ex + w + 2, eye_line + face.eye_h + 2),
                     fill=_shade(skin, 0.88))            # eye socket shadow
        draw.ellipse(box(ex - w, eye_line - h, ex + w, eye_line + h), fill=(244, 242, 236))
        iris = min(face.eye_h * 0.85, h)
        gx, gy = ex + expr.gaze[0], eye_line + expr.gaze[1] * 0.5
        draw.ellipse(box(gx - iris, gy - iris, gx + iris, gy + iris), fill=face.iris_colour)
        pupil = iris * 0.45
        draw.ellipse(box(gx - pupil, gy - pupil, gx + pupil, gy + pupil), fill=(12, 10, 10))
        lid = [(ex + u * w, eye_line - h * math.sqrt(max(1 - u * u, 0.0))) for u in np.linspace(-1, 1, 9)]
        draw.line(pts(lid), fill=_shade(skin, 0.35), width=max(1, round(1.6 * k)), joint="curve")

        # Brow: a quadratic from the inner to the outer end.
        inner_x, outer_x = ex - sign * 0.55 * w, ex + sign * 1.05 * w
        base_y = eye_line - face.eye_h - face.brow_gap - expr.brow_raise
        brow = []
        for u in np.linspace(0, 1, 7):
            x = inner_x + (outer_x - inner_x) * u
            y = base_y + face.brow_tilt * (1 - u) - face.brow_arch * 4 * u * (1 - u)
            brow.append((x, y))
        draw.line(pts(brow), fill=_shade(hair, 0.85) if face.hair_style != "bald" else _shade(skin, 0.45),
                  width=max(1, round(face.brow_thickness * k)), joint="curve")

    # Nose: a shaded bridge and a base with nostrils; it protrudes, so it moves most with yaw.
    nx = shift * 1.3
    nw = face.nose_width
    draw.line(pts([(nx - 0.2 * nw, eye_line + 4), (nx + 0.25 * nw * (1 if expr.yaw >= 0 else -1), nose_base - 3)]),
              fill=_shade(skin, 0.82), width=max(1, round(1.5 * k)))
    draw.ellipse(box(nx - nw, nose_base - 0.45 * nw, nx + nw, nose_base + 0.25 * nw), fill=_shade(skin, 0.9))
    for sign in (-1, 1):
        ox = nx + sign * 0.42 * nw
        draw.ellipse(box(ox - 0.24 * nw, nose_base - 0.12 * nw, ox + 0.24 * nw, nose_base + 0.12 * nw),
                     fill=_shade(skin, 0.45))

    # Mouth: lips around a midline that curves up at the corners when smiling.
    mx = shift * 1.1
    half = face.mouth_width * rx / 2 * (1 + 0.12 * max(expr.smile, 0))
    u = np.linspace(-1, 1, 17)
    mid = mouth_y - expr.smile * 5 * u ** 2 + expr.smile * 1.5
    bulge = (1 - u ** 2) ** 0.7
    upper = mid - face.lip_thickness * 0.8 * bulge - expr.mouth_open / 2 * bulge
    lower = mid + face.lip_thickness * bulge + expr.mouth_open / 2 * bulge
    xs = mx + u * half
    draw.polygon(pts(np.vstack([np.stack([xs, upper], 1), np.stack([xs, lower], 1)[::-1]])), fill=face.lip_colour)
    if expr.mouth_open > 0:
        top = mid - expr.mouth_open / 2 * bulge
        bottom = mid + expr.mouth_open / 2 * bulge
        draw.polygon(pts(np.vstack([np.stack([xs, top], 1), np.stack([xs, bottom], 1)[::-1]])), fill=(70, 22, 26))
        teeth = top + np.minimum(expr.mouth_open * 0.4, 2.5) * bulge
        draw.polygon(pts(np.vstack([np.stack([xs, top], 1), np.stack([xs, teeth], 1)[::-1]])), fill=(236, 232, 220))
    else:
        draw.line(pts(np.stack([xs, mid], 1)), fill=_shade(face.lip_colour, 0.55), width=max(1, round(1.4 * k)),
                  joint="curve")

    # Glasses last: frames over eyes and brows' lower edge.
    if face.glasses is not None:
        width = max(1, round(2.2 * k))
        rims = []
        for sign in (-1, 1):
            ex = sign * face.eye_spacing * rx + shift
            gw, gh = face.eye_w * 1.45, face.eye_w * 1.05
            rim = box(ex - gw, eye_line - gh, ex + gw, eye_line + gh)
            rims.append((ex - gw, ex + gw))
            if face.glasses_round:
                draw.ellipse(rim, outline=face.glasses, width=width)
            else:
                draw.rounded_rectangle(rim, radius=4 * k, outline=face.glasses, width=width)
            arm_from = ex + sign * gw
            draw.line(pts([(arm_from, eye_line - 2), (sign * rx * 0.98 - shift * 0.3, eye_line + 1)]),
                      fill=face.glasses, width=width)
        draw.line(pts([(rims[0][1], eye_line - 2), (rims[1][0], eye_line - 2)]), fill=face.glasses, width=width)
    return layer


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) pixel coordinates scaled to [-0.5, 0.5], float32, shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return yy, xx


def _scene_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of mostly muted saturation, as walls, curtains and crowds are."""
    lightness = rng.uniform(20, 235)
    hue = rng.uniform(0, 255, 3)
    return np.clip(lightness + rng.uniform(0, 0.5) * (hue - hue.mean()), 0, 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random RGB scene, independent of identity: flat, gradient, blotchy or shapes.

    Drawn at a quarter of the size and upscaled: cheap, and soft like the
    out-of-focus backgrounds of press photos.
    """
    small = max(size // 4, 8)
    kind = rng.integers(4)
    c1 = _scene_colour(rng)
    c2 = _scene_colour(rng)
    if kind == 0:
        arr = np.broadcast_to(c1, (small, small, 3))
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = _unit_grid(small)
        t = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0, 1)[..., None]
        arr = (1 - t) * c1 + t * c2
    elif kind == 2:
        cells = int(rng.integers(2, 7))
        grid = np.clip(c1 + rng.normal(0, 45, (cells, cells, 3)), 0, 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(grid).resize((small, small), Image.BICUBIC))
    else:
        img = Image.new("RGB", (small, small), _rgb(c1))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * small
            w, h = rng.uniform(0.1, 0.7, 2) * small
            shape = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
            (draw.rectangle if rng.random() < 0.6 else draw.ellipse)(shape, fill=_rgb(_scene_colour(rng)))
        arr = np.asarray(img)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR)


def render_face(identity: FaceIdentity, image_rng: np.random.Generator,
                size: int = LFW_IMAGE_SIZE, variation: Variation = DEFAULT_VARIATION) -> Image.Image:
    """One (size, size) RGB photo of `identity`; pose, expression, light and scene come from `image_rng`.

    The ranges of pose (rotation, shift, scale, yaw squash) and lighting (gain,
    colour cast, linear gradient, contrast about the mean, noise, blur) are
    `variation`'s; lengths are for size 250 and scale with `size`.
    """
    if size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {size}")
    background = _background(image_rng, size)
    expr = _sample_expression(image_rng)
    canvas = size * _SUPERSAMPLE
    layer = _draw_head(identity, expr, canvas)

    v = variation
    angle = math.radians(image_rng.uniform(-v.rotation_deg, v.rotation_deg))
    scale = image_rng.uniform(*v.scale)
    squash = 1 - v.yaw_squash * abs(expr.yaw)
    shift = image_rng.uniform(-v.shift_px, v.shift_px, 2) * canvas / LFW_IMAGE_SIZE
    # Forward map: out = c + t + R(angle) diag(scale * squash, scale) (in - c); PIL wants the inverse.
    c = canvas / 2
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = 1 / (scale * squash), 1 / scale
    a, b, d, e = sx * cos, sx * sin, -sy * sin, sy * cos
    ox, oy = c + float(shift[0]), c + float(shift[1])
    coeffs = (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy)
    # NEAREST at 2x then a 2x2 box reduce is 4-sample anti-aliasing; PIL's BILINEAR
    # affine on RGBA is ~25x slower and would dominate the render time.
    layer = layer.transform((canvas, canvas), Image.AFFINE, coeffs, resample=Image.NEAREST)
    layer = layer.reduce(_SUPERSAMPLE)
    background.paste(layer, (0, 0), layer)         # alpha-blends the person over the scene
    arr = np.asarray(background, dtype=np.float32)

    gain = image_rng.uniform(*v.gain)
    cast = np.clip(image_rng.normal(1.0, v.cast_sigma, 3), 0.5, 1.5).astype(np.float32)
    direction = image_rng.uniform(0, 2 * np.pi)
    strength = image_rng.uniform(0, v.gradient)
    contrast = image_rng.uniform(*v.contrast)
    noise = image_rng.standard_normal((size, size, 1), dtype=np.float32) * image_rng.uniform(0, v.noise_sigma)
    yy, xx = _unit_grid(size)
    light = gain * (1 + 2 * strength * (xx * math.cos(direction) + yy * math.sin(direction)))
    # Contrast c about the mean m of the lit image, folded into one pass:
    # (x * light * cast - m) * c + m = x * (light * c) * cast + m * (1 - c).
    # m comes from every 4th pixel: it only sets the pivot, and this is the hot loop.
    mean = float((arr[::4, ::4] * light[::4, ::4, None] * cast).mean())
    arr *= (light * contrast)[..., None]
    arr *= cast
    arr += noise + mean * (1 - contrast)
    np.clip(arr, 0, 255, out=arr)
    image = Image.fromarray(arr.astype(np.uint8), "RGB")
    if image_rng.random() < v.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(float(image_rng.uniform(0.3, 1.1))))
    return image


def render_jpeg(seed: int, identity_index: int, image_index: int, size: int = LFW_IMAGE_SIZE,
                identity: FaceIdentity | None = None, variation: Variation = DEFAULT_VARIATION) -> bytes:
    """JPEG bytes of image `image_index` (0-based) of identity `identity_index`."""
    rng = _rng(seed, _SEED_IMAGE, identity_index, image_index)
    identity = identity_params(seed, identity_index) if identity is None else identity
    image = render_face(identity, rng, size, variation)
    out = io.BytesIO()
    low, high = variation.jpeg_quality
    image.save(out, format="JPEG", quality=int(rng.integers(low, high + 1)))
    return out.getvalue()


def contact_sheet(seed: int = 0, identities: int = 8, images: int = 8, thumb: int = 125,
                  size: int = LFW_IMAGE_SIZE) -> Image.Image:
    """A grid of rendered faces: one row per identity (0..identities-1), `images` columns.

    Returns an RGB image of (images * thumb, identities * thumb) pixels; for eyeballing
    that faces look like faces and vary sensibly within a row.
    """
    sheet = Image.new("RGB", (images * thumb, identities * thumb))
    for row in range(identities):
        face = identity_params(seed, row)
        for col in range(images):
            image = Image.open(io.BytesIO(render_jpeg(seed, row, col, size, face)))
            sheet.paste(image.resize((thumb, thumb), Image.BILINEAR), (col * thumb, row * thumb))
    return sheet


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
