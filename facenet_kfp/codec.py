"""How an encoded image becomes pixels: the one decoder every NumPy/Pillow path uses."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from facenet_kfp.image_limits import size_problem


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image -> decoded RGB Pillow image, the pixels TensorFlow's decoders give with channels=3.

    Grey and palette images are expanded to RGB, alpha is dropped and 16-bit
    grey samples keep their high byte (TensorFlow's uint16 -> uint8 conversion).
    ValueError, before decoding, for a size outside `image_limits.size_problem`'s limits.
    """
    image = Image.open(io.BytesIO(data))
    if problem := size_problem(*image.size):
        image.close()
        raise ValueError(problem)
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I"):
        grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")

