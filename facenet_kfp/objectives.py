"""The table of training objectives (train.loss): what each needs, reports and bounds, and its distance.

One entry per objective; adding one is an entry in `OBJECTIVES` plus its own
loss code. The table itself imports neither Keras nor TensorFlow (the config
reads it): an entry names its loss code as "module:function", imported only
when training resolves it (`Objective.function`).

An objective's function takes (labels [B] int, embeddings [B, D] float32,
config, head_output) and returns a dict of float32 scalars holding at least its
`statistics` ("loss" first); the trainer adds COLLAPSE_STATISTICS (plain L2
between the batch's embeddings, for the collapse check) to every objective's.
`head_output` is None unless the objective declares a head: a Keras layer on
the embeddings, built by the "module:function" named in `Objective.head` from
the config and the number of training identities, whose weights train with the embedding network and are
checkpointed with it (a margin-softmax objective's class centres, say: its
output the cosine of each embedding to each centre). The trainer computes the
head's output in its forward pass, where every backend has the head's weights
(under JAX, `fit` holds them outside the variables), and hands it to the loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable

from facenet_kfp.errors import InputError

# A model's distance, by name (model.json's distance.name): squared L2 or plain L2 between unit
# vectors for the triplet objectives (train.squared), cosine for margin-softmax objectives.
DISTANCES = ("squared_l2", "l2", "cosine")
# The largest distance between unit vectors, per distance.
MAX_DISTANCE = {"squared_l2": 4.0, "l2": 2.0, "cosine": 2.0}
# What every triplet objective reports each step (the history's, TensorBoard's and the log line's values).
TRIPLET_STATISTICS = ("loss", "fraction_positive_triplets", "mean_positive_distance", "mean_negative_distance")
# What the trainer adds for every objective: plain L2 between distinct rows, for the collapse check.
COLLAPSE_STATISTICS = ("mean_pairwise_l2", "max_pairwise_l2")


def triplet_distance(config: Any) -> str:
    """The triplet objectives' distance: "squared_l2" when train.squared, else "l2"."""
    return "squared_l2" if config.squared else "l2"


def triplet_loss_bound(config: Any) -> float:
    """The largest triplet loss of unit vectors: max(d(a,p) - d(a,n) + margin, 0) <= the largest distance + margin
    (4 + margin in squared L2, 2 + margin in plain L2); a mean of such hinges is bounded the same."""
    return MAX_DISTANCE[triplet_distance(config)] + float(config.margin)


def triplet_divergence_rise(config: Any) -> tuple[float, str]:
    """The triplet objectives' divergence allowance (`TrainingMonitor`): one margin, and how to name it."""
    return float(config.margin), f"train.margin={config.margin:g}"


def _resolve(reference: str, what: str) -> Any:
    """The object a "module:attribute" reference names, imported now."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise InputError(f"{what} must be 'module:attribute', got {reference!r}")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective (a value of train.loss).

    name: the train.loss value; summary: one line for the config's help and model.json readers;
    loss: "module:function" of its loss code (see the module docstring), imported lazily;
    pk_batches: needs P x K batches (P identities x K images: its loss compares images of one
    identity within the batch), so a replica must get whole identities;
    statistics: the names of what it reports each step, "loss" first (logged, validated, in history
    and TensorBoard; COLLAPSE_STATISTICS come on top);
    loss_bound: config -> the largest value its loss can take (math.inf when unbounded): the training
    monitor refuses a larger one, and a bounded loss diverges as a lasting rise, not a blow-up;
    distance: config -> the name (DISTANCES) of the distance its embeddings are compared with;
    head: "module:function" building its trainable head (a Keras layer) from the config and the number of
    training identities, (config, classes) -> layer (`build_head`), or None;
    head_on_validation: validation hands the loss the head's output (False: None, for a head whose
    rows are the training identities, which the validation identities are not; the loss then
    compares the validation batch with itself);
    divergence_rise: config -> (how far the windowed mean loss may rise above its lowest before the
    monitor calls it divergence, the words that name that amount in its message).
    """
    name: str
    summary: str
    loss: str
    distance: Callable[[Any], str]
    loss_bound: Callable[[Any], float]
    pk_batches: bool = True
    statistics: tuple[str, ...] = TRIPLET_STATISTICS
    head: str | None = None
    head_on_validation: bool = True
    divergence_rise: Callable[[Any], tuple[float, str]] = triplet_divergence_rise

    def __post_init__(self):
        if not self.statistics or self.statistics[0] != "loss":
            raise InputError(f"objective {self.name}: statistics must start with 'loss', got {self.statistics}")

    @property
    def function(self) -> Callable[..., dict[str, Any]]:
        """The loss code: (labels, embeddings, config, head_output) -> {statistic: float32 scalar}."""
        return _resolve(self.loss, f"objective {self.name}'s loss")

    def build_head(self, config: Any, classes: int | None = None) -> Any:
        """The objective's head, a Keras layer built by `head`'s function from `config` and `classes` (the
        number of training identities; None where it is not known), or None when it has none."""
        if self.head is None:
            return None
        return _resolve(self.head, f"objective {self.name}'s head")(config, classes)

    def reported(self) -> tuple[str, ...]:
        """Every value one training step reports: `statistics` and COLLAPSE_STATISTICS."""
        return (*self.statistics, *COLLAPSE_STATISTICS)


def _triplet(name: str, summary: str) -> Objective:
    return Objective(name=name, summary=summary, loss=f"facenet_kfp.losses:{name}_objective",
                     distance=triplet_distance, loss_bound=triplet_loss_bound)


def cosine_distance(config: Any) -> str:
    """The margin-softmax objectives' distance: "cosine", what their logits compare (on unit embeddings
    half the squared L2 distance, so every figure but a threshold's value is the same in either)."""
    return "cosine"


def unbounded(config: Any) -> float:
    """math.inf: a margin-softmax loss is bounded by log(1 + (C - 1) exp(s (1 - min phi))), which depends on
    the number of training identities C, not a setting; the monitor then checks finiteness only."""
    return math.inf


def margin_divergence_rise(config: Any) -> tuple[float, str]:
    """The margin-softmax objectives' divergence allowance: a tenth of train.scale (their loss moves in
    units of the scale: a true-class cosine 0.1 lower raises its term by up to 0.1 s)."""
    return 0.1 * float(config.scale), f"{0.1 * config.scale:g} (a tenth of train.scale={config.scale:g})"


def _margin(name: str, summary: str) -> Objective:
    return Objective(name=name, summary=summary, loss=f"facenet_kfp.margin_losses:{name}_objective",
                     distance=cosine_distance, loss_bound=unbounded, pk_batches=False,
                     statistics=MARGIN_STATISTICS, head="facenet_kfp.margin_losses:class_centre_head",
                     head_on_validation=False, divergence_rise=margin_divergence_rise)


# What every margin-softmax objective reports each step (`margin_losses.STATISTICS`).
MARGIN_STATISTICS = ("loss", "accuracy", "mean_true_cosine", "mean_other_cosine")
# Triplet objectives, then margin-softmax ones (train.loss's help lists them in this order).
TRIPLET_NAMES = ("batch_all", "batch_hard", "semi_hard")
MARGIN_NAMES = ("arcface", "cosface", "softmax")

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    _triplet("batch_all", "triplet loss, mean over every triplet of the batch with a positive loss"),
    _triplet("batch_hard", "triplet loss of each anchor's hardest positive and hardest negative"),
    _triplet("semi_hard", "triplet loss of each positive pair's nearest negative farther than the positive "
                          "(FaceNet)"),
    _margin("arcface", "ArcFace: softmax cross-entropy over class centres, s cos(theta + m) for the true class"),
    _margin("cosface", "CosFace: softmax cross-entropy over class centres, s (cos theta - m) for the true class"),
    _margin("softmax", "normalised softmax: cross-entropy over class centres, s cos theta, no margin"),
)}
# The train.loss choices, in table order.
NAMES = tuple(OBJECTIVES)


def get(name: str) -> Objective:
    """The objective called `name`; InputError naming train.loss and the choices otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(f"train.loss must be one of {', '.join(OBJECTIVES)}; got {name!r}") from None


def for_config(config: Any) -> Objective:
    """The objective config.loss names."""
    return get(config.loss)
