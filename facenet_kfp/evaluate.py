"""Step 7: embed validation and test faces, choose the verification threshold on validation, measure test.

Protocol (the verification protocol face-recognition papers report):

1. Only REAL images are used (manifest rows with ``synthetic`` false): the
   completion step's flipped copies would make "same person" pairs trivially
   easy. Validation and test identities come from the splits folder and are
   disjoint from training identities.
2. Per split, pairs balanced across identities as LFW's pairs.txt is built
   (`pairs.make_pairs`): at most ``max_pairs_per_identity`` same-person pairs
   per identity and ``max_positive_pairs`` in all, and as many different-person
   pairs, each from two identities chosen uniformly, seeded. Every output says
   how many identities a split's figures rest on, and warns below
   `MIN_IDENTITIES`.
3. Embeddings come from the trained model with its recorded preprocessing
   (`export.embed_images`). With ``flip``, each image is also embedded
   mirrored left-right and the two embeddings are added and L2-normalised;
   every figure is then reported for those embeddings too, as ``flip_``
   variants (``test_flip_accuracy``, ``flip_threshold``). The distance is
   ``distance``: ``model`` (the model's own, model.json's ``distance.name``:
   squared L2 ``‖a − b‖²`` or plain L2 ``‖a − b‖`` for the triplet
   objectives), ``squared_l2``, ``l2`` or
   ``cosine`` (``1 − a·b / (‖a‖ ‖b‖)``). Every output names it.
4. The threshold maximises accuracy on the VALIDATION pairs
   (`metrics.select_threshold`); it is then applied unchanged to the TEST
   pairs. A pair is "same person" when ``distance < threshold``.
5. Test metrics: accuracy at that threshold; 10-fold cross-validated accuracy
   (threshold from 9 folds, applied to the 10th; pairs are shuffled into
   folds with evaluate.seed, stratified so each fold holds same and different
   pairs; a pairs file's pairs stay in the folds its header declares); ROC AUC
   and equal error rate; VAL at each target FAR, where the
   threshold reaching that FAR is interpolated on the validation pairs and
   applied to test (``test_val_at_far_<far>``, with the FAR it actually gives
   on test in ``test_far_at_far_<far>``), and the k-fold variant on test alone
   (``test_kfold_val_at_far_<far>_mean``), each only where the pairs can
   measure that FAR (`val_at_far_scores`); and the accuracy at the fixed
   threshold 1.242 (plain L2) of the original TF1 implementation, converted to the distance used
   (omitted, with a note, for cosine distances of embeddings that are not unit
   length, where no conversion exists).
6. Optionally the LFW View 2 pairs.txt (``pairs_uri``): k-fold accuracy with
   the folds of the file (`pairs_file_folds`: seeded stratified ones for a
   1-fold file), k-fold VAL at each FAR, AUC. Pairs naming a training
   identity (splits folder's train.txt) are counted; the figures are reported
   again on the pairs of held-out identities only (``lfw_pairs_heldout_``),
   or, when fewer than `MIN_HELDOUT_PAIRS` remain, a warning says the
   pairs.txt figures are not a held-out benchmark.
7. Every pair set's figures come with its counts (``<set>_same_pairs``,
   ``<set>_different_pairs``). A set with fewer than `metrics.MIN_CLASS_PAIRS`
   pairs of either class has ``<set>_accuracy_withheld`` 1: its accuracies are
   still in the metrics, but the report's and the run's headlines show the
   counts, AUC and EER and say why accuracy is withheld
   (`metrics.accuracy_withheld`).

The parts: `distances` (the distance definitions, flip embeddings, seeded
folds), `pair_sources` (the pairs of a split, of an evaluation archive or of a
pairs.txt, and their embeddings) and `scoring` (the figures of steps 4 to 7);
this module runs the step, writes its report and threshold.json, and
re-exports what callers use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from facenet_kfp import metrics as vm
from facenet_kfp.config import EvaluateConfig
from facenet_kfp.distances import (  # noqa: F401  (re-exported: callers import them from here)
    DISTANCE_DEFINITIONS, DISTANCE_LABELS, DISTANCE_NAMES, DISTANCE_SETTINGS, DISTANCES, MODEL_JSON, UNIT_TOLERANCE,
    MirrorPairModel, _as_distance, distance_name, far_key, flip_embeddings, model_distance,
    pair_distances, resolve_distance, seed_threshold_in, stratified_folds, unit_length)
from facenet_kfp.errors import InputError
from facenet_kfp.fsutil import file_sha256, write_json, write_text
from facenet_kfp.pair_sources import (  # noqa: F401  (re-exported: callers import them from here)
    SplitPairs, _check_folder, _check_inputs, archive_pairs, draw_pairs, embed_keys, lfw_pairs, real_rows_by_file,
    split_pairs)
from facenet_kfp.pairs import check_pairs_source
from facenet_kfp.scoring import (  # noqa: F401  (re-exported: callers import them from here)
    MIN_HELDOUT_PAIRS, MIN_IDENTITIES, ROC_POINTS, _class_counts, _prefixed, _roc_lists, archive_overlap,
    choose_examples, count_metrics, flip_metrics, identity_warnings, lfw_metrics, pair_scores, pairs_file_folds,
    split_metrics, val_at_far_scores, verification_scores)
from facenet_kfp.shards import MANIFEST, ShardReader
from facenet_kfp.splits import read_split

log = logging.getLogger(__name__)

THRESHOLD_JSON = "threshold.json"
RULE = "same person when distance < threshold"
CHOSEN_ON = "validation pairs, max accuracy"
FLIP_DEFINITION = ("each image embedded as is and mirrored left-right (the preprocessed input reversed "
                   "along its width), the two embeddings added and L2-normalised")


# ----------------------------------------------------------------------------- the step

def evaluate(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, splits_dir: str | os.PathLike,
             config: EvaluateConfig, *, report_path: str | os.PathLike,
             threshold_path: str | os.PathLike, pairs_uri: str = "", pairs_sha256: str = "",
             pairs_dir: str | os.PathLike | None = None, model_uri: str = "",
             metrics_path: str | os.PathLike | None = None,
             eval_dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Choose the threshold on validation pairs and measure it on test pairs (see the module docstring).

    With `eval_dataset_dir` (a packed dataset of a separate evaluation archive,
    LFW say) the test pairs come from that archive: the pairs of `pairs_uri`
    (its folds are the k-fold folds: LFW View 2), else pairs drawn over all its
    identities; the training archive's test split is not used. Identities
    present in both archives (by name) are counted (``eval_*`` metrics).

    The pairs file comes either checked by the pipeline's check pairs step
    (`pairs_dir`, its output folder) or as `pairs_uri` (with `pairs_sha256`),
    which is checked here the same way (`pairs.check_pairs_source`); errors
    about it name `pairs_uri` and the line.

    Inputs: the model folder from train (model.json + the Keras model), the
    packed image dataset (real images are used), the splits folder (val.txt,
    test.txt, and train.txt with a pairs file). Writes, each atomically:
    `report_path` (self-contained HTML), `threshold_path` (threshold.json, the
    serving threshold and its distance definition) and, when given,
    `metrics_path` (JSON of the metrics).

    Returns ``{"metrics": flat dict of every scalar, "roc": {"fpr", "tpr",
    "thresholds"} (test ROC, at most 300 points, thresholds in the distance
    used), "confusion_matrix": [[TN, FP], [FN, TP]] on test at the chosen
    threshold, "threshold": the threshold.json content, "warnings": [why some
    figures mean little]}``.

    Raises InputError, before embedding, for a model folder without a
    readable model.json and model, a split or dataset of another lineage,
    too few identities or pairs to choose a threshold, or a pairs file that
    cannot be fetched, parsed or matched to the images (naming the URI and
    line); nothing is written then.
    """
    started = time.monotonic()
    model_dir, dataset_dir, splits_dir = Path(model_dir), Path(dataset_dir), Path(splits_dir)
    _check_inputs(model_dir, dataset_dir, splits_dir)
    eval_dir = Path(eval_dataset_dir) if eval_dataset_dir is not None else None
    if eval_dir is not None:
        _check_folder(eval_dir, "evaluation image dataset")
        if not (eval_dir / MANIFEST).is_file():
            raise InputError(f"{eval_dir / MANIFEST}: not found; is {eval_dir} a packed image dataset?")

    rows = real_rows_by_file(dataset_dir)
    test_dir, test_rows = (dataset_dir, rows) if eval_dir is None else (eval_dir, real_rows_by_file(eval_dir))
    train_names = {name for name, _ in read_split(splits_dir, "train")}
    val = split_pairs("val", splits_dir, dataset_dir, rows, config)
    lfw: SplitPairs | None = None
    if pairs_dir is not None:
        if pairs_uri or pairs_sha256:
            raise InputError(f"give either checked pairs ({pairs_dir}) or a pairs file to check ({pairs_uri}), "
                             f"not both")
        pairs_uri, lfw = lfw_pairs(Path(pairs_dir), test_rows, test_dir, train_names)
    elif pairs_uri:
        with tempfile.TemporaryDirectory(prefix="facenet-pairs-") as tmp:
            check_pairs_source(pairs_uri, pairs_sha256, test_dir, Path(tmp) / "pairs")
            _, lfw = lfw_pairs(Path(tmp) / "pairs", test_rows, test_dir, train_names)
    elif pairs_sha256:
        raise InputError("a pairs sha256 was given without a pairs file")
    test_folds_from_file = False
    if eval_dir is None:
        test = split_pairs("test", splits_dir, dataset_dir, rows, config)
    elif lfw is not None:
        # The evaluation archive's pairs.txt, in the folds its header declares (seeded ones for a 1-fold file).
        test = dataclasses.replace(lfw, name="test")
        test.fold_ids, test_folds_from_file = pairs_file_folds(test.same, lfw.fold_ids, config, pairs_uri)
    else:
        test = archive_pairs(eval_dir, test_rows, config)
    if test.fold_ids is None:
        # Folds shuffled with evaluate.seed (the pairs' own order comes from make_pairs).
        where = f"{splits_dir / 'test.txt'}" if eval_dir is None else f"pairs of the evaluation archive {eval_dir}"
        test.fold_ids = stratified_folds(test.same, config.folds, config.seed, where)
    if lfw is not None:
        pairs_file_folds(lfw.same, lfw.fold_ids, config, pairs_uri)   # a 1-fold file too small fails before embedding

    from facenet_kfp import export

    model, metadata = export.load_model_artifact(model_dir)
    own = model_distance(metadata, model_dir)
    name = resolve_distance(config.distance, own)

    unit, dim = True, 0
    # The splits of each archive, embedded once per image (lfw is the test split of a separate archive).
    of_train = [val] if eval_dir is not None else [s for s in (val, test, lfw) if s is not None]
    of_eval = [s for s in (test, lfw) if s is not None] if eval_dir is not None else []
    for folder, folder_rows, splits in ((dataset_dir, rows, of_train), (test_dir, test_rows, of_eval)):
        if not splits:
            continue
        keys = sorted({key for s in splits for key in s.used_keys})
        embeddings, flipped = embed_keys(model, metadata, folder, folder_rows, keys, config.batch_size, config.flip)
        # The seed threshold is compared only where it converts for the model's own embeddings.
        unit, dim = unit and unit_length(embeddings), int(embeddings.shape[1])
        row_of = {key: i for i, key in enumerate(keys)}
        for s in splits:
            # Map the split's key indices to embedding rows (every key a pair uses was embedded).
            to_row = np.zeros(len(s.keys), dtype=np.int64)
            used = np.unique(np.concatenate((s.index_a, s.index_b)))
            to_row[used] = [row_of[s.keys[i]] for i in used]
            s.distances = pair_distances(embeddings, to_row[s.index_a], to_row[s.index_b], name)
            if flipped is not None:
                s.flip_distances = pair_distances(flipped, to_row[s.index_a], to_row[s.index_b], name)

    metrics, thresholds = split_metrics(val, test, config, name, unit)
    metrics["test_folds_from_file"] = int(test_folds_from_file)
    threshold, flip_threshold = thresholds["accuracy"], None
    if config.flip:
        flip_scores, flip_threshold = flip_metrics(val, test, config, name, unit)
        metrics.update(flip_scores)
    warnings = identity_warnings([val, test])
    if eval_dir is not None:
        metrics.update(archive_overlap(rows, test_rows, train_names))
    if lfw is not None:
        lfw_scores, lfw_warnings = lfw_metrics(lfw, config, threshold, flip_threshold, source=pairs_uri)
        metrics.update(lfw_scores)
        warnings += lfw_warnings
    metrics["embedding_dim"] = dim
    for warning in warnings:
        log.warning("%s", warning)

    threshold_info = {
        "threshold": threshold,
        "distance": name,
        "distance_definition": DISTANCE_DEFINITIONS[name],
        "rule": RULE,
        "chosen_on": CHOSEN_ON,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "model": model_uri or str(model_dir),
        # Which model the threshold belongs to (verify refuses it for any other): the model file's
        # sha256 and the model's own distance (`distance` may differ: evaluate.distance).
        "model_sha256": file_sha256(model_dir / str(metadata["file"])),
        "model_distance": own,
        "embedding_dim": dim,
        "preprocessing": metadata["preprocessing"],
    }
    if flip_threshold is not None:
        threshold_info.update(flip_threshold=flip_threshold, flip_definition=FLIP_DEFINITION,
                              flip_test_accuracy=metrics["test_flip_accuracy"])
    result = {
        "metrics": metrics,
        "roc": _roc_lists(test.distances, test.same),
        "confusion_matrix": vm.confusion_matrix(test.distances, test.same, threshold),
        "threshold": threshold_info,
        "warnings": warnings,
    }

    html = _build_report(model_dir, test_dir, test_rows, config, val, test, lfw, metrics, threshold,
                         name, own, warnings, model_uri or str(model_dir), eval_dir is not None)
    write_json(threshold_path, threshold_info)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    write_text(report_path, html)
    withheld = vm.accuracy_withheld(metrics["test_same_pairs"], metrics["test_different_pairs"])
    accuracy = withheld or (f"test accuracy {metrics['test_accuracy']:.4f}, {metrics['test_folds']}-fold "
                            f"{metrics['test_kfold_accuracy_mean']:.4f} ± {metrics['test_kfold_accuracy_std']:.4f}")
    log.info("threshold %.4f (%s) chosen on %d validation pairs; on %d same and %d different test pairs: %s; "
             "AUC %.4f (%.1f s)", threshold, DISTANCE_LABELS[name], val.same.size, metrics["test_same_pairs"],
             metrics["test_different_pairs"], accuracy, metrics["test_auc"], time.monotonic() - started)
    return result


def _folds_text(folds: int, from_file: bool, evaluation_archive: bool = False) -> str:
    """How a pairs file's pairs were dealt into folds, for the report's notes."""
    file = "the evaluation archive's pairs.txt" if evaluation_archive else "the file"
    if from_file:
        return f"{folds} folds {file} declares (the LFW protocol)"
    return (f"{folds} seeded stratified folds (evaluate.folds, evaluate.seed): {file} declares one fold "
            f"(View 1 style), nothing to cross-validate over")


def _build_report(model_dir: Path, dataset_dir: Path, rows: dict[str, dict[str, Any]],
                  config: EvaluateConfig, val: SplitPairs, test: SplitPairs, lfw: SplitPairs | None,
                  metrics: dict[str, Any], threshold: float, name: str, own: str, warnings: list[str],
                  model: str, separate: bool = False) -> str:
    """The HTML report; `dataset_dir` and `rows` are those of the test pairs' images (`separate`:
    a separate evaluation archive); `own` is the model's own distance (model.json)."""
    from facenet_kfp import report

    examples = []
    with ShardReader(dataset_dir) as reader:
        for i in choose_examples(test, threshold, config.report_examples, config.seed):
            key_a, key_b = test.keys[test.index_a[i]], test.keys[test.index_b[i]]
            examples.append(report.ExamplePair(
                key_a=key_a, key_b=key_b, image_a=reader.read(rows[key_a]), image_b=reader.read(rows[key_b]),
                distance=float(test.distances[i]), same=bool(test.same[i]),
                predicted_same=bool(test.distances[i] < threshold)))
    rocs = {"test pairs": vm.roc_curve(test.distances, test.same)[:2]}
    if test.flip_distances is not None:
        rocs["test pairs, flip"] = vm.roc_curve(test.flip_distances, test.same)[:2]
    pairs_file = separate and lfw is not None
    source = ("the model's own (model.json)" if config.distance == "model"
              else f"evaluate.distance; the model was trained with {DISTANCE_LABELS[own]}")
    notes = [
        f"Distances are {DISTANCE_DEFINITIONS[name]} ({source}). A pair is judged the same person when its "
        f"distance is below the threshold.",
        f"The threshold maximises accuracy on {val.same.size:,} validation pairs "
        f"({val.positive_identities} identities in same-person pairs, {val.identities} in all) and is "
        f"applied unchanged to {test.same.size:,} test pairs ({test.positive_identities} and "
        f"{test.identities} identities); "
        + (f"the test pairs come from the separate evaluation archive ({metrics['eval_identities']:,} "
           f"identities, {metrics['eval_images']:,} images), {metrics['eval_identities_in_training_archive']:,} "
           f"of whose identity names also occur in the training archive, "
           f"{metrics['eval_identities_in_train_split']:,} of them in the train split. " if separate else
           "validation and test identities are disjoint from training identities. ")
        + "Only real images are used, never the generated completion images.",
        f"Pairs per split, balanced across identities as LFW's pairs.txt: at most "
        f"{config.max_pairs_per_identity:,} same-person pairs per identity (a seeded sample of its image "
        f"pairs) and at most {config.max_positive_pairs:,} in all (the per-identity cap lowered evenly to "
        f"fit), and as many different-person pairs, each from two identities chosen uniformly and one image "
        f"of each, without repeats; seed {config.seed}.",
        ("k-fold accuracy: the test pairs are in the " + _folds_text(metrics["test_folds"], True, pairs_file)
         if metrics.get("test_folds_from_file") else
         f"k-fold accuracy: the test pairs are shuffled (seed {config.seed}) into {metrics['test_folds']} folds, "
         f"stratified by label" + (" (the evaluation archive's pairs.txt declares one fold)" if pairs_file
                                   else ""))
        + "; each fold is scored with the threshold that maximises accuracy on the other folds; "
          "mean ± population std over folds.",
        f"Accuracy is a headline figure only for pairs with at least {vm.MIN_CLASS_PAIRS} of each class "
        f"(same person, different people); with fewer, answering the larger class for every pair can score "
        f"as well, so the headline gives the pair counts, AUC and EER and says why accuracy is withheld "
        f"(the accuracies stay in the table of all metrics, with <set>_accuracy_withheld = 1).",
        "VAL@FAR: VAL = accepted same pairs / same pairs, FAR = accepted different pairs / different "
        "pairs. 'test VAL at FAR' uses the threshold interpolated to that FAR on the validation pairs, "
        "applied to test; the FAR it actually reaches on test is shown beside it. The k-fold variant finds "
        "the threshold on the other test folds. A FAR f can be measured only on at least ceil(1/f) "
        "different-person pairs (1,000 for 1e-3): with fewer test pairs (for the k-fold variant, fewer in "
        "the test part of any fold) VAL@FAR is n/a and no VAL is recorded, only "
        "..._needs_different_pairs.",
    ]
    if "seed_threshold" in metrics:
        notes.append(f"Seed threshold: the original TF1 implementation's fixed plain-L2 threshold {config.seed_threshold:g}, "
                     f"i.e. {metrics['seed_threshold']:.4g} ({DISTANCE_LABELS[name]}).")
    else:
        notes.append(f"Seed threshold: the original TF1 implementation's fixed plain-L2 threshold {config.seed_threshold:g} "
                     f"has no {DISTANCE_LABELS[name]} equivalent here (the embeddings are not unit length), "
                     f"so its accuracy is not reported.")
    if test.flip_distances is not None:
        notes.append(f"Flip figures (flip_ metrics, 'with flip' column): {FLIP_DEFINITION}; their threshold "
                     f"is chosen on the validation pairs the same way. threshold.json's threshold is the plain one, "
                     f"for a service that embeds each image once; its flip_threshold is for one that embeds "
                     f"image and mirror.")
    if lfw is not None:
        rocs["LFW pairs.txt"] = vm.roc_curve(lfw.distances, lfw.same)[:2]
        text = (f"LFW pairs.txt: {metrics['lfw_pairs_pairs']:,} pairs ({metrics['lfw_pairs_same_pairs']:,} same, "
                f"{metrics['lfw_pairs_different_pairs']:,} different), {lfw.identities:,} identities, in the "
                f"{_folds_text(metrics['lfw_pairs_folds'], bool(metrics['lfw_pairs_folds_from_file']))}. ")
        if not metrics["lfw_pairs_train_identities"]:
            text += "None of them is a training identity, so these figures are held out."
        else:
            text += (f"{metrics['lfw_pairs_train_identities']:,} of them are TRAINING identities, named by "
                     f"{metrics['lfw_pairs_overlapping_pairs']:,} pairs, so the full figures are optimistic. ")
            if "lfw_pairs_heldout_kfold_accuracy_mean" in metrics:
                text += (f"The held-out figures (lfw_pairs_heldout_) use the "
                         f"{metrics['lfw_pairs_heldout_pairs']:,} pairs of two non-training identities "
                         f"({metrics['lfw_pairs_heldout_same_pairs']:,} same, "
                         f"{metrics['lfw_pairs_heldout_different_pairs']:,} different), "
                         f"in {config.folds} seeded stratified folds.")
                held = lfw.heldout
                rocs["LFW pairs.txt, held-out identities"] = vm.roc_curve(lfw.distances[held], lfw.same[held])[:2]
            else:
                text += (f"Only {metrics['lfw_pairs_heldout_pairs']:,} pairs of held-out identities remain, "
                         f"too few for figures of their own: the pairs.txt figures are NOT a held-out "
                         f"benchmark; the test-split figures are.")
        notes.append(text)
    history, curves_png = report.load_training_history(model_dir, required=False)
    return report.build_report_html(
        title="Face verification: threshold evaluation", model=model, metrics=metrics,
        distance_label=DISTANCE_LABELS[name], threshold=threshold,
        seed_threshold=metrics.get("seed_threshold"), test_distances=test.distances, test_same=test.same,
        rocs=rocs, history=history, curves_png=curves_png, examples=examples, notes=notes, warnings=warnings)
