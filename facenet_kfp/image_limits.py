"""The image sizes every step accepts: one rule, applied where images enter and wherever they are decoded.

Extract skips (and counts as unusable) an image outside these limits, so
every image it stores is one that completion, training, evaluation and
serving can use; `verify`/`embed` refuse such a file, and the decoders of
completion and of the input pipeline check them again (an older dataset, a
hand-made one). The size comes from the image header (Pillow reads it on
``Image.open``), so the check costs no decoding.
"""

from __future__ import annotations

# Completion's augmentation resamples with bilinear weights and reflects borders, which needs
# at least 2 x 2 pixels; every other step resizes an image of any size.
MIN_IMAGE_SIDE = 2
# Pillow's own decompression-bomb threshold (1024**3 // 4 // 3 = 89,478,485 pixels, about 268 MB
# once decoded as RGB): above any camera photo a person verifies and far above any face dataset's
# images (LFW's are 250 x 250, VGGFace2's mostly under 1 megapixel). Decoding one image costs memory
# in proportion to its pixels in every decoding worker, so a larger image multiplies the memory of
# training; a fixed number here, not Pillow's mutable Image.MAX_IMAGE_PIXELS, keeps the rule the same
# in every step.
MAX_IMAGE_PIXELS = 1024 ** 3 // 4 // 3
# How `size_problem`'s reasons start.
TOO_SMALL = "too small"
TOO_LARGE = "too many pixels"


def size_problem(width: int, height: int) -> str:
    """Why a `width` x `height` image cannot be used ("" when it can).

    Usable: both sides at least `MIN_IMAGE_SIDE` and at most `MAX_IMAGE_PIXELS`
    pixels in all. A reason starts with `TOO_SMALL` or `TOO_LARGE`.
    """
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        return (f"{TOO_SMALL} ({width}x{height} pixels; every side needs at least "
                f"{MIN_IMAGE_SIDE} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        return (f"{TOO_LARGE} ({width}x{height} = {width * height:,} pixels, more than the limit "
                f"of {MAX_IMAGE_PIXELS:,}; resize the image)")
    return ""
