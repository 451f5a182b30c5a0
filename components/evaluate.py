"""Step 8: choose the verification threshold and report the field's metrics."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate_model(model: Input[Model], images: Input[Dataset], splits: Input[Artifact], pairs: Input[Artifact],
                   max_positive_pairs: int, max_pairs_per_identity: int, flip: bool, distance: str,
                   folds: int, far_targets: list, seed_threshold: float,
                   batch_size: int, report_examples: int, seed: int, metrics: Output[Metrics],
                   roc: Output[ClassificationMetrics], report: Output[HTML], threshold: Output[Artifact]):
    """Embed the real validation and test images, pick the threshold on validation, test it.

    Args:
        model: Trained model folder from the train step.
        images: Packed image dataset (real images only are used); the one
            the model was trained on, per model.json's input fingerprints.
        splits: Splits folder (val.txt, test.txt; train.txt to find the training
            identities pairs.txt names) made from `images`, per its provenance.json.
        pairs: Checked pairs from the check pairs step: LFW pairs.txt for the
            standard 10-fold protocol, or a record that none was given.
        max_positive_pairs: Cap on same-person pairs per split (as many different pairs).
        max_pairs_per_identity: Cap on same-person pairs drawn from one identity.
        flip: Also report every figure for image-plus-mirror embeddings (flip_ metrics).
        distance: Pair distance: model (as trained), squared_l2, l2 or cosine.
        folds: Folds of the cross-validated accuracy.
        far_targets: False accept rates at which VAL is reported.
        seed_threshold: A fixed plain-L2 threshold reported for comparison (1.242: the original TF1 implementation's).
        batch_size: Images per embedding batch.
        report_examples: Example test pairs shown in the report.
        seed: Seed of the negative-pair draw.
        metrics: Every scalar: accuracies, AUC, EER, VAL@FAR, thresholds, pair and identity counts.
        roc: Test ROC curve and confusion matrix at the chosen threshold.
        report: HTML report: ROC, distance histograms, training curves, example pairs.
        threshold: threshold.json for serving: threshold, distance definition, model.
    """
    from facenet_kfp.kfp_io import evaluate_task

    evaluate_task(model, images, splits, None, dict(
        max_positive_pairs=max_positive_pairs, max_pairs_per_identity=max_pairs_per_identity, flip=flip,
        distance=distance, folds=folds, far_targets=far_targets, seed_threshold=seed_threshold,
        batch_size=batch_size, report_examples=report_examples, seed=seed),
        pairs, metrics, roc, report, threshold)


def evaluate_on_archive(model: Input[Model], images: Input[Dataset], splits: Input[Artifact],
                        eval_images: Input[Dataset], pairs: Input[Artifact], max_positive_pairs: int,
                        max_pairs_per_identity: int, flip: bool, distance: str, folds: int, far_targets: list,
                        seed_threshold: float, batch_size: int, report_examples: int, seed: int,
                        metrics: Output[Metrics], roc: Output[ClassificationMetrics], report: Output[HTML],
                        threshold: Output[Artifact]):
    """Pick the threshold on the validation identities, test it on a separate evaluation archive.

    As evaluate_model, except that the test pairs come from `eval_images`
    (LFW, say): its checked pairs.txt when one was given (LFW View 2: 10-fold
    accuracy in the file's folds, VAL@FAR, AUC, EER), else pairs drawn over
    all its identities; identities both archives name are counted. Arguments
    not listed here mean what they mean for evaluate_model.

    Args:
        eval_images: Packed image dataset of the evaluation archive.
        pairs: Checked pairs.txt of the evaluation archive (check pairs step), or a
            record that none was given.
    """
    from facenet_kfp.kfp_io import evaluate_task

    evaluate_task(model, images, splits, eval_images, dict(
        max_positive_pairs=max_positive_pairs, max_pairs_per_identity=max_pairs_per_identity, flip=flip,
        distance=distance, folds=folds, far_targets=far_targets, seed_threshold=seed_threshold,
        batch_size=batch_size, report_examples=report_examples, seed=seed),
        pairs, metrics, roc, report, threshold)
