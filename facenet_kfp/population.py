"""Who is in a synthetic dataset: LFW, CASIA-WebFace and VGGFace2 facts, images per identity, names and ids.

Every random choice comes from `numpy.random.SeedSequence` keyed by
`(seed, domain, ...)` (`_rng`); the domains below keep streams for different
purposes apart.
"""

from __future__ import annotations

import math

import numpy as np

from facenet_kfp.errors import InputError

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

# SeedSequence domains, so that streams for different purposes never coincide.
_SEED_COUNTS, _SEED_NAMES, _SEED_IDENTITY, _SEED_IMAGE, _SEED_PAIRS = 1, 2, 3, 4, 5
_SEED_FOLDERS, _SEED_FILES, _SEED_VARIANT, _SEED_GEOMETRY, _SEED_POOL = 6, 7, 8, 9, 10

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
