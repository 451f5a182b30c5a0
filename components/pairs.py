"""Step 6: check pairs.txt against the images it names, before training starts."""

from kfp.dsl import Artifact, Dataset, Input, Output


def check_pairs(images: Input[Dataset], pairs_uri: str, pairs_sha256: str, pairs: Output[Artifact]):
    """Fetch pairs.txt, check every line and every image it names; evaluation reads the checked copy.

    Args:
        images: Packed image dataset the pairs refer to (the evaluation archive's
            when there is one).
        pairs_uri: Optional LFW pairs.txt (https://, gs://, file:// or path) for the
            standard 10-fold protocol; empty to skip.
        pairs_sha256: Expected sha256 of pairs.txt; empty to skip the check.
        pairs: Folder with pairs.txt as fetched and pairs.json (source URI, sha256,
            pair counts, declared folds, duplicates). Metadata: the same counts.
    """
    from facenet_kfp.kfp_io import compact_metadata, run_step
    from facenet_kfp.pairs import check_pairs_source

    summary = run_step("check_pairs", check_pairs_source, pairs_uri, pairs_sha256, images.path, pairs.path)
    pairs.metadata.update(compact_metadata(summary))
