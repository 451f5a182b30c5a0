"""Step 2: unpack the archive safely into a packed image dataset."""

from kfp.dsl import Dataset, Input, Output


def extract_images(archive: Input[Dataset], shard_size_mb: int, max_skipped_fraction: float,
                   max_expansion: float, images: Output[Dataset]):
    """Validate every member, decode every image once and pack the images into shards.

    Args:
        archive: The dataset archive (.tgz, .tar.gz, .tar or .zip).
        shard_size_mb: Target size of each tar shard in MB.
        max_skipped_fraction: Fail when more than this fraction of the images is unusable.
        max_expansion: Fail when the extraction would write more than this many times the
            archive's size (a decompression bomb).
        images: Packed image dataset (tar shards + manifest.jsonl). Metadata:
            images, identities, image root, shards, skipped files, unusable and re-encoded images.
    """
    from facenet_kfp.extract import extract_dataset
    from facenet_kfp.kfp_io import compact_metadata, run_step

    summary = run_step("extract", extract_dataset, archive.path, images.path, shard_size_mb=shard_size_mb,
                       max_skipped_fraction=max_skipped_fraction, max_expansion=max_expansion)
    images.metadata.update(compact_metadata(summary))
