"""Triplet losses checked against slow NumPy triple loops, plus edge cases, dtypes and the objectives' loss code."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from facenet_kfp import config, margin_losses, objectives
from facenet_kfp.config import TrainConfig
from facenet_kfp.errors import InputError
from facenet_kfp.losses import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    pairwise_distances,
    semi_hard_triplet_loss,
    triplet_statistics,
)


# ---------------------------------------------------------------- slow references (float64 loops)

def ref_distances(emb, squared):
    n = len(emb)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = emb[i].astype(np.float64) - emb[j].astype(np.float64)
            d[i, j] = float(np.dot(diff, diff)) if squared else float(np.sqrt(np.dot(diff, diff)))
    return d


def ref_batch_all(labels, emb, margin, squared):
    d = ref_distances(emb, squared)
    n = len(labels)
    total, positive, valid = 0.0, 0, 0
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for k in range(n):
                if labels[k] == labels[a]:
                    continue
                valid += 1
                loss = max(d[a, p] - d[a, k] + margin, 0.0)
                if loss > 0:
                    positive += 1
                    total += loss
    return (total / positive if positive else 0.0), (positive / valid if valid else 0.0)


def ref_batch_hard(labels, emb, margin, squared):
    d = ref_distances(emb, squared)
    n = len(labels)
    losses = []
    for a in range(n):
        pos = [d[a, p] for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [d[a, k] for k in range(n) if labels[k] != labels[a]]
        if pos and neg:
            losses.append(max(max(pos) - min(neg) + margin, 0.0))
    return float(np.mean(losses)) if losses else 0.0


def ref_semi_hard(labels, emb, margin, squared):
    """TF-Addons' test reference: the first sorted negative beyond d(a,p), else the largest."""
    d = ref_distances(emb, squared)
    n = len(labels)
    total, pairs = 0.0, 0
    for a in range(n):
        negatives = sorted(d[a, k] for k in range(n) if labels[k] != labels[a])
        if not negatives:
            continue
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            pairs += 1
            chosen = next((v for v in negatives if v > d[a, p]), negatives[-1])
            total += max(d[a, p] - chosen + margin, 0.0)
    return total / pairs if pairs else 0.0


def ref_statistics(labels, emb, margin, squared):
    d = ref_distances(emb, squared)
    n = len(labels)
    pos = [d[a, p] for a in range(n) for p in range(n) if a != p and labels[a] == labels[p]]
    neg = [d[a, k] for a in range(n) for k in range(n) if labels[a] != labels[k]]
    return {
        "fraction_positive_triplets": ref_batch_all(labels, emb, margin, squared)[1],
        "mean_positive_distance": float(np.mean(pos)) if pos else 0.0,
        "mean_negative_distance": float(np.mean(neg)) if neg else 0.0,
    }


# ---------------------------------------------------------------- random batches

def random_batch(seed, batch_size, normalise, dim=8):
    rng = np.random.default_rng(seed)
    # Few classes relative to the batch, so most labels repeat but singletons occur too.
    labels = rng.integers(0, max(2, batch_size // 3), size=batch_size)
    emb = rng.normal(size=(batch_size, dim)).astype(np.float32)
    if normalise:
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    else:
        emb *= 0.4
    return labels, emb


CASES = [
    (seed, batch_size, margin, squared, normalise)
    for seed, (batch_size, margin, squared, normalise) in enumerate(itertools.product(
        (4, 9, 24, 40), (0.1, 0.2, 0.5, 1.0), (True, False), (True, False)))
    if seed % 3 == 0          # a spread-out third of the 64 combinations
]
CASE_IDS = [f"B{b}-m{m}-{'sq' if s else 'l2'}-{'unit' if u else 'raw'}" for _, b, m, s, u in CASES]


def value(x):
    return float(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("batch_size", [1, 5, 17])
def test_pairwise_distances_match_reference(batch_size, squared):
    _, emb = random_batch(batch_size, batch_size, normalise=False)
    got = keras.ops.convert_to_numpy(pairwise_distances(emb, squared=squared))
    assert got.dtype == np.float32 and got.shape == (batch_size, batch_size)
    np.testing.assert_allclose(got, ref_distances(emb, squared), rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(got) == 0.0)
    assert np.all(got >= 0.0)


@pytest.mark.parametrize("seed,batch_size,margin,squared,normalise", CASES, ids=CASE_IDS)
def test_batch_all_matches_reference(seed, batch_size, margin, squared, normalise):
    labels, emb = random_batch(seed, batch_size, normalise)
    loss, fraction = batch_all_triplet_loss(labels, emb, margin, squared=squared)
    want_loss, want_fraction = ref_batch_all(labels, emb, margin, squared)
    assert value(loss) == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    assert value(fraction) == pytest.approx(want_fraction, abs=1e-6)


@pytest.mark.parametrize("seed,batch_size,margin,squared,normalise", CASES, ids=CASE_IDS)
def test_batch_hard_matches_reference(seed, batch_size, margin, squared, normalise):
    labels, emb = random_batch(seed, batch_size, normalise)
    loss = batch_hard_triplet_loss(labels, emb, margin, squared=squared)
    assert value(loss) == pytest.approx(ref_batch_hard(labels, emb, margin, squared), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed,batch_size,margin,squared,normalise", CASES, ids=CASE_IDS)
def test_semi_hard_matches_reference(seed, batch_size, margin, squared, normalise):
    labels, emb = random_batch(seed, batch_size, normalise)
    loss = semi_hard_triplet_loss(labels, emb, margin, squared=squared)
    assert value(loss) == pytest.approx(ref_semi_hard(labels, emb, margin, squared), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed,batch_size,margin,squared,normalise", CASES[::3], ids=CASE_IDS[::3])
def test_statistics_match_reference(seed, batch_size, margin, squared, normalise):
    labels, emb = random_batch(seed, batch_size, normalise)
    got = triplet_statistics(labels, emb, margin, squared)
    want = ref_statistics(labels, emb, margin, squared)
    assert set(got) == set(want)
    for key in want:
        assert value(got[key]) == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_semi_hard_picks_the_nearest_farther_negative():
    # 1-D embeddings make the mining rule visible: anchor 0 at 0, positive at 1,
    # negatives at 0.5 (closer than the positive), 2 and 3 (farther).
    labels = np.array([0, 0, 1, 2, 3])
    emb = np.array([[0.0], [1.0], [0.5], [2.0], [3.0]], np.float32)
    # Pair (0,1): d_ap=1, semi-hard negative d=4 (2.0²) → max(1-4+m, 0).
    # Pair (1,0): d_ap=1, negatives of 1 at d=0.25, 1, 4 → nearest farther is 4 → max(1-4+m, 0).
    margin = 3.5
    assert value(semi_hard_triplet_loss(labels, emb, margin, squared=True)) == pytest.approx(0.5)
    # With the positive beyond every negative, the farthest negative is used.
    emb_far = np.array([[0.0], [10.0], [0.5], [2.0], [3.0]], np.float32)
    # Pair (0,1): d_ap=100, farthest negative 9 → 100-9+m; pair (1,0): negatives of 1 at
    # 90.25, 64, 49, none beyond 100 → farthest 90.25 → 100-90.25+m.
    want = ((100 - 9 + 0.2) + (100 - 90.25 + 0.2)) / 2
    assert value(semi_hard_triplet_loss(labels, emb_far, 0.2, squared=True)) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- edge cases

def all_losses(labels, emb, margin=0.2, squared=False):
    loss_all, fraction = batch_all_triplet_loss(labels, emb, margin, squared=squared)
    return {
        "batch_all": loss_all,
        "fraction": fraction,
        "batch_hard": batch_hard_triplet_loss(labels, emb, margin, squared=squared),
        "semi_hard": semi_hard_triplet_loss(labels, emb, margin, squared=squared),
    }


def gradients(labels, emb, squared):
    """d loss / d embeddings for each loss, via TensorFlow (the backend these tests run on)."""
    x = tf.Variable(emb)
    out = {}
    for name, fn in (("batch_all", lambda e: batch_all_triplet_loss(labels, e, 0.2, squared)[0]),
                     ("batch_hard", lambda e: batch_hard_triplet_loss(labels, e, 0.2, squared)),
                     ("semi_hard", lambda e: semi_hard_triplet_loss(labels, e, 0.2, squared))):
        with tf.GradientTape() as tape:
            loss = fn(x)
        out[name] = (loss.numpy(), tape.gradient(loss, x).numpy())
    return out


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("labels", [np.arange(6), np.zeros(6, int)], ids=["singletons", "one_class"])
def test_no_valid_triplet_gives_zero_loss_and_zero_gradient(labels, squared):
    _, emb = random_batch(3, 6, normalise=True)
    for name, v in all_losses(labels, emb, squared=squared).items():
        assert value(v) == 0.0, name
    for name, (loss, grad) in gradients(labels, emb, squared).items():
        assert loss == 0.0, name
        assert np.all(np.isfinite(grad)) and np.all(grad == 0.0), name


@pytest.mark.parametrize("squared", [True, False])
def test_one_pair_plus_singletons(squared):
    labels = np.array([7, 7, 1, 2, 3, 4])
    _, emb = random_batch(5, 6, normalise=True)
    got = all_losses(labels, emb, margin=0.5, squared=squared)
    want_all, want_fraction = ref_batch_all(labels, emb, 0.5, squared)
    assert value(got["batch_all"]) == pytest.approx(want_all, rel=1e-5)
    assert value(got["fraction"]) == pytest.approx(want_fraction)
    assert value(got["batch_hard"]) == pytest.approx(ref_batch_hard(labels, emb, 0.5, squared), rel=1e-5)
    assert value(got["semi_hard"]) == pytest.approx(ref_semi_hard(labels, emb, 0.5, squared), rel=1e-5)


def test_identical_embeddings_have_finite_gradients_for_plain_l2():
    labels = np.array([0, 0, 1, 1, 2, 2])
    emb = np.tile(np.array([[0.6, 0.8, 0.0]], np.float32), (6, 1))
    d = keras.ops.convert_to_numpy(pairwise_distances(emb, squared=False))
    assert np.all(d == 0.0)
    for name, (loss, grad) in gradients(labels, emb, squared=False).items():
        # Every distance is 0, so every triplet sits exactly at the margin.
        assert loss == pytest.approx(0.2), name
        assert np.all(np.isfinite(grad)), name
    # Partly duplicated rows (distance 0 between some pairs, > 0 elsewhere).
    emb2 = random_batch(9, 6, normalise=True)[1]
    emb2[1] = emb2[0]
    emb2[3] = emb2[2]
    for name, (_, grad) in gradients(labels, emb2, squared=False).items():
        assert np.all(np.isfinite(grad)), name


def test_gradient_of_pairwise_distance_is_finite_at_zero():
    x = tf.Variable(np.ones((3, 4), np.float32))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(pairwise_distances(x, squared=False))
    grad = tape.gradient(total, x).numpy()
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype,tolerance", [("float16", 2e-2), ("bfloat16", 6e-2)])
@pytest.mark.parametrize("squared", [True, False])
def test_low_precision_inputs_give_float32_results_close_to_float32(dtype, tolerance, squared):
    labels, emb = random_batch(11, 24, normalise=True)
    full = all_losses(labels, emb, margin=0.2, squared=squared)
    low = all_losses(labels, keras.ops.cast(emb, dtype), margin=0.2, squared=squared)
    for name in full:
        assert keras.ops.convert_to_numpy(low[name]).dtype == np.float32, name
        assert np.isfinite(value(low[name])), name
        assert value(low[name]) == pytest.approx(value(full[name]), abs=tolerance), name
    stats = triplet_statistics(labels, keras.ops.cast(emb, dtype), 0.2, squared)
    assert all(keras.ops.convert_to_numpy(v).dtype == np.float32 for v in stats.values())


def test_labels_of_shape_b_by_1_are_accepted():
    labels, emb = random_batch(2, 12, normalise=True)
    column = labels.reshape(-1, 1)
    for fn in (batch_hard_triplet_loss, semi_hard_triplet_loss):
        assert value(fn(column, emb, 0.2)) == pytest.approx(value(fn(labels, emb, 0.2)))
    assert value(batch_all_triplet_loss(column, emb, 0.2)[0]) == pytest.approx(
        value(batch_all_triplet_loss(labels, emb, 0.2)[0]))


def test_bad_shapes_raise_input_error():
    labels, emb = random_batch(2, 6, normalise=True)
    with pytest.raises(InputError, match="embeddings"):
        batch_hard_triplet_loss(labels, emb[None], 0.2)
    with pytest.raises(InputError, match="labels"):
        batch_hard_triplet_loss(labels.reshape(2, 3), emb, 0.2)
    with pytest.raises(InputError, match=r"\(5\) and embeddings \(6\)"):
        batch_all_triplet_loss(labels[:5], emb, 0.2)


# ---------------------------------------------------------------- the objectives' loss code

REFERENCES = {"batch_all": lambda *a: ref_batch_all(*a)[0], "batch_hard": ref_batch_hard, "semi_hard": ref_semi_hard}
# The margin-softmax objectives' references are in tests/test_margin_losses.py.
TRIPLET_OBJECTIVES = objectives.TRIPLET_NAMES


def test_every_objective_has_a_reference():
    assert set(REFERENCES) == set(TRIPLET_OBJECTIVES)
    assert set(TRIPLET_OBJECTIVES) | set(margin_losses.KINDS) == set(objectives.NAMES) == set(config.LOSSES)
    assert set(margin_losses.KINDS) == set(objectives.MARGIN_NAMES)
    assert all(objectives.get(name).pk_batches for name in TRIPLET_OBJECTIVES)


@pytest.mark.parametrize("name", TRIPLET_OBJECTIVES)
@pytest.mark.parametrize("squared", [True, False])
def test_objective_function_is_its_loss_and_statistics(name, squared):
    """What the table names for train.loss: the mining function's loss and `triplet_statistics`, in the
    configured distance, each against the slow reference."""
    labels, emb = random_batch(4, 16, normalise=True)
    settings = TrainConfig(loss=name, margin=0.3, squared=squared)
    out = objectives.get(name).function(labels, emb, settings, None)
    assert list(out) == list(objectives.get(name).statistics)
    assert value(out["loss"]) == pytest.approx(REFERENCES[name](labels, emb, 0.3, squared), rel=1e-4, abs=1e-6)
    for key, want in ref_statistics(labels, emb, 0.3, squared).items():
        assert value(out[key]) == pytest.approx(want, rel=1e-4, abs=1e-6), key
