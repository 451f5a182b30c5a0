"""Margin-softmax objectives (ArcFace, CosFace, normalised softmax): the class-centre head and its loss, in keras.ops.

The head (`ClassCentres`) holds one centre w_c per training identity c,
[C, D]; its output is the cosine of each embedding x to each centre,
cos(theta_c) = x.w_c / (|x| |w_c|), [B, C]. It belongs to the trainer, not to
the embedding model: the exported model ends at the embeddings, and
checkpoints carry the centres and their optimizer state (`checkpoints`).

Logits, with s = train.scale and m = train.margin, y the true class:

    z_c = s cos(theta_c) for c != y, and for c = y
    arcface:  s phi(theta_y),  phi(theta) = cos(theta + m) while theta + m <= pi,
              else cos(theta) - m sin(m)   (insightface's threshold rule, below);
    cosface:  s (cos(theta_y) - m);
    softmax:  s cos(theta_y)   (no margin; train.margin is not used).

loss = mean over the batch of -log softmax(z)_y (cross-entropy).

insightface's rule near pi: cos(theta + m) stops falling once theta + m
passes pi (it rises again towards cos(pi + m) at theta = pi), so a sample
whose angle to its centre is beyond pi - m would be pushed the wrong way.
Past that threshold insightface (and this module) use cos(theta) - m sin(m),
the first-order expansion of cos(theta + m) at theta = pi - m, which keeps the
logit falling with theta; it jumps down by cos(m) + m sin(m) - 1 (0.117 for
m = 0.5) at the threshold, as insightface's does. ("easy margin", the other
insightface option, applies the margin only where cos(theta) > 0; not offered.)

Gradients: d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta) is
unbounded as theta -> 0, though the gradient with respect to the embedding,
where the normalisation contributes a factor sin(theta), is not; sin(theta) is
taken as sqrt(max(1 - cos^2, SIN_FLOOR)) so that product stays finite at
theta = 0 exactly.

Everything is computed in float32 whatever the input dtype (the head's layer
has a float32 policy; mixed precision feeds float16/bfloat16 embeddings): a
logit of s = 64 with float16's 11-bit mantissa is off by up to 0.03, and
exp() of logits overflows float16 past 11.

Validation batches hold other people than the head's rows, so validation
(no head output: `Objective.head_on_validation` is False) computes the same
loss with the batch's own class centres: for sample i, the centre of each
identity in the batch is the mean of that identity's unit embeddings, its own
identity's without sample i (leave one out), each identity counted once in
the softmax. Rows whose identity has one image in the batch are left out.

Memory and step cost of the head: C x D float32 weights plus Adam's two
moments, 12 C D bytes (CASIA-WebFace, C = 10,575 at D = 128: 16 MB; D = 512:
65 MB); a step's head costs about 3 x 2 B C D flops (forward, two backward
matmuls): 1.0 GFLOP at B = 128, D = 128, C = 10,575, a few per cent of
nn4_small2's 128-image step. In multi-device training (MirroredStrategy, JAX
DataParallel) the head is replicated on every device like every other weight,
not sharded.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from facenet_kfp.errors import InputError
from facenet_kfp.losses import _as_float32, _as_label_vector

KINDS = ("arcface", "cosface", "softmax")
# What each margin objective reports each step (with the trainer's COLLAPSE_STATISTICS).
STATISTICS = ("loss", "accuracy", "mean_true_cosine", "mean_other_cosine")
# Floor of sin^2(theta) in the ArcFace logit: keeps d/dcos finite at theta = 0 (module docstring).
SIN_FLOOR = 1e-12
# Floor of squared norms before dividing by them (a zero row of the centres or a zero embedding).
NORM_FLOOR = 1e-24


def l2_normalise(x, axis=-1):
    """x / |x| along `axis` in float32 (|x| floored at sqrt(NORM_FLOOR))."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), NORM_FLOOR))


class ClassCentres(keras.layers.Layer):
    """The class-centre head: [B, D] embeddings -> [B, C] cosines to C L2-normalised centres, in float32.

    The centres start as N(0, 1/D) rows (norm about 1, so an Adam step of lr per element turns a
    centre by about lr sqrt(D) radians); only their directions matter.
    """

    def __init__(self, classes: int, **kwargs):
        kwargs.setdefault("dtype", "float32")        # float32 under mixed precision too (module docstring)
        super().__init__(**kwargs)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise InputError(f"the class-centre head needs at least 2 training identities, got {classes!r}")
        self.classes = classes

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.centres = self.add_weight(shape=(self.classes, dim), name="centres",
                                       initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(dim)))

    def call(self, embeddings):
        return ops.matmul(l2_normalise(embeddings), ops.transpose(l2_normalise(self.centres)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.classes)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def class_centre_head(config, classes: int | None = None) -> ClassCentres:
    """The head of the margin objectives: one centre per training identity (`classes`, from the train split)."""
    if classes is None:
        raise InputError(f"train.loss {config.loss} needs the number of training identities to build its "
                         f"class-centre head")
    return ClassCentres(int(classes), name="class_centres")


# ----------------------------------------------------------------------------- logits and loss

def target_cosine(kind: str, cos_true, margin: float):
    """The margin-adjusted cosine of the true class, phi (module docstring), float32 like `cos_true`."""
    if kind == "softmax":
        return cos_true
    if kind == "cosface":
        return cos_true - float(margin)
    if kind != "arcface":
        raise InputError(f"margin-softmax kind must be one of {', '.join(KINDS)}, got {kind!r}")
    m = float(margin)
    sin_true = ops.sqrt(ops.maximum(1.0 - ops.square(cos_true), SIN_FLOOR))
    beyond = cos_true - m * math.sin(m)                  # theta + m past pi: insightface's threshold rule
    return ops.where(cos_true > math.cos(math.pi - m), cos_true * math.cos(m) - sin_true * math.sin(m), beyond)


def _margin_softmax(cosines, true_mask, log_weights, kind: str, scale: float, margin: float, rows=None):
    """Loss and statistics of cosines [B, N] whose true columns are `true_mask` [B, N] (1.0 / 0.0, all
    columns of a row's class: one with a head, several with batch centres), columns weighted by
    exp(log_weights) [N] in the softmax (0: one column per class); `rows` [B] 1.0 / 0.0 picks the rows that
    count (None: all)."""
    cos = ops.clip(cosines, -1.0, 1.0)
    count_true = ops.sum(true_mask, axis=1)
    cos_true = ops.sum(cos * true_mask, axis=1) / ops.maximum(count_true, 1.0)
    target = target_cosine(kind, cos_true, margin)
    logits = scale * (cos + true_mask * ops.expand_dims(target - cos_true, 1))
    per_row = ops.logsumexp(logits + ops.expand_dims(log_weights, 0), axis=1) - scale * target
    others = 1.0 - true_mask
    best_other = ops.max(ops.where(others > 0, cos, -2.0), axis=1)
    weights = others * ops.exp(ops.expand_dims(log_weights, 0))
    mean_other = ops.sum(weights * cos, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1e-12)
    rows = ops.ones_like(cos_true) if rows is None else rows
    n = ops.maximum(ops.sum(rows), 1.0)

    def mean(values):
        return ops.sum(values * rows) / n

    return {"loss": mean(per_row), "accuracy": mean(ops.cast(ops.greater(cos_true, best_other), "float32")),
            "mean_true_cosine": mean(cos_true), "mean_other_cosine": mean(mean_other)}


def margin_logits(cosines, labels, kind: str, scale: float, margin: float):
    """The logits z [B, C] float32 of head cosines [B, C] and labels [B] in 0..C-1 (module docstring)."""
    cos = ops.clip(ops.cast(cosines, "float32"), -1.0, 1.0)
    onehot = ops.one_hot(_as_label_vector(labels), ops.shape(cos)[1], dtype="float32")
    cos_true = ops.sum(cos * onehot, axis=1)
    return scale * (cos + onehot * ops.expand_dims(target_cosine(kind, cos_true, margin) - cos_true, 1))


def margin_softmax_loss(cosines, labels, kind: str, scale: float, margin: float) -> dict:
    """{"loss", "accuracy", "mean_true_cosine", "mean_other_cosine"} of head cosines [B, C] and labels [B]
    (train-class indices 0..C-1), float32 scalars: loss = mean_i -log softmax(z_i)_(y_i); accuracy: the
    fraction whose nearest centre is their own (no margin); the mean cosine to the own centre, and to
    the others."""
    cosines = ops.cast(cosines, "float32")
    labels = _as_label_vector(labels)
    onehot = ops.one_hot(labels, ops.shape(cosines)[1], dtype="float32")
    return _margin_softmax(cosines, onehot, ops.zeros((ops.shape(cosines)[1],), "float32"), kind, scale, margin)


def batch_centre_loss(embeddings, labels, kind: str, scale: float, margin: float) -> dict:
    """`margin_softmax_loss` with the batch's own identities as classes (validation, module docstring):
    the centre of identity c seen from sample i is the mean of c's unit embeddings in the batch, sample i
    left out of its own; rows of an identity with one image in the batch do not count."""
    x = l2_normalise(_as_float32(embeddings))
    labels = _as_label_vector(labels)
    same = ops.cast(ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0)), "float32")  # [i, j]
    sums = ops.matmul(same, x)                       # row j: the sum of j's identity's unit embeddings
    counts = ops.sum(same, axis=1)                   # n_j
    dots = ops.matmul(x, ops.transpose(sums))        # x_i . S_j
    # |S_j - [same] x_i|^2 = |S_j|^2 - 2 [same] x_i.S_j + [same]   (|x_i| = 1)
    norms2 = ops.expand_dims(ops.sum(ops.square(sums), axis=1), 0) - 2.0 * same * dots + same
    cosines = (dots - same) * ops.rsqrt(ops.maximum(norms2, NORM_FLOOR))
    rows = ops.cast(ops.greater(counts, 1.0), "float32")
    return _margin_softmax(cosines, same, -ops.log(counts), kind, scale, margin, rows)


# ----------------------------------------------------------------------------- the objectives' loss code

def _objective(kind: str, labels, embeddings, config, head_output) -> dict:
    scale, margin = float(config.scale), float(config.margin)
    if head_output is None:
        return batch_centre_loss(embeddings, labels, kind, scale, margin)
    return margin_softmax_loss(head_output, labels, kind, scale, margin)


def arcface_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss arcface: s cos(theta_y + m) for the true class (insightface's rule near pi), cross-entropy."""
    return _objective("arcface", labels, embeddings, config, head_output)


def cosface_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss cosface: s (cos(theta_y) - m) for the true class, cross-entropy."""
    return _objective("cosface", labels, embeddings, config, head_output)


def softmax_objective(labels, embeddings, config, head_output=None) -> dict:
    """train.loss softmax: s cos(theta_c) for every class (normalised softmax, no margin), cross-entropy."""
    return _objective("softmax", labels, embeddings, config, head_output)
