"""Verification figures of scored pairs: threshold, accuracy, k-fold, AUC, EER, VAL@FAR, counts and warnings."""

from __future__ import annotations

from typing import Any

import numpy as np

from facenet_kfp import metrics as vm
from facenet_kfp.config import EvaluateConfig
from facenet_kfp.distances import _as_distance, far_key, seed_threshold_in, stratified_folds
from facenet_kfp.pair_sources import SplitPairs
from facenet_kfp.report import flip_key

ROC_POINTS = 300          # the KFP UI draws a ROC of at most a few hundred points comfortably
# A split whose same-person pairs come from fewer identities is flagged: its
# threshold and figures describe a handful of people, not unseen faces at large.
MIN_IDENTITIES = 20
# Held-out LFW pairs needed for the held-out pairs.txt figures (10 folds of ~5 same + ~5 different).
MIN_HELDOUT_PAIRS = 100


def verification_scores(val_distances: np.ndarray, val_same: np.ndarray, test_distances: np.ndarray,
                        test_same: np.ndarray, test_folds: np.ndarray | None, config: EvaluateConfig,
                        seed_threshold: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """The threshold chosen on validation pairs and what it gives on test pairs: (scores, thresholds).

    Scores are the flat ``threshold``, ``val_*``, ``test_*`` and
    ``threshold_at_far_*`` scalars (module docstring, steps 4 and 5);
    thresholds maps "accuracy" and "far_<far>" to the thresholds chosen on
    validation. `seed_threshold` (in the same distance) adds
    ``test_accuracy_at_seed_threshold``; None leaves it out.
    """
    vd, vs, td, ts = val_distances, val_same, test_distances, test_same
    threshold, val_accuracy = vm.select_threshold(vd, vs)
    m: dict[str, float] = {"threshold": threshold, "val_accuracy": val_accuracy,
                           "test_accuracy": vm.accuracy_at(td, ts, threshold)}
    # Given fold ids (a pairs file's own folds) set the fold count; evaluate.folds is for seeded folds.
    if test_folds is None:
        test_folds = vm.contiguous_folds(td.size, config.folds)
    n_folds = int(np.unique(test_folds).size)
    folds = vm.kfold_accuracy(td, ts, n_folds, fold_ids=test_folds)
    m["test_kfold_accuracy_mean"] = folds["mean"]
    m["test_kfold_accuracy_std"] = folds["std"]
    m["test_folds"] = n_folds
    m["test_auc"] = vm.roc_auc(td, ts)
    m["test_eer"], m["test_eer_threshold"] = vm.equal_error_rate(td, ts)
    m["val_auc"] = vm.roc_auc(vd, vs)
    thresholds = {"accuracy": threshold}
    for far in config.far_targets:
        key = far_key(far)
        far_threshold = vm.threshold_at_far(vd, vs, far)
        m[f"threshold_at_far_{key}"] = far_threshold
        thresholds[f"far_{key}"] = far_threshold
        m.update(val_at_far_scores("test_", td, ts, test_folds, far, far_threshold))
    if seed_threshold is not None:
        m["test_accuracy_at_seed_threshold"] = vm.accuracy_at(td, ts, seed_threshold)
    return m, thresholds


def val_at_far_scores(prefix: str, distances: np.ndarray, same: np.ndarray, fold_ids: np.ndarray | None,
                      far: float, threshold: float | None = None) -> dict[str, float]:
    """VAL at one target FAR, with the FAR actually reached, where the pairs can measure that FAR.

    Keys start with `prefix` and name the FAR by `far_key`:

    * with `threshold` (chosen on validation for this FAR): ``val_at_far_<far>``
      and ``far_at_far_<far>``, VAL and the FAR reached at that threshold on
      these pairs, when they hold at least `metrics.min_different_pairs` (far)
      different-person pairs; else only ``val_at_far_<far>_needs_different_pairs``;
    * k-fold (threshold from the other folds, `metrics.kfold_val_at_far`), with
      `fold_ids`: ``kfold_val_at_far_<far>_mean``/``_std`` and
      ``kfold_far_at_far_<far>_mean`` when the test part of every fold holds that
      many different-person pairs; else only ``kfold_val_at_far_<far>_needs_different_pairs``.
    """
    key, need = far_key(far), vm.min_different_pairs(far)
    m: dict[str, float] = {}
    if threshold is not None:
        if int(np.sum(~same)) >= need:
            m[f"{prefix}val_at_far_{key}"], m[f"{prefix}far_at_far_{key}"] = vm.val_far(distances, same, threshold)
        else:
            m[f"{prefix}val_at_far_{key}_needs_different_pairs"] = need
    if fold_ids is not None:
        if vm.fewest_in_a_fold(same, fold_ids)[1] >= need:
            n_folds = int(np.unique(fold_ids).size)
            kfold = vm.kfold_val_at_far(distances, same, far, n_folds, fold_ids=fold_ids)
            m[f"{prefix}kfold_val_at_far_{key}_mean"] = kfold["val_mean"]
            m[f"{prefix}kfold_val_at_far_{key}_std"] = kfold["val_std"]
            m[f"{prefix}kfold_far_at_far_{key}_mean"] = kfold["far_mean"]
        else:
            m[f"{prefix}kfold_val_at_far_{key}_needs_different_pairs"] = need
    return m


def count_metrics(split: SplitPairs) -> dict[str, int]:
    """What a split's figures rest on: pairs (in all, same-person, different-person), identities (in all and
    in same pairs), images; and ``<split>_accuracy_withheld`` (1 when either class has fewer than
    `metrics.MIN_CLASS_PAIRS` pairs, so that no accuracy of the split is a headline figure)."""
    return {**_class_counts(f"{split.name}_", split.same),
            f"{split.name}_identities": split.identities,
            f"{split.name}_positive_identities": split.positive_identities,
            f"{split.name}_images": len(split.used_keys)}


def split_metrics(val: SplitPairs, test: SplitPairs, config: EvaluateConfig, distance: str | bool,
                  unit: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
    """Validation/test scalars (flat): `verification_scores` of the distances, the counts and the distance name.

    Distances on `val` and `test` must be filled in, in `distance` (a name of
    `DISTANCES`, or model.json's squared flag). `unit` says whether the
    embeddings are unit length (`seed_threshold_in`). Returns (metrics,
    thresholds) as `verification_scores`.
    """
    name = _as_distance(distance)
    seed_threshold = seed_threshold_in(name, config.seed_threshold, unit)
    scores, thresholds = verification_scores(val.distances, val.same, test.distances, test.same,
                                             test.fold_ids, config, seed_threshold)
    m: dict[str, Any] = {"threshold": scores["threshold"], "distance": name, **scores}
    if seed_threshold is not None:
        m["seed_threshold"] = seed_threshold
    for split in (val, test):
        m.update(count_metrics(split))
    return m, thresholds


def flip_metrics(val: SplitPairs, test: SplitPairs, config: EvaluateConfig, distance: str, unit: bool
                 ) -> tuple[dict[str, float], float]:
    """`verification_scores` of the flip distances, named by `report.flip_key`, and the flip threshold."""
    seed_threshold = seed_threshold_in(distance, config.seed_threshold, unit)
    scores, thresholds = verification_scores(val.flip_distances, val.same, test.flip_distances, test.same,
                                             test.fold_ids, config, seed_threshold)
    return {flip_key(key): value for key, value in scores.items()}, thresholds["accuracy"]


def pair_scores(distances: np.ndarray, same: np.ndarray, fold_ids: np.ndarray, config: EvaluateConfig,
                threshold: float) -> dict[str, float]:
    """Scalars of a pairs file (keys without a prefix): k-fold accuracy and VAL@FAR over `fold_ids`,
    accuracy at `threshold` (chosen on validation), AUC and EER."""
    d, s = distances, same
    n_folds = int(np.unique(fold_ids).size)
    folds = vm.kfold_accuracy(d, s, n_folds, fold_ids=fold_ids)
    m = {"kfold_accuracy_mean": folds["mean"], "kfold_accuracy_std": folds["std"],
         "accuracy_at_threshold": vm.accuracy_at(d, s, threshold)}
    for far in config.far_targets:
        m.update(val_at_far_scores("", d, s, fold_ids, far))
    m["auc"] = vm.roc_auc(d, s)
    m["eer"], _ = vm.equal_error_rate(d, s)
    return m


def _class_counts(prefix: str, same: np.ndarray) -> dict[str, int]:
    """``<prefix>pairs``, ``same_pairs``, ``different_pairs`` and ``accuracy_withheld`` (`count_metrics`)."""
    n_same = int(np.sum(same))
    n_different = int(np.size(same)) - n_same
    return {f"{prefix}pairs": int(np.size(same)), f"{prefix}same_pairs": n_same,
            f"{prefix}different_pairs": n_different,
            f"{prefix}accuracy_withheld": int(bool(vm.accuracy_withheld(n_same, n_different)))}


def pairs_file_folds(same: np.ndarray, fold_ids: np.ndarray, config: EvaluateConfig, where: str
                     ) -> tuple[np.ndarray, bool]:
    """(fold id per pair, whether they are the file's own) for the pairs of a pairs file.

    The LFW protocol cross-validates over the folds the file's header declares
    (10 in View 2's pairs.txt; any count from 2 on is used as is). A file of one
    fold (View 1 style, a header of just the pair count) has nothing to
    cross-validate over: its pairs are dealt into ``config.folds`` seeded
    stratified folds (`stratified_folds`), and every output says so.
    """
    if np.unique(fold_ids).size >= 2:
        return np.asarray(fold_ids, dtype=np.int64), True
    return stratified_folds(same, config.folds, config.seed, f"{where} (one fold)"), False


def _prefixed(prefix: str, scores: dict[str, float], flip: bool = False) -> dict[str, float]:
    return {(flip_key(prefix + key) if flip else prefix + key): value for key, value in scores.items()}


def lfw_metrics(lfw: SplitPairs, config: EvaluateConfig, threshold: float, flip_threshold: float | None = None,
                source: str = "LFW pairs file") -> tuple[dict[str, Any], list[str]]:
    """LFW pairs.txt scalars and warnings: `pair_scores` with the file's folds, overlap with training, held-out figures.

    ``lfw_pairs_*``: every pair (flip variants when `flip_threshold` is given
    and the flip distances are filled in). ``lfw_pairs_train_identities`` and
    ``lfw_pairs_overlapping_pairs`` count the training identities named and
    the pairs naming one. When some pair does, ``lfw_pairs_heldout_*`` are the
    same scores on the pairs of two held-out identities, dealt into
    ``config.folds`` seeded stratified folds (removing pairs unbalances the
    file's folds); with fewer than `MIN_HELDOUT_PAIRS` such pairs (or too few of
    a label for the folds) they are left out and a warning says the pairs.txt
    figures are not a held-out benchmark. `source` names the pairs file in errors.
    """
    s = lfw.same
    fold_ids, from_file = pairs_file_folds(s, lfw.fold_ids, config, source)
    m: dict[str, Any] = _prefixed("lfw_pairs_", pair_scores(lfw.distances, s, fold_ids, config, threshold))
    if flip_threshold is not None:
        m.update(_prefixed("lfw_pairs_", pair_scores(lfw.flip_distances, s, fold_ids, config, flip_threshold),
                           flip=True))
    heldout = lfw.heldout
    m.update(_class_counts("lfw_pairs_", s))
    m["lfw_pairs_folds"] = int(np.unique(fold_ids).size)
    m["lfw_pairs_folds_from_file"] = int(from_file)
    m["lfw_pairs_identities"] = lfw.identities
    m["lfw_pairs_images"] = len(lfw.keys)
    m["lfw_pairs_train_identities"] = lfw.train_identities
    m["lfw_pairs_overlapping_pairs"] = int((~heldout).sum())
    m.update(_class_counts("lfw_pairs_heldout_", s[heldout]))
    # pairs.txt keys are Name/Name_NNNN.jpg.
    m["lfw_pairs_heldout_identities"] = len({lfw.keys[i].split("/")[0]
                                              for i in np.concatenate((lfw.index_a[heldout], lfw.index_b[heldout]))})
    warnings: list[str] = []
    if heldout.all():
        return m, warnings
    n_same, n_diff = int(s[heldout].sum()), int((~s[heldout]).sum())
    if heldout.sum() < MIN_HELDOUT_PAIRS or min(n_same, n_diff) < config.folds:
        warnings.append(
            f"LFW pairs.txt: {m['lfw_pairs_overlapping_pairs']:,} of {s.size:,} pairs name "
            f"{lfw.train_identities:,} training identities, and only {int(heldout.sum()):,} pairs of held-out "
            f"identities remain ({n_same} same, {n_diff} different; at least {MIN_HELDOUT_PAIRS} with "
            f"{config.folds} of each are needed for held-out figures): the pairs.txt figures are not a "
            f"held-out benchmark; the test split's are")
        return m, warnings
    held_same = s[heldout]
    folds = stratified_folds(held_same, config.folds, config.seed, "LFW pairs.txt, held-out identities")
    m.update(_prefixed("lfw_pairs_heldout_", pair_scores(lfw.distances[heldout], held_same, folds, config,
                                                         threshold)))
    if flip_threshold is not None:
        m.update(_prefixed("lfw_pairs_heldout_", pair_scores(lfw.flip_distances[heldout], held_same, folds, config,
                                                             flip_threshold), flip=True))
    m["lfw_pairs_heldout_folds"] = config.folds
    return m, warnings


def archive_overlap(train_rows: dict[str, dict[str, Any]], eval_rows: dict[str, dict[str, Any]],
                    train_names: set[str]) -> dict[str, int]:
    """How many identities of the evaluation archive the training archive also has, matched by name."""
    eval_names = {row["identity"] for row in eval_rows.values()}
    in_archive = eval_names & {row["identity"] for row in train_rows.values()}
    return {"eval_identities": len(eval_names), "eval_images": len(eval_rows),
            "eval_identities_in_training_archive": len(in_archive),
            "eval_identities_in_train_split": len(eval_names & train_names)}


def identity_warnings(splits: list[SplitPairs]) -> list[str]:
    """One warning per split whose same-person pairs come from fewer than `MIN_IDENTITIES` identities."""
    return [f"{s.name}: its figures rest on {s.positive_identities} identities in same-person pairs "
            f"({s.identities} in all its pairs), fewer than {MIN_IDENTITIES}; they describe those few people, "
            f"not unseen faces at large (use a larger dataset or a larger {s.name} fraction)"
            for s in splits if s.positive_identities < MIN_IDENTITIES]


def _roc_lists(distances: np.ndarray, same: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, thr = vm.downsample_roc(*vm.roc_curve(distances, same), max_points=ROC_POINTS)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def choose_examples(split: SplitPairs, threshold: float, count: int, seed: int) -> list[int]:
    """Indices of `count` pairs to show: about half wrongly classified (when there are), the rest right.

    Drawn at random with `seed`; wrong ones first, each group in pair order.
    """
    predicted = split.distances < threshold
    wrong = np.flatnonzero(predicted != split.same)
    right = np.flatnonzero(predicted == split.same)
    n_wrong = min(wrong.size, count // 2)
    n_right = min(right.size, count - n_wrong)
    n_wrong = min(wrong.size, count - n_right)
    rng = np.random.default_rng(seed)
    picked_wrong = np.sort(rng.choice(wrong, n_wrong, replace=False)) if n_wrong else wrong[:0]
    picked_right = np.sort(rng.choice(right, n_right, replace=False)) if n_right else right[:0]
    return [int(i) for i in np.concatenate((picked_wrong, picked_right))]
