"""Triplet losses with online mining inside a batch (batch all, batch hard, semi-hard), in keras.ops only.

Every function takes `labels` of shape [B] (or [B, 1]) of integer identity ids
and `embeddings` of shape [B, D], and works on any Keras backend (TensorFlow in
the pipeline, JAX for GPU measurements): no `tf.*` here. Distances and losses
are computed in float32 whatever the input dtype (mixed precision feeds
float16/bfloat16 embeddings) and returned as float32 scalars.

Notation: d(i, j) is the distance between embeddings i and j, squared L2
(`squared=True`, FaceNet) or plain L2; a positive pair (a, p) has
label(a) = label(p) and a != p; a negative n of anchor a has
label(n) != label(a). A batch without a valid triplet (all singletons, or all
one identity) gives loss 0 with finite, zero gradients, never NaN.

Memory: batch all and semi-hard build a [B, B, B] tensor (B = 128 is 2M floats).

The `<mining>_objective` functions at the end are what `objectives.OBJECTIVES`
names for train.loss: the loss and its `triplet_statistics` in the config's
distance. (Training calls them from `trainer.EmbeddingTrainer.compute_loss`, not
through a keras.losses.Loss: one step reports the loss with its statistics.)
"""

from __future__ import annotations

import logging

from keras import ops

from facenet_kfp.errors import InputError

log = logging.getLogger(__name__)

# Added under the square root where a distance is exactly 0, so the gradient
# of sqrt there is finite; the (1 - mask) factor then zeroes both value and gradient.
_SQRT_EPS = 1e-16


def _as_float32(embeddings):
    """[B, D] embeddings as float32 (mixed precision hands us float16/bfloat16)."""
    embeddings = ops.convert_to_tensor(embeddings)
    if len(embeddings.shape) != 2:
        raise InputError(f"embeddings must have shape [batch, dim], got shape {tuple(embeddings.shape)}")
    if embeddings.dtype != "float32":
        embeddings = ops.cast(embeddings, "float32")
    return embeddings


def _as_label_vector(labels):
    """Labels of shape [B] or [B, 1] as a [B] tensor."""
    labels = ops.convert_to_tensor(labels)
    shape = tuple(labels.shape)
    if len(shape) == 2 and shape[1] == 1:
        labels = ops.reshape(labels, (-1,))
    elif len(shape) != 1:
        raise InputError(f"labels must have shape [batch] or [batch, 1], got shape {shape}")
    return labels


def _prepare(labels, embeddings):
    labels = _as_label_vector(labels)
    embeddings = _as_float32(embeddings)
    n_labels, n_embeddings = labels.shape[0], embeddings.shape[0]
    if n_labels is not None and n_embeddings is not None and n_labels != n_embeddings:
        raise InputError(f"labels ({n_labels}) and embeddings ({n_embeddings}) differ in batch size")
    return labels, embeddings


def _pair_masks(labels):
    """Boolean [B, B] masks: positive pairs (same label, a != p) and negatives (different label)."""
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(labels)[0]), "bool"))
    return ops.logical_and(same, not_self), ops.logical_not(same)


def _safe_mean(total, count):
    """total / count, and 0 when count is 0 (total is then 0 as well)."""
    count = ops.cast(count, "float32")
    return total / ops.maximum(count, 1.0)


def pairwise_distances(embeddings, squared: bool = False):
    """Pairwise distances between the rows of `embeddings`: [B, D] -> [B, B] float32.

    d²(i, j) = |x_i|² − 2 x_i·x_j + |x_j|² from the Gram matrix, clamped at 0
    (rounding makes it slightly negative for near-identical rows); the diagonal
    is exactly 0. With `squared=False` the plain L2 distance sqrt(d²) is taken
    through a guard, sqrt(d² + ε·[d² = 0]) · (1 − [d² = 0]), so the gradient at
    0 is 0 rather than NaN.
    """
    x = _as_float32(embeddings)
    gram = ops.matmul(x, ops.transpose(x))
    sq_norms = ops.sum(ops.square(x), axis=1)
    d2 = ops.expand_dims(sq_norms, 1) - 2.0 * gram + ops.expand_dims(sq_norms, 0)
    d2 = ops.maximum(d2, 0.0)
    d2 = d2 * (1.0 - ops.eye(ops.shape(x)[0], dtype="float32"))
    if squared:
        return d2
    zero = ops.cast(ops.equal(d2, 0.0), "float32")
    return ops.sqrt(d2 + zero * _SQRT_EPS) * (1.0 - zero)


def _triplet_matrix(labels, distances, margin):
    """Hinge loss of every triplet and its validity, both [B(a), B(p), B(n)].

    loss[a, p, n] = max(d(a, p) − d(a, n) + margin, 0), zeroed where the triplet is not valid.
    """
    pos_mask, neg_mask = _pair_masks(labels)
    valid = ops.logical_and(ops.expand_dims(pos_mask, 2), ops.expand_dims(neg_mask, 1))
    hinge = ops.expand_dims(distances, 2) - ops.expand_dims(distances, 1) + margin
    return ops.where(valid, ops.maximum(hinge, 0.0), 0.0), valid


def batch_all_triplet_loss(labels, embeddings, margin, squared=False):
    """Batch-all triplet loss (Moindrot): mean over the triplets with a positive loss.

    Over every valid triplet (a, p, n) of the batch, l = max(d(a,p) − d(a,n) + margin, 0);
    loss = Σ l / #{l > 0} (0 when no triplet has l > 0).

    Returns (loss, fraction_positive_triplets), both float32 scalars; the fraction
    is #{l > 0} / #valid triplets (0 when there is no valid triplet).
    """
    labels, embeddings = _prepare(labels, embeddings)
    margin = ops.cast(margin, "float32")
    distances = pairwise_distances(embeddings, squared=squared)
    losses, valid = _triplet_matrix(labels, distances, margin)
    num_positive = ops.sum(ops.cast(ops.greater(losses, 0.0), "float32"))
    num_valid = ops.sum(ops.cast(valid, "float32"))
    loss = _safe_mean(ops.sum(losses), num_positive)
    fraction = _safe_mean(num_positive, num_valid)
    return loss, fraction


def batch_hard_triplet_loss(labels, embeddings, margin, squared=False):
    """Batch-hard triplet loss (Hermans et al.): the hardest positive and negative per anchor.

    For anchor a: hp(a) = max d(a, p) over its positives, hn(a) = min d(a, n) over its
    negatives; loss = mean over anchors with at least one positive and one negative of
    max(hp(a) − hn(a) + margin, 0), a float32 scalar (0 when there is no such anchor).
    """
    labels, embeddings = _prepare(labels, embeddings)
    margin = ops.cast(margin, "float32")
    distances = pairwise_distances(embeddings, squared=squared)
    pos_mask, neg_mask = _pair_masks(labels)
    # Distances are >= 0, so 0 is neutral for the max over positives.
    hardest_positive = ops.max(ops.where(pos_mask, distances, 0.0), axis=1)
    # Any value >= every distance is neutral for the min over negatives; no gradient through it.
    ceiling = ops.stop_gradient(ops.max(distances))
    hardest_negative = ops.min(ops.where(neg_mask, distances, ceiling), axis=1)
    anchors = ops.logical_and(ops.any(pos_mask, axis=1), ops.any(neg_mask, axis=1))
    losses = ops.maximum(hardest_positive - hardest_negative + margin, 0.0)
    losses = ops.where(anchors, losses, 0.0)
    return _safe_mean(ops.sum(losses), ops.sum(ops.cast(anchors, "float32")))


def semi_hard_triplet_loss(labels, embeddings, margin, squared=True):
    """Semi-hard triplet loss (FaceNet), with TF-Addons `TripletSemiHardLoss` semantics.

    For each positive pair (a, p) the negative is the nearest negative farther than
    the positive, n* = argmin {d(a, n) : d(a, n) > d(a, p)}; when there is none, the
    farthest negative of a. loss = mean over positive pairs of
    max(d(a, p) − d(a, n*) + margin, 0), a float32 scalar. TF-Addons uses squared L2
    by default, hence `squared=True`. Where TF-Addons gives NaN (no positive pair) or
    a non-zero loss (one identity, no negatives at all), this returns 0.
    """
    labels, embeddings = _prepare(labels, embeddings)
    margin = ops.cast(margin, "float32")
    distances = pairwise_distances(embeddings, squared=squared)
    pos_mask, neg_mask = _pair_masks(labels)
    d_ap = ops.expand_dims(distances, 2)       # [a, p, 1]
    d_an = ops.expand_dims(distances, 1)       # [a, 1, n]
    farther = ops.logical_and(ops.expand_dims(neg_mask, 1), ops.greater(d_an, d_ap))   # [a, p, n]
    ceiling = ops.stop_gradient(ops.max(distances))
    nearest_farther = ops.min(ops.where(farther, d_an, ceiling), axis=2)               # [a, p]
    farthest = ops.max(ops.where(neg_mask, distances, 0.0), axis=1, keepdims=True)     # [a, 1]
    chosen = ops.where(ops.any(farther, axis=2), nearest_farther, farthest)
    pairs = ops.logical_and(pos_mask, ops.expand_dims(ops.any(neg_mask, axis=1), 1))
    losses = ops.where(pairs, ops.maximum(distances - chosen + margin, 0.0), 0.0)
    return _safe_mean(ops.sum(losses), ops.sum(ops.cast(pairs, "float32")))


def triplet_statistics(labels, embeddings, margin, squared):
    """Batch statistics for logging, as float32 scalars.

    fraction_positive_triplets: valid triplets with a positive hinge / valid triplets;
    mean_positive_distance: mean d(a, p) over positive pairs (a != p);
    mean_negative_distance: mean d(a, n) over pairs with different labels.
    Each is 0 when the batch has no such triplet or pair.
    """
    labels, embeddings = _prepare(labels, embeddings)
    margin = ops.cast(margin, "float32")
    distances = pairwise_distances(embeddings, squared=squared)
    losses, valid = _triplet_matrix(labels, distances, margin)
    pos_mask, neg_mask = _pair_masks(labels)

    def masked_mean(values, mask):
        return _safe_mean(ops.sum(ops.where(mask, values, 0.0)), ops.sum(ops.cast(mask, "float32")))

    num_positive = ops.sum(ops.cast(ops.greater(losses, 0.0), "float32"))
    return {
        "fraction_positive_triplets": _safe_mean(num_positive, ops.sum(ops.cast(valid, "float32"))),
        "mean_positive_distance": masked_mean(distances, pos_mask),
        "mean_negative_distance": masked_mean(distances, neg_mask),
    }


# ----------------------------------------------------------------------------- the objectives' loss code

def _with_statistics(loss, labels, embeddings, config) -> dict:
    return {"loss": loss, **triplet_statistics(labels, embeddings, config.margin, config.squared)}


def batch_all_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss batch_all: `batch_all_triplet_loss` with config.margin and config.squared, and its statistics."""
    loss, _ = batch_all_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    return _with_statistics(loss, labels, embeddings, config)


def batch_hard_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss batch_hard: `batch_hard_triplet_loss` with config.margin and config.squared, and its statistics."""
    loss = batch_hard_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    return _with_statistics(loss, labels, embeddings, config)


def semi_hard_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss semi_hard: `semi_hard_triplet_loss` with config.margin and config.squared, and its statistics."""
    loss = semi_hard_triplet_loss(labels, embeddings, config.margin, squared=config.squared)
    return _with_statistics(loss, labels, embeddings, config)
