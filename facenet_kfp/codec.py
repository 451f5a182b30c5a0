"""Which image files the pipeline uses, how it stores them and how they become pixels: every Pillow path asks here.

Accepted (`open_image`): a non-empty file that Pillow opens as one of
`IMAGE_FORMATS`, whose header declares both sides at least `MIN_IMAGE_SIDE`
pixels and at most `MAX_IMAGE_PIXELS` pixels in all, and whose pixels then
decode without error. The size comes from the header, before any pixel is
decoded: a small file can declare a huge image (a decompression bomb). Any
other file raises `UnusableImage`, whose reason starts with `EMPTY`,
`NOT_AN_IMAGE`, `UNDECODABLE`, `TOO_SMALL` or `TOO_LARGE`; an error that is
not the file's fault (no memory, an I/O error with an errno, a bug)
propagates. Extract (which skips and counts such a file), completion and
verify/embed (which raise InputError naming it), the NumPy input pipeline and
the report's thumbnails all open images through `open_image`, so a file one
step accepts every step accepts.

Stored (`reencoded`): grey or RGB JPEG and PNG in any mode (`STORED_AS_IS`)
keep their bytes, since TensorFlow's decoders read them as Pillow does. Every
other accepted image (GIF, BMP, TIFF, WebP, CMYK JPEG), which TensorFlow
misreads or cannot read (a 1-bit BMP fails, a palette BMP comes out as its
indices), is re-encoded as lossless PNG, in its own mode when PNG has it
(`PNG_MODES`), else as RGB, the pixels TensorFlow would decode. So whatever
extract stores and verify embeds, training reads as it is.

Decoded (`decode_rgb`): the RGB uint8 pixels TensorFlow's decoders give with
``channels=3``: grey and palette expanded, alpha dropped, 16-bit samples
reduced to their high byte. Its TensorFlow twin, used by the tf.data path and
inside the exported SavedModel, is the decoding in `tf_input.preprocess_image`;
tests/test_numpy_input.py and tests/test_layouts.py hold the two to the same
pixels.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image

# Formats Pillow may open; all but grey/RGB JPEG and PNG are stored re-encoded as PNG.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# Stored as they are: TensorFlow's decoders read these (modes as Pillow names them; None: every
# mode) as Pillow does. Pillow opens a JPEG holding several pictures (a camera's MPO) as "MPO".
STORED_AS_IS = {"JPEG": ("L", "RGB"), "MPO": ("L", "RGB"), "PNG": None}
# Modes a re-encoded PNG keeps (lossless); others become RGB, as TensorFlow would decode them.
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")

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

# How an `UnusableImage` reason starts, one per way a file fails `open_image`.
EMPTY = "empty file"
NOT_AN_IMAGE = "not an image in a supported format"
UNDECODABLE = "undecodable or truncated image"
TOO_SMALL = "too small"
TOO_LARGE = "too many pixels"
# The reasons of a file whose format Pillow recognised: an image, if a broken one.
DAMAGED = (UNDECODABLE, TOO_LARGE, TOO_SMALL)

# Pillow raises these for a file that is not a valid image (its fuzz tests accept the same set,
# less MemoryError, which here means the machine is short of memory and fails the step);
# struct.error comes from headers too short for their fields. OSError counts only without an
# errno (`_is_bad_image`): Pillow's decoders raise a bare OSError("image file is truncated"),
# real I/O errors carry one.
DECODE_ERRORS = (SyntaxError, ValueError, EOFError, NotImplementedError, OverflowError,
                 struct.error, Image.DecompressionBombError)


class UnusableImage(ValueError):
    """A file `open_image` refuses; `reason` says why and starts with one of the reason constants."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def wrong_size(self) -> bool:
        """True when the file is a readable image of a size outside the limits (`size_problem`)."""
        return self.reason.startswith((TOO_SMALL, TOO_LARGE))


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


def _is_bad_image(exc: BaseException) -> bool:
    """Whether `exc`, raised while Pillow opened or decoded a file, says the file is not a valid image."""
    if isinstance(exc, OSError):
        return exc.errno is None
    return isinstance(exc, DECODE_ERRORS)


def open_image(data: bytes) -> Image.Image:
    """The Pillow image of `data`, pixels loaded, when the module's acceptance rule holds; else UnusableImage.

    The size is checked from the header, before the pixels are decoded. The
    image keeps Pillow's ``format`` and ``mode``; close it (or use ``with``).
    """
    if not data:
        raise UnusableImage(f"{EMPTY} (0 bytes)")
    image = None
    try:
        with warnings.catch_warnings():
            # Pillow warns on opening an image over its own limit; the size check refuses it anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        problem = size_problem(*image.size)   # from the header: open() decodes no pixels
        if not problem:
            image.load()                      # finds truncated or corrupt data
    except Image.UnidentifiedImageError as exc:
        raise UnusableImage(f"{NOT_AN_IMAGE} ({', '.join(IMAGE_FORMATS)})") from exc
    except Image.DecompressionBombError as exc:   # over twice Pillow's limit: refused by open()
        raise UnusableImage(f"{TOO_LARGE} ({exc})") from exc
    except (OSError, *DECODE_ERRORS) as exc:
        if image is not None:
            image.close()
        if not _is_bad_image(exc):
            raise
        raise UnusableImage(f"{UNDECODABLE} ({type(exc).__name__}: {exc})") from exc
    if problem:
        image.close()
        raise UnusableImage(problem)
    return image


def stored_as_is(image: Image.Image) -> bool:
    """Whether the bytes `image` was opened from are stored as they are (`STORED_AS_IS`)."""
    kept = STORED_AS_IS.get(image.format, ())
    return kept is None or image.mode in kept


def encode_png(image: Image.Image) -> bytes:
    """`image` as PNG, lossless: in its own mode when PNG has it (`PNG_MODES`), else as RGB."""
    buffer = io.BytesIO()
    (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, "PNG")
    return buffer.getvalue()


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """`image` as a grey or RGB JPEG of `quality` (any other mode converted to RGB)."""
    buffer = io.BytesIO()
    (image if image.mode in ("L", "RGB") else image.convert("RGB")).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def reencoded(image: Image.Image) -> bytes | None:
    """What to store for an image `open_image` accepted: None for its own bytes (`stored_as_is`), else `encode_png`."""
    return None if stored_as_is(image) else encode_png(image)


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image -> decoded RGB Pillow image, the pixels TensorFlow's decoders give with channels=3.

    Grey and palette images are expanded to RGB, alpha is dropped and 16-bit
    grey samples keep their high byte (TensorFlow's uint16 -> uint8 conversion).
    UnusableImage (a ValueError) for a file `open_image` refuses; a size outside
    `size_problem`'s limits is refused before decoding.
    """
    image = open_image(data)
    if image.mode == "RGB":
        return image
    with image:
        if image.mode.startswith("I"):
            grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
        return image.convert("RGB")
