"""Step 3: person name -> integer class id, in sorted name order."""

from kfp.dsl import Artifact, Dataset, Input, Output


def make_labels(images: Input[Dataset], labels: Output[Artifact]):
    """Write labels.json ({name: id}, ids in sorted name order), image_counts.json and provenance.json.

    Args:
        images: Packed image dataset from the extract step.
        labels: Folder with labels.json, image_counts.json and provenance.json
            (the dataset's fingerprint). Metadata: identities, images, singletons.
    """
    from facenet_kfp.kfp_io import compact_metadata, run_step
    from facenet_kfp.labels import build_labels

    summary = run_step("labels", build_labels, images.path, labels.path)
    labels.metadata.update(compact_metadata(summary))
