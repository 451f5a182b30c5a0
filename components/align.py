"""Step 2a (with data.align on): detect each face and warp it onto the landmark template."""

from kfp.dsl import Dataset, Input, Output


def align_faces(raw_images: Input[Dataset], size: int, max_fallback_fraction: float, images: Output[Dataset]):
    """Align every image of a packed dataset: MTCNN's five landmarks warped onto a size x size template.

    Args:
        raw_images: Packed image dataset from the extract step.
        size: Side of the aligned crops in pixels.
        max_fallback_fraction: Fail when more than this fraction of the images had no face found
            (each such image is kept as its centre square crop, resized).
        images: Packed dataset of the aligned images, laid out as extract's output. Metadata:
            images, identities, align fallbacks (and the first few of them), detector, size.
    """
    from facenet_kfp.align import align_dataset
    from facenet_kfp.kfp_io import compact_metadata, run_step

    summary = run_step("align", align_dataset, raw_images.path, images.path, size=size,
                       max_fallback_fraction=max_fallback_fraction)
    images.metadata.update(compact_metadata({
        "images": summary["images"], "identities": summary["identities"],
        "align_fallbacks": summary["align_fallbacks"], "align_fallback_examples": summary["align_fallback_examples"],
        "detector": summary["alignment"]["detector"], "size": summary["alignment"]["size"]}))
