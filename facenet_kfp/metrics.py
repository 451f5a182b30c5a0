"""Face-verification metrics over pair distances: accuracy, k-fold threshold selection, ROC, EER, VAL@FAR.

Conventions shared by every function here:

* ``distances`` is a float array of shape [N], one distance per pair, in
  whatever unit the caller uses (plain or squared L2; state which in every
  output). Distances must be finite.
* ``same`` is a bool array of shape [N]: True for a pair of one person
  ("matched"), False for two different people. Integer arrays of 0/1 are
  accepted too.
* A pair is *predicted* same when ``distance < threshold`` (strict), so a
  threshold equal to the smallest distance accepts no pair.
* TP/FN count same pairs accepted/rejected, FP/TN count different pairs
  accepted/rejected. VAL = TP / same pairs (true accept rate, TPR),
  FAR = FP / different pairs (false accept rate, FPR), FRR = 1 - VAL.

What a figure rests on (`accuracy_withheld`, `min_different_pairs`):

* an accuracy is a headline figure only when both classes have at least
  `MIN_CLASS_PAIRS` pairs; below that, answering one class for every pair can
  score as well, and the figure says more about the class balance than the model;
* a false accept rate of ``f`` can be measured only on at least
  ``ceil(1 / f)`` different-person pairs (below that, one accepted pair already
  exceeds it), so VAL@FAR is "n/a" on fewer; for the k-fold variant each fold's
  test part needs that many.

Everything is vectorised (sorting, ``searchsorted``, cumulative sums): the
LFW protocol's 6,000 pairs evaluate in a few milliseconds per call.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from facenet_kfp.errors import InputError

logger = logging.getLogger(__name__)

# Pairs of each class (same person, different people) a pair set needs before its accuracy is a headline figure.
MIN_CLASS_PAIRS = 100


# --------------------------------------------------------------------------- validation

def _check_pairs(distances: Any, same: Any, need_both: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert inputs: (float64 [N] finite distances, bool [N] same)."""
    try:
        d = np.asarray(distances, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"distances must be numbers: {exc}") from exc
    if d.ndim != 1:
        raise InputError(f"distances must be a 1-D array, got shape {d.shape}")
    if d.size == 0:
        raise InputError("distances is empty: need at least one pair")
    bad = ~np.isfinite(d)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"distances must be finite: {int(bad.sum())} values are not "
                         f"(first at index {first}: {d[first]})")
    s = np.asarray(same)
    if s.ndim != 1:
        raise InputError(f"same must be a 1-D array, got shape {s.shape}")
    if s.dtype != np.bool_:
        # 0/1 integer labels are common (e.g. read back from JSON); anything else is a mistake.
        if s.size and not (np.issubdtype(s.dtype, np.integer) and np.isin(s, (0, 1)).all()):
            raise InputError(f"same must be a bool array (or 0/1 integers), got dtype {s.dtype}")
        s = s.astype(bool)
    if s.shape != d.shape:
        raise InputError(f"distances and same must have equal lengths, got {d.size} and {s.size}")
    if need_both:
        n_same = int(s.sum())
        if n_same == 0 or n_same == s.size:
            raise InputError(f"same must contain at least one same (True) and one different (False) "
                             f"pair, got {n_same} same of {s.size}")
    return d, s


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {threshold!r}") from exc
    if math.isnan(t):
        raise InputError(f"{name} must not be NaN")
    return t


def _split_sorted(d: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distances of the same pairs and of the different pairs."""
    return np.sort(d[s]), np.sort(d[~s])


def _accepted(sorted_d: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values in `sorted_d` strictly below each threshold (int64, shape of thresholds)."""
    return np.searchsorted(sorted_d, thresholds, side="left").astype(np.int64)


def _fold_assignment(n: int, folds: Any, fold_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fold id per pair [N], sorted distinct fold ids [K]) after validation."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise InputError(f"folds must be an integer, got {folds!r}")
    folds = int(folds)
    if folds < 2:
        raise InputError(f"folds must be at least 2, got {folds}")
    if fold_ids is None:
        return contiguous_folds(n, folds), np.arange(folds)
    ids = np.asarray(fold_ids)
    if ids.ndim != 1 or ids.size != n:
        raise InputError(f"fold_ids must be a 1-D array with one entry per pair ({n}), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"fold_ids must be integers, got dtype {ids.dtype}")
    distinct = np.unique(ids)
    if distinct.size != folds:
        raise InputError(f"fold_ids has {distinct.size} distinct folds {distinct.tolist()[:20]} "
                         f"but folds={folds}")
    return ids.astype(np.int64), distinct


def contiguous_folds(n: int, folds: int) -> np.ndarray:
    """Fold id (int64 [n]) per pair for `folds` contiguous chunks of near-equal size (``np.array_split``)."""
    if folds > n:
        raise InputError(f"folds={folds} is more than the {n} pairs")
    ids = np.empty(n, dtype=np.int64)
    for k, chunk in enumerate(np.array_split(np.arange(n), folds)):
        ids[chunk] = k
    return ids


# --------------------------------------------------------------------------- accuracy and thresholds

def accuracy_at(distances, same, threshold) -> float:
    """Fraction of pairs classified correctly by ``same_pred = distance < threshold``."""
    d, s = _check_pairs(distances, same)
    t = _check_threshold(threshold)
    return float(np.mean((d < t) == s))


def _default_candidates(d: np.ndarray) -> np.ndarray:
    """Every distinct split of the sorted distances, as thresholds (ascending).

    Midpoints between consecutive distinct distances, plus one value below the
    smallest and one above the largest distance, each half the mean gap between
    distinct distances away (0.5 when all distances are equal).
    """
    u = np.unique(d)
    pad = 0.5 * (u[-1] - u[0]) / (u.size - 1) if u.size > 1 else 0.5
    return np.concatenate(([u[0] - pad], 0.5 * (u[:-1] + u[1:]), [u[-1] + pad]))


def _best_plateau_index(correct: np.ndarray) -> int:
    """Index of the chosen best candidate: the middle of the longest run of maxima.

    `correct` holds exact integer counts per ascending candidate. Among the
    maximal entries, take the longest run of consecutive candidates (the lowest
    such run on ties) and return its middle index (the lower middle for runs of
    even length). This keeps the threshold away from the edges of a plateau.
    """
    is_best = correct == correct.max()
    padded = np.concatenate(([False], is_best, [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]          # runs are [start, end)
    run = int(np.argmax(ends - starts))              # argmax returns the first (lowest) longest run
    return int((starts[run] + ends[run] - 1) // 2)


def select_threshold(distances, same, thresholds=None) -> tuple[float, float]:
    """Threshold maximising accuracy on these pairs: returns (threshold, accuracy).

    Without `thresholds` the candidates are every distinct split of the data
    (see `_default_candidates`), so the result is the exact optimum. With
    `thresholds` (any 1-D grid, e.g. ``np.arange(0, 4, 0.01)`` on squared L2) only
    those values are tried; the grid is sorted and de-duplicated first.

    Ties: accuracy is constant on runs of consecutive candidates; the chosen
    threshold is the middle candidate of the longest run of best accuracy (the
    lowest run when several are equally long; the lower middle for an even
    number of candidates). Deterministic, and always one of the candidates.

    Cost: O((N + C) log N) for C candidates.
    """
    d, s = _check_pairs(distances, same)
    if thresholds is None:
        cand = _default_candidates(d)
    else:
        cand = np.asarray(thresholds, dtype=np.float64)
        if cand.ndim != 1 or cand.size == 0:
            raise InputError(f"thresholds must be a non-empty 1-D array, got shape {cand.shape}")
        if np.isnan(cand).any():
            raise InputError("thresholds must not contain NaN")
        cand = np.unique(cand)
    d_same, d_diff = _split_sorted(d, s)
    tp = _accepted(d_same, cand)
    tn = d_diff.size - _accepted(d_diff, cand)
    correct = tp + tn
    best = _best_plateau_index(correct)
    return float(cand[best]), float(correct[best] / d.size)


def kfold_accuracy(distances, same, folds=10, thresholds=None, fold_ids=None) -> dict:
    """K-fold verification accuracy (the LFW protocol).

    For each fold k: the threshold is chosen with `select_threshold` on the
    pairs of all other folds; the accuracy is measured on fold k's pairs.

    `fold_ids` (int [N]) assigns pairs to folds, e.g. the folds of LFW's
    pairs.txt; it must have exactly `folds` distinct values. Without it the
    pairs are cut into `folds` contiguous chunks of near-equal size in the given
    order (``np.array_split``), so shuffle beforehand if the order is sorted.

    Returns ``{"mean", "std", "accuracies", "thresholds"}`` where the lists hold
    one float per fold in ascending fold id order and ``std`` is the population
    standard deviation over folds (``np.std``, ddof=0, as in the FaceNet code).
    """
    d, s = _check_pairs(distances, same)
    ids, distinct = _fold_assignment(d.size, folds, fold_ids)
    accuracies, chosen = [], []
    for k in distinct:
        test = ids == k
        t, _ = select_threshold(d[~test], s[~test], thresholds)
        accuracies.append(float(np.mean((d[test] < t) == s[test])))
        chosen.append(t)
    acc = np.asarray(accuracies)
    return {"mean": float(acc.mean()), "std": float(acc.std()),
            "accuracies": accuracies, "thresholds": chosen}


# --------------------------------------------------------------------------- ROC family

def roc_curve(distances, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule ``same_pred = distance < t``: returns (fpr, tpr, thresholds), each [M].

    One point per distinct distance plus the top endpoint, M = distinct + 1.
    Points are ordered by increasing threshold, hence non-decreasing FPR and
    TPR like scikit-learn's curve (its decreasing *score* thresholds are our
    increasing *distance* thresholds). ``thresholds[i]`` is the i-th smallest
    distinct distance, so point i accepts exactly the pairs below it; the first
    point is therefore (0, 0), and the last threshold is the float just above
    the largest distance, giving (1, 1). All thresholds are finite.
    """
    d, s = _check_pairs(distances, same, need_both=True)
    u = np.unique(d)
    thresholds = np.append(u, np.nextafter(u[-1], np.inf))
    d_same, d_diff = _split_sorted(d, s)
    tpr = _accepted(d_same, thresholds) / d_same.size
    fpr = _accepted(d_diff, thresholds) / d_diff.size
    return fpr, tpr, thresholds


def roc_auc(distances, same) -> float:
    """Area under the ROC: P(d_same < d_diff) for a random same and different pair, ties count 1/2.

    Computed exactly by counting (Mann-Whitney U / (n_same * n_diff)); equals
    the trapezoid area under `roc_curve`.
    """
    d, s = _check_pairs(distances, same, need_both=True)
    d_same, d_diff = _split_sorted(d, s)
    greater = d_diff.size - np.searchsorted(d_diff, d_same, side="right")
    ties = np.searchsorted(d_diff, d_same, side="right") - np.searchsorted(d_diff, d_same, side="left")
    # Sums are exact integers (ties doubled) before the one division.
    return float((2 * greater.sum() + ties.sum()) / (2.0 * d_same.size * d_diff.size))


def equal_error_rate(distances, same) -> tuple[float, float]:
    """Equal error rate and its threshold: (eer, threshold) where FAR == FRR.

    FAR - FRR rises strictly along `roc_curve` from -1 to +1; the crossing is
    found between two consecutive ROC points and both the rate and the
    threshold are interpolated linearly there. When a ROC point hits FAR == FRR
    exactly, its threshold is returned as is.
    """
    fpr, tpr, thr = roc_curve(distances, same)
    gap = fpr - (1.0 - tpr)
    k = int(np.argmax(gap >= 0))            # first point at or past the crossing; gap[-1] == 1
    if gap[k] == 0.0:
        return float(fpr[k]), float(thr[k])
    # k >= 1 because gap[0] == -1.
    alpha = -gap[k - 1] / (gap[k] - gap[k - 1])
    eer = fpr[k - 1] + alpha * (fpr[k] - fpr[k - 1])
    threshold = thr[k - 1] + alpha * (thr[k] - thr[k - 1])
    return float(eer), float(threshold)


def val_far(distances, same, threshold) -> tuple[float, float]:
    """(VAL, FAR) at `threshold`: VAL = accepted same / same pairs, FAR = accepted different / different pairs."""
    d, s = _check_pairs(distances, same, need_both=True)
    t = _check_threshold(threshold)
    accepted = d < t
    return float(accepted[s].mean()), float(accepted[~s].mean())


def threshold_at_far(distances, same, far_target) -> float:
    """Threshold whose false accept rate on these pairs is `far_target`, by interpolation.

    FaceNet-style: FAR is evaluated at the sorted distinct thresholds of
    `roc_curve`, then inverted with ``np.interp(far_target, far, threshold)``.
    FAR is a step function of the threshold, so for each distinct FAR value the
    largest threshold reaching it is kept (it maximises VAL at that FAR). Hence

    * ``far_target == 0`` returns the smallest different-pair distance: no
      different pair is accepted, and as many same pairs as possible are;
    * a target equal to an attainable FAR returns a threshold with exactly that FAR;
    * a target between attainable FARs lands between their thresholds, where the
      actual FAR is the next attainable value above the target (within one
      group of tied different-pair distances, i.e. 1/n_diff without ties).
    """
    d, s = _check_pairs(distances, same, need_both=True)
    target = _check_threshold(far_target, "far_target")
    if not 0.0 <= target <= 1.0:
        raise InputError(f"far_target must be in [0, 1], got {far_target}")
    fpr, _, thr = roc_curve(d, s)
    # fpr is non-decreasing: the last index of each distinct value is its largest threshold.
    last = np.flatnonzero(np.append(np.diff(fpr) > 0, True))
    return float(np.interp(target, fpr[last], thr[last]))


def kfold_val_at_far(distances, same, far_target, folds=10, fold_ids=None) -> dict:
    """K-fold VAL at a target FAR (the FaceNet LFW protocol).

    For each fold k: the threshold comes from `threshold_at_far` on the other
    folds; VAL and FAR are measured on fold k (which must hold both same and
    different pairs). Folds are assigned as in `kfold_accuracy`.

    Returns ``{"val_mean", "val_std", "far_mean", "far_std", "vals", "fars",
    "thresholds"}``; lists have one float per fold, stds are population (ddof=0).
    """
    d, s = _check_pairs(distances, same, need_both=True)
    ids, distinct = _fold_assignment(d.size, folds, fold_ids)
    vals, fars, chosen = [], [], []
    for k in distinct:
        test = ids == k
        for part, mask in (("outside", ~test), ("in", test)):
            n_same = int(s[mask].sum())
            if n_same == 0 or n_same == int(mask.sum()):
                raise InputError(f"VAL@FAR needs same and different pairs {part} fold {int(k)}, "
                                 f"got {n_same} same of {int(mask.sum())} pairs")
        t = threshold_at_far(d[~test], s[~test], far_target)
        val, far = val_far(d[test], s[test], t)
        vals.append(val)
        fars.append(far)
        chosen.append(t)
    v, f = np.asarray(vals), np.asarray(fars)
    return {"val_mean": float(v.mean()), "val_std": float(v.std()),
            "far_mean": float(f.mean()), "far_std": float(f.std()),
            "vals": vals, "fars": fars, "thresholds": chosen}


def min_different_pairs(far_target) -> int:
    """Different-person pairs needed to measure a false accept rate of `far_target` (0 < FAR <= 1): ceil(1 / FAR).

    With fewer, the smallest non-zero FAR that can be observed (1 / n) is
    above the target. Rounded to 9 decimals before the ceiling, so a FAR of
    1/49 needs 49 pairs (not 50 from 1 / (1/49) = 49.00000000000001 in binary
    floating point); 1e-3 needs 1,000.
    """
    target = _check_threshold(far_target, "far_target")
    if not 0.0 < target <= 1.0:
        raise InputError(f"far_target must be in (0, 1] to be measured on a finite number of pairs, got {far_target}")
    return int(math.ceil(round(1.0 / target, 9)))


def fewest_in_a_fold(same, fold_ids) -> tuple[int, int]:
    """(fewest same-person pairs, fewest different-person pairs) in the test part of any fold.

    The test part of fold k is the pairs with ``fold_ids == k``, as in
    `kfold_accuracy` and `kfold_val_at_far` with explicit fold ids.
    """
    s = np.asarray(same, dtype=bool)
    ids = np.asarray(fold_ids)
    if ids.shape != s.shape or s.size == 0:
        raise InputError(f"fold_ids must have one entry per pair ({s.size}), got shape {ids.shape}")
    folds = np.unique(ids)
    n_same = [int(np.sum(s[ids == k])) for k in folds]
    n_diff = [int(np.sum(~s[ids == k])) for k in folds]
    return min(n_same), min(n_diff)


def accuracy_withheld(n_same: int, n_different: int, minimum: int = MIN_CLASS_PAIRS) -> str:
    """Why a pair set's accuracy is not a headline figure, in one sentence; "" when it is one.

    Withheld when either class has fewer than `minimum` pairs. The sentence
    names the short class(es) and the accuracy of answering the larger class
    for every pair, e.g. ``accuracy withheld: 23 different pairs (< 100);
    answering 'same' to all scores 0.975`` (at most 100 characters, for a terminal line).
    """
    n_same, n_different = int(n_same), int(n_different)
    if n_same < 0 or n_different < 0 or n_same + n_different == 0:
        raise InputError(f"pair counts must be >= 0 and not both 0, got {n_same} same and {n_different} different")
    short = [f"{n:,} {kind}" for n, kind in ((n_same, "same"), (n_different, "different"))
             if n < minimum]
    if not short:
        return ""
    majority, count = ("same", n_same) if n_same >= n_different else ("different", n_different)
    return (f"accuracy withheld: {' and '.join(short)} pairs (< {minimum:,}{' each' if len(short) == 2 else ''}); "
            f"answering '{majority}' to all scores {count / (n_same + n_different):.3f}")


def downsample_roc(fpr, tpr, thresholds, max_points=300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin a ROC curve to at most `max_points` points for display (KFP ``log_roc_curve``).

    Points are kept at even spacing along the curve's length in (FPR, TPR)
    space, so steep and flat parts are both drawn faithfully. The first and
    last points are always kept and the order is unchanged, so monotonic
    inputs stay monotonic.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 2:
        raise InputError(f"max_points must be an integer >= 2, got {max_points!r}")
    arrays = []
    for name, values in (("fpr", fpr), ("tpr", tpr), ("thresholds", thresholds)):
        a = np.asarray(values, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise InputError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
        arrays.append(a)
    x, y, t = arrays
    if not x.size == y.size == t.size:
        raise InputError(f"fpr, tpr and thresholds must have equal lengths, got {x.size}, {y.size}, {t.size}")
    if x.size <= max_points:
        return x.copy(), y.copy(), t.copy()
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))
    if length[-1] > 0:
        keep = np.searchsorted(length, np.linspace(0.0, length[-1], max_points - 1))
    else:
        keep = np.linspace(0, x.size - 1, max_points - 1).round().astype(np.int64)
    # One slot is left for the last point, which searchsorted may not reach on a flat tail.
    keep = np.unique(np.concatenate((keep, [0, x.size - 1])))
    return x[keep], y[keep], t[keep]


def confusion_matrix(distances, same, threshold) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]: rows = actual (different, same), columns = predicted (different, same)."""
    d, s = _check_pairs(distances, same)
    t = _check_threshold(threshold)
    accepted = d < t
    tp = int(np.sum(accepted & s))
    fp = int(np.sum(accepted & ~s))
    fn = int(np.sum(~accepted & s))
    tn = int(np.sum(~accepted & ~s))
    return [[tn, fp], [fn, tp]]


# --------------------------------------------------------------------------- units

def l2_to_squared(threshold) -> float:
    """Plain L2 threshold t → squared L2 threshold t**2 (t >= 0; same split since both are monotonic)."""
    t = _check_threshold(threshold)
    if t < 0:
        raise InputError(f"a plain L2 threshold must be >= 0, got {threshold}")
    return t * t


def squared_to_l2(threshold) -> float:
    """Squared L2 threshold t → plain L2 threshold sqrt(t) (t >= 0)."""
    t = _check_threshold(threshold)
    if t < 0:
        raise InputError(f"a squared L2 threshold must be >= 0, got {threshold}")
    return math.sqrt(t)
