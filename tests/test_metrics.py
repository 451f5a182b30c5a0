"""Verification metrics against slow, obvious reference implementations and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from facenet_kfp import metrics
from facenet_kfp.errors import InputError


# --------------------------------------------------------------------------- references (plain loops)

def ref_accuracy(d, s, t):
    return sum((di < t) == si for di, si in zip(d, s)) / len(d)


def ref_counts(d, s, t):
    tp = sum(1 for di, si in zip(d, s) if si and di < t)
    fp = sum(1 for di, si in zip(d, s) if not si and di < t)
    return tp, fp, sum(s), len(s) - sum(s)


def ref_val_far(d, s, t):
    tp, fp, n_same, n_diff = ref_counts(d, s, t)
    return tp / n_same, fp / n_diff


def ref_auc(d, s):
    same_d = [x for x, y in zip(d, s) if y]
    diff_d = [x for x, y in zip(d, s) if not y]
    score = 0.0
    for a in same_d:
        for b in diff_d:
            score += 1.0 if a < b else 0.5 if a == b else 0.0
    return score / (len(same_d) * len(diff_d))


def ref_candidates(d):
    u = sorted(set(d))
    pad = 0.5 * (u[-1] - u[0]) / (len(u) - 1) if len(u) > 1 else 0.5
    return [u[0] - pad] + [(u[i] + u[i + 1]) / 2 for i in range(len(u) - 1)] + [u[-1] + pad]


def ref_best_accuracy(d, s, candidates):
    return max(ref_accuracy(d, s, t) for t in candidates)


def random_pairs(rng, n, ties=True):
    """Same pairs tend to be closer; rounding to 2 decimals gives many ties."""
    same = rng.random(n) < 0.5
    d = np.where(same, rng.normal(0.8, 0.3, n), rng.normal(1.3, 0.3, n))
    if ties:
        d = np.round(d, 1)
    return d, same


# --------------------------------------------------------------------------- accuracy / threshold

def test_accuracy_hand_case():
    d = [0.1, 0.2, 0.3, 0.4]
    s = [True, True, False, False]
    for t in (0.21, 0.25, 0.3):
        assert metrics.accuracy_at(d, s, t) == 1.0
    assert metrics.accuracy_at(d, s, 0.2) == 0.75      # strict: 0.2 is not < 0.2
    assert metrics.accuracy_at(d, s, 0.0) == 0.5
    assert metrics.accuracy_at(d, s, 1.0) == 0.5
    t, acc = metrics.select_threshold(d, s)
    assert acc == 1.0 and 0.2 < t < 0.3
    assert t == pytest.approx(0.25)


def test_accuracy_matches_reference():
    rng = np.random.default_rng(0)
    d, s = random_pairs(rng, 200)
    for t in (-1.0, 0.5, 0.8, 1.0, 1.05, 2.0, 5.0):
        assert metrics.accuracy_at(d, s, t) == pytest.approx(ref_accuracy(d, s, t))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ties", [True, False])
def test_select_threshold_is_exact_optimum(seed, ties):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, int(rng.integers(5, 120)), ties=ties)
    t, acc = metrics.select_threshold(d, s)
    # brute force over every threshold that can change the split
    assert acc == pytest.approx(ref_best_accuracy(d, s, ref_candidates(d.tolist())))
    assert ref_accuracy(d, s, t) == pytest.approx(acc)
    # no threshold at all does better: try every distance and points around them
    dense = np.concatenate((d, d + 1e-9, d - 1e-9, [d.min() - 1, d.max() + 1]))
    assert acc >= max(ref_accuracy(d, s, x) for x in dense) - 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_select_threshold_on_grid(seed):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, 150)
    grid = np.arange(0, 4, 0.01)
    t, acc = metrics.select_threshold(d, s, thresholds=grid)
    assert t in grid
    assert acc == pytest.approx(max(ref_accuracy(d, s, x) for x in grid))
    assert ref_accuracy(d, s, t) == pytest.approx(acc)


def test_select_threshold_tie_rule_middle_of_longest_plateau():
    # Accuracy is 1.0 for every grid threshold in (0.2, 0.3]: 0.21..0.30 (10 values) -> lower middle 0.25.
    d = [0.1, 0.2, 0.3, 0.4]
    s = [True, True, False, False]
    grid = np.round(np.arange(0, 0.5, 0.01), 2)
    t, acc = metrics.select_threshold(d, s, thresholds=grid[::-1])    # order of the grid does not matter
    assert acc == 1.0 and t == pytest.approx(0.25)
    # Two separate best runs: the longer one wins even though it is higher.
    d = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    s = [True, False, True, True, False, False]
    grid = [0.15, 0.35, 0.45, 0.5, 0.6, 0.7, 0.8]   # 0.15: 4/6; 0.45 and 0.5: 5/6; 0.6..0.8: 4/6
    t, acc = metrics.select_threshold(d, s, thresholds=grid)
    assert acc == pytest.approx(5 / 6) and t == 0.45
    grid = [0.15, 0.45, 0.5, 0.55]                    # run 0.45, 0.5 (length 2) -> lower middle
    t, _ = metrics.select_threshold(d, s, thresholds=grid)
    assert t == 0.45


def test_select_threshold_is_deterministic_and_handles_one_class():
    d = [0.3, 0.1, 0.2]
    t, acc = metrics.select_threshold(d, [True, True, True])
    assert acc == 1.0 and t > 0.3
    t, acc = metrics.select_threshold(d, [False, False, False])
    assert acc == 1.0 and t < 0.1
    t, acc = metrics.select_threshold([0.5, 0.5], [True, False])
    assert acc == 0.5
    assert metrics.select_threshold(d, [True, False, True]) == metrics.select_threshold(d, [True, False, True])


# --------------------------------------------------------------------------- k-fold

def ref_kfold(d, s, fold_of, folds, grid=None):
    accs, ths = [], []
    for k in folds:
        train = [i for i in range(len(d)) if fold_of[i] != k]
        test = [i for i in range(len(d)) if fold_of[i] == k]
        td, ts = [d[i] for i in train], [s[i] for i in train]
        cands = ref_candidates(td) if grid is None else list(grid)
        best = ref_best_accuracy(td, ts, cands)
        t, _ = metrics.select_threshold(td, ts, grid)
        assert ref_accuracy(td, ts, t) == pytest.approx(best)
        accs.append(ref_accuracy([d[i] for i in test], [s[i] for i in test], t))
        ths.append(t)
    return accs, ths


@pytest.mark.parametrize("seed", range(4))
def test_kfold_accuracy_matches_loop(seed):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, 103)
    result = metrics.kfold_accuracy(d, s, folds=10)
    fold_of = np.concatenate([[k] * len(c) for k, c in enumerate(np.array_split(np.arange(103), 10))])
    accs, ths = ref_kfold(d.tolist(), s.tolist(), fold_of, range(10))
    assert result["accuracies"] == pytest.approx(accs)
    assert result["thresholds"] == pytest.approx(ths)
    assert result["mean"] == pytest.approx(sum(accs) / 10)
    mean = sum(accs) / 10
    assert result["std"] == pytest.approx((sum((a - mean) ** 2 for a in accs) / 10) ** 0.5)


def test_kfold_accuracy_with_fold_ids_and_grid():
    rng = np.random.default_rng(11)
    d, s = random_pairs(rng, 90)
    fold_ids = rng.integers(3, 6, size=90)          # folds 3, 4, 5 in arbitrary order
    grid = np.arange(0, 3, 0.05)
    result = metrics.kfold_accuracy(d, s, folds=3, thresholds=grid, fold_ids=fold_ids)
    accs, ths = ref_kfold(d.tolist(), s.tolist(), fold_ids.tolist(), [3, 4, 5], grid)
    assert result["accuracies"] == pytest.approx(accs)
    assert result["thresholds"] == pytest.approx(ths)


def test_kfold_accuracy_perfect_separation():
    d = np.concatenate((np.linspace(0.1, 0.5, 50), np.linspace(1.0, 2.0, 50)))
    s = np.arange(100) < 50
    order = np.random.default_rng(0).permutation(100)
    result = metrics.kfold_accuracy(d[order], s[order], folds=10)
    assert result["mean"] == 1.0 and result["std"] == 0.0
    assert all(0.5 < t < 1.0 for t in result["thresholds"])


def test_kfold_validation():
    d, s = [0.1, 0.2, 0.3, 0.4], [True, True, False, False]
    with pytest.raises(InputError, match="folds"):
        metrics.kfold_accuracy(d, s, folds=1)
    with pytest.raises(InputError, match="folds=5 is more than the 4 pairs"):
        metrics.kfold_accuracy(d, s, folds=5)
    with pytest.raises(InputError, match="fold_ids has 2 distinct folds"):
        metrics.kfold_accuracy(d, s, folds=10, fold_ids=[0, 0, 1, 1])
    with pytest.raises(InputError, match="fold_ids must be a 1-D array"):
        metrics.kfold_accuracy(d, s, folds=2, fold_ids=[0, 1])
    with pytest.raises(InputError, match="fold_ids must be integers"):
        metrics.kfold_accuracy(d, s, folds=2, fold_ids=[0.0, 0.0, 1.0, 1.0])


# --------------------------------------------------------------------------- ROC, AUC, EER

def test_roc_curve_hand_case():
    fpr, tpr, thr = metrics.roc_curve([0.1, 0.2, 0.3, 0.4], [True, True, False, False])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(thr[:4], [0.1, 0.2, 0.3, 0.4])
    assert 0.4 < thr[4] < 0.4 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_roc_curve_points_match_reference(seed):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, 80)
    fpr, tpr, thr = metrics.roc_curve(d, s)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(thr) > 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.isfinite(thr))
    for f, t_, th in zip(fpr, tpr, thr):
        val, far = ref_val_far(d.tolist(), s.tolist(), th)
        assert (f, t_) == pytest.approx((far, val))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pair_counting_and_trapezoid(seed):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, int(rng.integers(10, 150)), ties=seed % 2 == 0)
    auc = metrics.roc_auc(d, s)
    assert auc == pytest.approx(ref_auc(d.tolist(), s.tolist()))
    fpr, tpr, _ = metrics.roc_curve(d, s)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert auc == pytest.approx(area)


def test_auc_and_eer_extremes():
    d = [0.1, 0.2, 0.3, 0.4]
    assert metrics.roc_auc(d, [True, True, False, False]) == 1.0
    assert metrics.roc_auc(d, [False, False, True, True]) == 0.0
    assert metrics.roc_auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    eer, t = metrics.equal_error_rate(d, [True, True, False, False])
    assert eer == 0.0 and 0.2 < t <= 0.3
    assert metrics.accuracy_at(d, [True, True, False, False], t) == 1.0
    eer, _ = metrics.equal_error_rate(d, [False, False, True, True])
    assert eer == 1.0


def test_eer_hand_interpolation():
    # same at 0.1, 0.3; different at 0.2, 0.4.
    # ROC points (threshold: FAR, FRR): 0.1: 0, 1; 0.2: 0, .5; 0.3: .5, .5 -> exact crossing at 0.3.
    eer, t = metrics.equal_error_rate([0.1, 0.2, 0.3, 0.4], [True, False, True, False])
    assert eer == 0.5 and t == pytest.approx(0.3)
    # same at 0.1, 0.2, 0.4; different at 0.3: points 0.3: (0, 1/3), 0.4: (1, 1/3)
    # FAR - FRR goes -1/3 -> 2/3, crossing at alpha = 1/3: eer = 1/3, threshold 0.3 + 0.1/3
    eer, t = metrics.equal_error_rate([0.1, 0.2, 0.3, 0.4], [True, True, False, True])
    assert eer == pytest.approx(1 / 3) and t == pytest.approx(0.3 + 0.1 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_eer_close_to_dense_sweep(seed):
    rng = np.random.default_rng(seed)
    d, s = random_pairs(rng, 2000, ties=False)
    eer, t = metrics.equal_error_rate(d, s)
    sweep = np.linspace(d.min(), d.max(), 4001)
    d_same, d_diff = np.sort(d[s]), np.sort(d[~s])
    far = np.searchsorted(d_diff, sweep) / d_diff.size
    frr = 1 - np.searchsorted(d_same, sweep) / d_same.size
    k = np.argmin(np.abs(far - frr))
    assert eer == pytest.approx((far[k] + frr[k]) / 2, abs=2e-3)
    assert t == pytest.approx(sweep[k], abs=0.01)
    val, far_t = ref_val_far(d.tolist(), s.tolist(), t)
    assert far_t == pytest.approx(1 - val, abs=2e-3)


# --------------------------------------------------------------------------- VAL / FAR

def test_val_far_and_confusion_match_loops():
    rng = np.random.default_rng(3)
    d, s = random_pairs(rng, 300)
    for t in (0.0, 0.7, 1.0, 1.3, 3.0):
        assert metrics.val_far(d, s, t) == pytest.approx(ref_val_far(d.tolist(), s.tolist(), t))
        tp, fp, n_same, n_diff = ref_counts(d.tolist(), s.tolist(), t)
        assert metrics.confusion_matrix(d, s, t) == [[n_diff - fp, fp], [n_same - tp, tp]]
    cm = metrics.confusion_matrix([0.1, 0.2, 0.3, 0.4], [True, False, True, False], 0.25)
    assert cm == [[1, 1], [1, 1]]
    assert all(isinstance(x, int) for row in cm for x in row)


@pytest.mark.parametrize("target", [0.0, 1e-3, 0.01, 0.1, 0.37, 1.0])
def test_threshold_at_far_hits_target(target):
    rng = np.random.default_rng(5)
    d, s = random_pairs(rng, 20000, ties=False)
    t = metrics.threshold_at_far(d, s, target)
    _, far = metrics.val_far(d, s, t)
    n_diff = int((~s).sum())
    assert target <= far <= target + 1.0 / n_diff + 1e-12
    if target == 0.0:
        assert t == d[~s].min()          # largest zero-FAR threshold
    if target == 1.0:
        assert t > d.max()


def test_threshold_at_far_exact_and_between_values():
    # different pairs at 0.2, 0.4, 0.6, 0.8 (FAR steps of 0.25); same at 0.1, 0.3
    d = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
    s = [True, False, True, False, False, False]
    assert metrics.threshold_at_far(d, s, 0.0) == 0.2
    assert metrics.threshold_at_far(d, s, 0.25) == 0.4     # largest threshold with FAR 0.25
    assert metrics.threshold_at_far(d, s, 0.5) == 0.6
    # halfway between FAR 0.25 (t=0.4) and 0.5 (t=0.6)
    assert metrics.threshold_at_far(d, s, 0.375) == pytest.approx(0.5)
    assert metrics.val_far(d, s, 0.5) == (1.0, 0.5)


def ref_kfold_val(d, s, fold_of, folds, target):
    vals, fars = [], []
    for k in folds:
        train = [i for i in range(len(d)) if fold_of[i] != k]
        test = [i for i in range(len(d)) if fold_of[i] == k]
        t = metrics.threshold_at_far([d[i] for i in train], [s[i] for i in train], target)
        v, f = ref_val_far([d[i] for i in test], [s[i] for i in test], t)
        vals.append(v)
        fars.append(f)
    return vals, fars


def test_kfold_val_at_far_matches_loop():
    rng = np.random.default_rng(8)
    d, s = random_pairs(rng, 1000, ties=False)
    result = metrics.kfold_val_at_far(d, s, 0.01, folds=10)
    fold_of = np.repeat(np.arange(10), 100)
    vals, fars = ref_kfold_val(d.tolist(), s.tolist(), fold_of, range(10), 0.01)
    assert result["vals"] == pytest.approx(vals)
    assert result["fars"] == pytest.approx(fars)
    assert result["val_mean"] == pytest.approx(np.mean(vals))
    assert result["val_std"] == pytest.approx(np.std(vals))
    assert result["far_mean"] == pytest.approx(np.mean(fars))
    assert len(result["thresholds"]) == 10
    # with explicit folds
    ids = rng.integers(0, 4, size=1000)
    result = metrics.kfold_val_at_far(d, s, 0.05, folds=4, fold_ids=ids)
    vals, fars = ref_kfold_val(d.tolist(), s.tolist(), ids.tolist(), range(4), 0.05)
    assert result["vals"] == pytest.approx(vals)


def test_kfold_val_at_far_needs_both_classes_per_fold():
    d = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    s = [True, True, True, False, False, False]
    with pytest.raises(InputError, match="outside fold 0, got 0 same of 3 pairs"):
        metrics.kfold_val_at_far(d, s, 0.1, folds=2)
    with pytest.raises(InputError, match="in fold 0, got 1 same of 1 pairs"):
        metrics.kfold_val_at_far(d, [True, False, True, False, True, False], 0.1, folds=6)


# --------------------------------------------------------------------------- downsampling, units

def test_downsample_roc_keeps_endpoints_and_order():
    rng = np.random.default_rng(1)
    d, s = random_pairs(rng, 6000, ties=False)
    fpr, tpr, thr = metrics.roc_curve(d, s)
    x, y, t = metrics.downsample_roc(fpr, tpr, thr, max_points=300)
    assert 250 <= len(x) <= 300 and len(x) == len(y) == len(t)
    assert (x[0], y[0], t[0]) == (fpr[0], tpr[0], thr[0])
    assert (x[-1], y[-1], t[-1]) == (fpr[-1], tpr[-1], thr[-1])
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0) and np.all(np.diff(t) > 0)
    # every kept point is an original point
    original = set(zip(fpr.tolist(), tpr.tolist(), thr.tolist()))
    assert all(p in original for p in zip(x.tolist(), y.tolist(), t.tolist()))
    # the area barely changes
    assert np.trapezoid(y, x) == pytest.approx(np.trapezoid(tpr, fpr), abs=5e-3)
    # short curves come back unchanged; a flat curve still keeps its ends
    a, b, c = metrics.downsample_roc([0, 1], [0, 1], [0.1, 0.2], max_points=2)
    assert a.tolist() == [0, 1] and c.tolist() == [0.1, 0.2]
    flat = np.zeros(50)
    a, _, c = metrics.downsample_roc(flat, flat, np.arange(50.0), max_points=5)
    assert len(a) <= 5 and c[0] == 0 and c[-1] == 49


def test_downsample_roc_validation():
    with pytest.raises(InputError, match="max_points"):
        metrics.downsample_roc([0, 1], [0, 1], [0, 1], max_points=1)
    with pytest.raises(InputError, match="equal lengths"):
        metrics.downsample_roc([0, 1], [0, 1, 1], [0, 1])
    with pytest.raises(InputError, match="tpr"):
        metrics.downsample_roc([0, 1], [], [0, 1])


def test_threshold_units():
    assert metrics.l2_to_squared(1.242) == pytest.approx(1.542564)
    assert metrics.squared_to_l2(4.0) == 2.0
    assert metrics.squared_to_l2(metrics.l2_to_squared(0.7)) == pytest.approx(0.7)
    # same split of pairs with plain distances / plain threshold and squared / squared
    rng = np.random.default_rng(2)
    d, s = random_pairs(rng, 100, ties=False)
    d = np.abs(d)
    assert metrics.accuracy_at(d, s, 1.1) == metrics.accuracy_at(d ** 2, s, metrics.l2_to_squared(1.1))
    with pytest.raises(InputError, match="plain L2 threshold"):
        metrics.l2_to_squared(-1)
    with pytest.raises(InputError, match="squared L2 threshold"):
        metrics.squared_to_l2(-0.5)


# --------------------------------------------------------------------------- validation, perf sanity

@pytest.mark.parametrize("call", [
    lambda d, s: metrics.accuracy_at(d, s, 0.5),
    lambda d, s: metrics.select_threshold(d, s),
    lambda d, s: metrics.roc_curve(d, s),
    lambda d, s: metrics.roc_auc(d, s),
    lambda d, s: metrics.equal_error_rate(d, s),
    lambda d, s: metrics.val_far(d, s, 0.5),
    lambda d, s: metrics.threshold_at_far(d, s, 0.1),
    lambda d, s: metrics.confusion_matrix(d, s, 0.5),
])
def test_input_validation(call):
    with pytest.raises(InputError, match="equal lengths"):
        call([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(InputError, match="distances must be a 1-D"):
        call([[0.1, 0.2]], [True, False])
    with pytest.raises(InputError, match="same must be a 1-D"):
        call([0.1, 0.2], [[True, False]])
    with pytest.raises(InputError, match="distances must be finite"):
        call([0.1, np.nan], [True, False])
    with pytest.raises(InputError, match="distances must be finite"):
        call([0.1, np.inf], [True, False])
    with pytest.raises(InputError, match="distances is empty"):
        call([], [])
    with pytest.raises(InputError, match="same must be a bool"):
        call([0.1, 0.2], [0.5, 1.0])
    with pytest.raises(InputError, match="distances must be numbers"):
        call(["a", "b"], [True, False])


@pytest.mark.parametrize("call", [
    lambda d, s: metrics.roc_curve(d, s),
    lambda d, s: metrics.roc_auc(d, s),
    lambda d, s: metrics.equal_error_rate(d, s),
    lambda d, s: metrics.val_far(d, s, 0.5),
    lambda d, s: metrics.threshold_at_far(d, s, 0.1),
    lambda d, s: metrics.kfold_val_at_far(d, s, 0.1, folds=2),
])
def test_both_classes_required(call):
    with pytest.raises(InputError, match="at least one same .* and one different"):
        call([0.1, 0.2, 0.3, 0.4], [True] * 4)
    with pytest.raises(InputError, match="at least one same .* and one different"):
        call([0.1, 0.2, 0.3, 0.4], [False] * 4)


def test_other_argument_validation():
    d, s = [0.1, 0.2], [True, False]
    assert metrics.accuracy_at(d, [1, 0], 0.15) == 1.0            # 0/1 integers are accepted
    with pytest.raises(InputError, match="threshold must not be NaN"):
        metrics.accuracy_at(d, s, float("nan"))
    with pytest.raises(InputError, match="threshold must be a number"):
        metrics.val_far(d, s, "x")
    with pytest.raises(InputError, match="far_target must be in"):
        metrics.threshold_at_far(d, s, 1.5)
    with pytest.raises(InputError, match="thresholds must be a non-empty"):
        metrics.select_threshold(d, s, thresholds=[])
    with pytest.raises(InputError, match="thresholds must not contain NaN"):
        metrics.select_threshold(d, s, thresholds=[0.1, np.nan])
    with pytest.raises(InputError, match="same must be a bool"):
        metrics.accuracy_at(d, [2, 0], 0.15)


def test_all_metrics_on_6000_pairs():
    """The LFW protocol's size; runs every metric (no timing assertion)."""
    rng = np.random.default_rng(42)
    d, s = random_pairs(rng, 6000)
    d = np.clip(d, 0, 4)
    fold_ids = np.repeat(np.arange(10), 600)
    acc = metrics.kfold_accuracy(d, s, folds=10, fold_ids=fold_ids)
    grid = metrics.kfold_accuracy(d, s, folds=10, thresholds=np.arange(0, 4, 0.01), fold_ids=fold_ids)
    val = metrics.kfold_val_at_far(d, s, 1e-3, folds=10, fold_ids=fold_ids)
    fpr, tpr, thr = metrics.roc_curve(d, s)
    small = metrics.downsample_roc(fpr, tpr, thr)
    auc = metrics.roc_auc(d, s)
    eer, eer_t = metrics.equal_error_rate(d, s)
    t, best = metrics.select_threshold(d, s)
    cm = metrics.confusion_matrix(d, s, t)
    assert 0.7 < acc["mean"] <= best <= 1.0
    assert abs(grid["mean"] - acc["mean"]) < 0.01
    assert 0 <= val["val_mean"] <= 1 and 0 <= val["far_mean"] < 0.01
    assert len(small[0]) <= 300
    assert 0.8 < auc < 1.0 and 0 < eer < 0.5 and d.min() < eer_t < d.max()
    assert sum(map(sum, cm)) == 6000 and (cm[0][0] + cm[1][1]) / 6000 == pytest.approx(best)


def test_exhaustive_tiny_cases_against_reference():
    """Every labelling of 5 tied/untied distances: optimum, AUC and EER consistency."""
    for d in ([0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.1, 0.2, 0.2, 0.3]):
        for labels in itertools.product([True, False], repeat=5):
            t, acc = metrics.select_threshold(d, labels)
            assert acc == pytest.approx(ref_best_accuracy(d, labels, ref_candidates(d)))
            assert ref_accuracy(d, labels, t) == pytest.approx(acc)
            if 0 < sum(labels) < 5:
                assert metrics.roc_auc(d, labels) == pytest.approx(ref_auc(d, labels))
                eer, _ = metrics.equal_error_rate(d, labels)
                assert 0.0 <= eer <= 1.0


# --------------------------------------------------------------------------- what a figure rests on

def ref_threshold_at_far(d, s, target):
    """threshold_at_far by loops: FAR at every distinct distance (and above the largest), the largest
    threshold per FAR value, then a linear interpolation between the two FARs around the target."""
    candidates = sorted(set(d)) + [math.nextafter(max(d), math.inf)]
    n_diff = sum(1 for y in s if not y)
    best = {}
    for t in candidates:
        far = sum(1 for x, y in zip(d, s) if not y and x < t) / n_diff
        best[far] = max(best.get(far, -math.inf), t)
    fars = sorted(best)
    if target <= fars[0]:
        return best[fars[0]]
    for low, high in zip(fars, fars[1:]):
        if low <= target <= high:
            return best[low] + (target - low) / (high - low) * (best[high] - best[low])
    return best[fars[-1]]


@pytest.mark.parametrize("seed", range(4))
def test_far_reached_at_a_threshold_chosen_on_other_pairs_matches_loops(seed):
    """VAL@FAR as evaluate computes it: the threshold interpolated on validation pairs, VAL and the FAR
    it reaches counted on test pairs."""
    rng = np.random.default_rng(seed)
    vd, vs = random_pairs(rng, 400, ties=bool(seed % 2))
    td, ts = random_pairs(rng, 300, ties=bool(seed % 2))
    for target in (1e-3, 0.01, 0.05, 0.3):
        t = metrics.threshold_at_far(vd, vs, target)
        assert t == pytest.approx(ref_threshold_at_far(vd.tolist(), vs.tolist(), target), rel=1e-12, abs=1e-12)
        assert metrics.val_far(td, ts, t) == pytest.approx(ref_val_far(td.tolist(), ts.tolist(), t))


def test_kfold_val_at_far_with_stratified_folds_matches_loops():
    rng = np.random.default_rng(11)
    d, s = random_pairs(rng, 600, ties=False)
    ids = np.empty(600, dtype=np.int64)
    for mask in (s, ~s):
        members = np.flatnonzero(mask)
        ids[rng.permutation(members)] = np.arange(members.size) % 5
    for target in (0.01, 0.1):
        result = metrics.kfold_val_at_far(d, s, target, folds=5, fold_ids=ids)
        vals, fars = [], []
        for k in range(5):
            train = [i for i in range(600) if ids[i] != k]
            test = [i for i in range(600) if ids[i] == k]
            t = ref_threshold_at_far([d[i] for i in train], [bool(s[i]) for i in train], target)
            v, f = ref_val_far([d[i] for i in test], [bool(s[i]) for i in test], t)
            vals.append(v)
            fars.append(f)
        assert result["vals"] == pytest.approx(vals) and result["fars"] == pytest.approx(fars)
        assert result["far_mean"] == pytest.approx(sum(fars) / 5)


@pytest.mark.parametrize("far, need", [(1e-3, 1000), (1e-2, 100), (0.1, 10), (0.3, 4), (1e-4, 10_000),
                                       (1e-6, 1_000_000), (0.07, 15), (0.5, 2), (1.0, 1), (2.5e-3, 400),
                                       (1 / 49, 49), (1 / 98, 98), (1 / 103, 103)])
def test_min_different_pairs_is_the_ceiling_of_one_over_far(far, need):
    assert metrics.min_different_pairs(far) == need
    # The obvious reference: the fewest n with 1/n <= far (one accepted pair is a FAR of 1/n).
    assert min(n for n in range(1, 2 * need + 2) if 1 / n <= far * (1 + 1e-12)) == need


@pytest.mark.parametrize("far", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_min_different_pairs_refuses_what_no_pair_count_measures(far):
    with pytest.raises(InputError, match="far_target"):
        metrics.min_different_pairs(far)


def test_fewest_in_a_fold_against_a_loop():
    rng = np.random.default_rng(2)
    s = rng.random(200) < 0.3
    ids = rng.integers(0, 7, 200)
    same = [sum(1 for i in range(200) if ids[i] == k and s[i]) for k in set(ids.tolist())]
    diff = [sum(1 for i in range(200) if ids[i] == k and not s[i]) for k in set(ids.tolist())]
    assert metrics.fewest_in_a_fold(s, ids) == (min(same), min(diff))
    with pytest.raises(InputError, match="one entry per pair"):
        metrics.fewest_in_a_fold(s, ids[:5])


def test_accuracy_withheld_names_the_short_class_and_the_majority_score():
    # LFW's real pairs.txt on the pair identities it trained on: 900 same and 23 different pairs held out.
    assert metrics.accuracy_withheld(900, 23) == (
        "accuracy withheld: 23 different pairs (< 100); answering 'same' to all scores 0.975")
    assert metrics.accuracy_withheld(97, 97) == (
        "accuracy withheld: 97 same and 97 different pairs (< 100 each); answering 'same' to "
        "all scores 0.500")
    assert metrics.accuracy_withheld(5, 400) == (
        "accuracy withheld: 5 same pairs (< 100); answering 'different' to all scores 0.988")
    assert metrics.accuracy_withheld(metrics.MIN_CLASS_PAIRS, metrics.MIN_CLASS_PAIRS) == ""
    assert metrics.accuracy_withheld(3000, 3000) == ""
    assert metrics.accuracy_withheld(1500, 99).startswith("accuracy withheld: 99 different pairs")
    assert metrics.accuracy_withheld(10, 10, minimum=5) == ""
    with pytest.raises(InputError):
        metrics.accuracy_withheld(0, 0)


def test_accuracy_withheld_majority_score_against_counting():
    """The quoted score is the accuracy of answering the larger class for every pair, counted by a loop."""
    for n_same, n_diff in [(900, 23), (1, 99), (50, 150), (0, 10), (99, 0)]:
        same = [True] * n_same + [False] * n_diff
        answer = n_same >= n_diff
        score = sum(1 for y in same if y == answer) / len(same)
        assert metrics.accuracy_withheld(n_same, n_diff).endswith(f"all scores {score:.3f}")
