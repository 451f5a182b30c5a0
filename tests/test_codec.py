"""Tests for facenet_kfp.codec: what is accepted, what is stored as it is, and that every step agrees."""

from __future__ import annotations

import errno
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from facenet_kfp.augment import sample_params
from facenet_kfp.codec import (EMPTY, MAX_IMAGE_PIXELS, NOT_AN_IMAGE, TOO_LARGE, TOO_SMALL, UNDECODABLE,
                               UnusableImage, decode_rgb, open_image, reencoded, stored_as_is)
from facenet_kfp.complete import generate_image
from facenet_kfp.errors import InputError
from facenet_kfp.extract import check_image, extract_dataset
from facenet_kfp.shards import ShardReader, read_manifest
from facenet_kfp.verify import read_image_file

HAS_WEBP = features.check("webp")


def pattern(mode: str, size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A `size` image in `mode` whose pixels all differ along both axes (a lossy step would show)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    if mode == "I;16":
        return Image.fromarray((x * 2741 + y * 977).astype(np.uint16))
    rgba = np.stack([x * 10 % 256, y * 15 % 256, (x + y) * 7 % 256, 255 - x * 5 % 256], axis=-1).astype(np.uint8)
    if mode == "CMYK":
        return Image.fromarray(rgba, "CMYK")
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(64)
    return image.convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (its pixel data is not there)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8   # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def palette_with_alpha() -> Image.Image:
    image = pattern("P")
    image.info["transparency"] = 0
    return image


# name -> (bytes, Pillow format and mode of the image) of every accepted kind
ACCEPTED = {
    "grey.jpg": (encode(pattern("L"), "JPEG"), "JPEG", "L"),
    "rgb.jpg": (encode(pattern("RGB"), "JPEG"), "JPEG", "RGB"),
    "cmyk.jpg": (encode(pattern("CMYK"), "JPEG"), "JPEG", "CMYK"),
    "two-pictures.jpg": (encode(pattern("RGB"), "MPO", save_all=True, append_images=[pattern("L").convert("RGB")]),
                         "MPO", "RGB"),
    "one-bit.png": (encode(pattern("1"), "PNG"), "PNG", "1"),
    "grey.png": (encode(pattern("L"), "PNG"), "PNG", "L"),
    "grey-alpha.png": (encode(pattern("LA"), "PNG"), "PNG", "LA"),
    "palette.png": (encode(pattern("P"), "PNG"), "PNG", "P"),
    "palette-alpha.png": (encode(palette_with_alpha(), "PNG"), "PNG", "P"),
    "rgb.png": (encode(pattern("RGB"), "PNG"), "PNG", "RGB"),
    "rgba.png": (encode(pattern("RGBA"), "PNG"), "PNG", "RGBA"),
    "grey16.png": (encode(pattern("I;16"), "PNG"), "PNG", "I;16"),
    "palette.gif": (encode(pattern("P"), "GIF"), "GIF", "P"),
    "palette-alpha.gif": (encode(palette_with_alpha(), "GIF"), "GIF", "P"),
    "one-bit.bmp": (encode(pattern("1"), "BMP"), "BMP", "1"),
    "palette.bmp": (encode(pattern("P"), "BMP"), "BMP", "P"),
    "rgb.bmp": (encode(pattern("RGB"), "BMP"), "BMP", "RGB"),
    "rgb.tif": (encode(pattern("RGB"), "TIFF"), "TIFF", "RGB"),
    "cmyk.tif": (encode(pattern("CMYK"), "TIFF"), "TIFF", "CMYK"),
    "grey16.tif": (encode(pattern("I;16"), "TIFF"), "TIFF", "I;16"),
    "smallest.png": (encode(Image.new("L", (2, 2), 7), "PNG"), "PNG", "L"),
}
if HAS_WEBP:
    ACCEPTED["rgb.webp"] = (encode(pattern("RGB"), "WEBP", lossless=True), "WEBP", "RGB")
    ACCEPTED["rgba.webp"] = (encode(pattern("RGBA"), "WEBP", quality=90), "WEBP", "RGBA")
# The modes TensorFlow's decoders read from these formats as Pillow does: their bytes are stored.
AS_IS = {"grey.jpg", "rgb.jpg", "two-pictures.jpg", "one-bit.png", "grey.png", "grey-alpha.png", "palette.png",
         "palette-alpha.png", "rgb.png", "rgba.png", "grey16.png", "smallest.png"}
# Re-encoded as PNG: the mode the PNG keeps.
PNG_MODE = {"cmyk.jpg": "RGB", "palette.gif": "P", "palette-alpha.gif": "P", "one-bit.bmp": "1",
            "palette.bmp": "P", "rgb.bmp": "RGB", "rgb.tif": "RGB", "cmyk.tif": "RGB", "grey16.tif": "I;16",
            "rgb.webp": "RGB", "rgba.webp": "RGBA"}

_JPEG = encode(pattern("RGB", (64, 64)), "JPEG")
# name -> (bytes, how the reason starts) of every refused kind
REFUSED = {
    "dot.png": (encode(Image.new("L", (1, 1)), "PNG"), f"{TOO_SMALL} (1x1 pixels"),
    "line.png": (encode(Image.new("RGB", (1, 40)), "PNG"), f"{TOO_SMALL} (1x40 pixels"),
    "row.gif": (encode(Image.new("P", (40, 1)), "GIF"), f"{TOO_SMALL} (40x1 pixels"),
    "huge.png": (png_declaring(12_000, 12_000), f"{TOO_LARGE} (12000x12000 = 144,000,000 pixels"),
    "bomb.png": (png_declaring(40_000, 40_000), f"{TOO_LARGE} (Image size (1600000000 pixels) exceeds limit"),
    "truncated.jpg": (_JPEG[:len(_JPEG) // 2], f"{UNDECODABLE} (OSError: image file is truncated"),
    "text.jpg": (b"no picture here\n" * 8, f"{NOT_AN_IMAGE} (JPEG, PNG, GIF, BMP, TIFF, WEBP)"),
    "portable.ppm.jpg": (encode(pattern("RGB"), "PPM"), NOT_AN_IMAGE),   # Pillow reads it; not accepted
    "empty.jpg": (b"", f"{EMPTY} (0 bytes)"),
}


# --------------------------------------------------------------------------- the acceptance rule

@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_images_open_with_their_format_and_mode(name):
    data, fmt, mode = ACCEPTED[name]
    with open_image(data) as image:
        assert (image.format, image.mode) == (fmt, mode)
        assert stored_as_is(image) == (name in AS_IS)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_images_say_why(name):
    data, reason = REFUSED[name]
    with pytest.raises(UnusableImage) as err:
        open_image(data)
    assert err.value.reason.startswith(reason), err.value.reason
    assert err.value.wrong_size == reason.startswith((TOO_SMALL, TOO_LARGE))
    assert isinstance(err.value, ValueError)


def test_size_limits_are_read_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    big = encode(Image.new("1", (MAX_IMAGE_PIXELS // 2 + 1, 2)), "PNG")   # one pixel over the limit
    for data in (big, REFUSED["huge.png"][0], REFUSED["dot.png"][0]):
        with pytest.raises(UnusableImage):
            open_image(data)
    assert loads == []
    with open_image(encode(Image.new("1", (MAX_IMAGE_PIXELS // 2, 2)), "PNG")) as image:   # exactly the limit
        assert loads == [image.size]


@pytest.mark.parametrize("exc", [MemoryError(), TypeError("a bug"), OSError(errno.EIO, "Input/output error")])
def test_errors_that_are_not_the_files_fault_propagate(monkeypatch, exc):
    def load(self):
        raise exc

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(type(exc)):
        open_image(ACCEPTED["rgb.jpg"][0])


# --------------------------------------------------------------------------- what is stored

@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_reencoded_png_is_lossless_and_keeps_the_mode_png_has(name):
    data, _, _ = ACCEPTED[name]
    with open_image(data) as image:
        encoded = reencoded(image)
        original = np.asarray(image if name in AS_IS or PNG_MODE[name] == image.mode else image.convert("RGB"))
    if name in AS_IS:
        assert encoded is None
        return
    with open_image(encoded) as png:
        assert (png.format, png.mode) == ("PNG", PNG_MODE[name])
        np.testing.assert_array_equal(np.asarray(png), original)
    # ... so the stored PNG gives the pixels the original gives.
    np.testing.assert_array_equal(np.asarray(decode_rgb(encoded)), np.asarray(decode_rgb(data)))


def test_decode_rgb_expands_grey_and_palette_drops_alpha_and_keeps_the_high_byte_of_16_bits():
    grey = pattern("L")
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(grey, "PNG"))),
                                  np.repeat(np.asarray(grey)[..., None], 3, axis=-1))
    rgba = pattern("RGBA")
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(rgba, "PNG"))), np.asarray(rgba)[..., :3])
    palette = pattern("P")
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(palette, "PNG"))), np.asarray(palette.convert("RGB")))
    deep = pattern("I;16")
    high = (np.asarray(deep) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(deep, "PNG"))),
                                  np.repeat(high[..., None], 3, axis=-1))
    for data, reason in REFUSED.values():
        with pytest.raises(UnusableImage) as err:
            decode_rgb(data)
        assert err.value.reason.startswith(reason)



# --------------------------------------------------------------------------- every step agrees

def test_extract_complete_and_verify_accept_and_refuse_the_same_images(tmp_path):
    everything = {name: data for name, (data, *_) in ACCEPTED.items()}
    everything.update({name: data for name, (data, _) in REFUSED.items()})
    members = {name: f"lfw/Person_{i:02d}/Person_{i:02d}_0001.{name.rsplit('.', 1)[1]}"
               for i, name in enumerate(sorted(everything))}
    archive = tmp_path / "faces.tar"
    with tarfile.open(archive, "w") as tar:
        for name, member in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(everything[name])
            tar.addfile(info, io.BytesIO(everything[name]))
    summary = extract_dataset(archive, tmp_path / "dataset", workers=1, max_skipped_fraction=1.0)
    skipped = {item["member"]: item["reason"] for item in summary["skipped"]}
    with ShardReader(tmp_path / "dataset") as reader:
        stored = {row["file"]: reader.read(row) for row in read_manifest(tmp_path / "dataset")}
    params = sample_params(np.random.default_rng(0))
    for name, data in everything.items():
        member = members[name]
        path = tmp_path / "files" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        check = check_image(data)
        if name in ACCEPTED:
            assert check.reason == "" and member not in skipped, name
            kept = stored[member.removeprefix("lfw/")]
            assert kept == (data if name in AS_IS else check.encoded), name
            assert read_image_file(path) == kept, name                   # verify embeds what training reads
            jpeg, width, height = generate_image(data, params, name)     # completion augments it
            assert (width, height) == Image.open(io.BytesIO(data)).size and jpeg[:2] == b"\xff\xd8"
            continue
        reason = check.reason
        assert reason.startswith(REFUSED[name][1]) and skipped[member] == reason, name
        assert member.removeprefix("lfw/") not in stored
        with pytest.raises(InputError) as by_verify:
            read_image_file(path)
        assert str(by_verify.value).startswith(f"{path}: ") and reason in str(by_verify.value)
        with pytest.raises(InputError) as by_complete:
            generate_image(data, params, f"shard-x: {member}")
        assert str(by_complete.value).startswith(f"shard-x: {member}: ") and reason in str(by_complete.value)
    assert summary["images"] == len(ACCEPTED)
    assert sorted(skipped) == sorted(members[name] for name in REFUSED)
