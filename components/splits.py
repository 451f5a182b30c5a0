"""Step 5: identity-disjoint train / validation / test splits."""

from kfp.dsl import Artifact, Input, Output


def split_identities(labels: Input[Artifact], train_fraction: float, val_fraction: float,
                     test_fraction: float, seed: int, test_split: bool, splits: Output[Artifact]):
    """Split identities into train.txt, val.txt and test.txt (no identity in two splits).

    Args:
        labels: Labels folder from the labels step.
        train_fraction: Share of identities for training.
        val_fraction: Share for validation (threshold selection); only identities with 2+ images.
        test_fraction: Share for the held-out test; only identities with 2+ images.
        seed: Seed of the identity shuffle.
        test_split: False when a separate evaluation archive is the test set:
            test.txt is then empty and test_fraction's identities are trained on.
        splits: Folder with train.txt, val.txt, test.txt, summary.json and
            provenance.json (fingerprints of the labels and their dataset).
    """
    from facenet_kfp.kfp_io import compact_metadata, run_step
    from facenet_kfp.splits import make_splits

    summary = run_step("splits", make_splits, labels.path, splits.path,
                       fractions=(train_fraction, val_fraction, test_fraction), seed=seed,
                       test_split=test_split)
    splits.metadata.update(compact_metadata(summary))
