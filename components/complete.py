"""Step 4: augment each identity up to a multiple of K images."""

from kfp.dsl import Artifact, Dataset, Input, Output


def complete_identities(images: Input[Dataset], labels: Input[Artifact], multiple: int,
                        min_images: int, seed: int, shard_size_mb: int,
                        completion: Output[Dataset]):
    """Generate the images that bring every identity to a multiple of `multiple`.

    Args:
        images: Packed image dataset from the extract step.
        labels: Labels folder from the labels step, made from `images`.
        multiple: K; every identity is completed to a multiple of it.
        min_images: Identities with fewer real images are not completed.
        seed: Seed of the deterministic augmentations.
        shard_size_mb: Target size of each tar shard in MB.
        completion: Packed dataset holding only the generated images
            (manifest rows marked synthetic, naming their source image) and
            provenance.json (dataset and labels fingerprints, multiple,
            min_images, seed).
    """
    from facenet_kfp.complete import complete_dataset
    from facenet_kfp.kfp_io import compact_metadata, run_step

    summary = run_step("complete", complete_dataset, images.path, labels.path, completion.path,
                       multiple=multiple, seed=seed, min_images=min_images,
                       shard_size_mb=shard_size_mb)
    completion.metadata.update(compact_metadata(summary))
