"""Bytes are judged by decoding them, with a reason for every refusal."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from imgsift_common.messages import FailureReason
from imgsift_crawler.dedup import perceptual_hash_of
from imgsift_crawler.validate import ImageRejected, inspect_image

LIMITS = {"max_pixels": 50_000_000, "min_side": 32}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions: a decompression bomb stand-in, refused from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    )  # fmt: skip


def _encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


def test_real_photo_is_accepted_with_its_size_and_hash(coco128) -> None:
    data = coco128.images[0].read_bytes()
    info = inspect_image(data, **LIMITS)
    with Image.open(coco128.images[0]) as im:
        assert (info.width, info.height) == im.size
    assert info.format == "JPEG"
    assert len(info.sha256) == 64


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_other_raster_formats_are_accepted(fmt: str) -> None:
    assert inspect_image(_encoded(fmt), **LIMITS).format == fmt


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"", FailureReason.EMPTY, "zero"),
        (b"<!doctype html><html><body>nope</body></html>", FailureReason.NOT_AN_IMAGE, "HTML"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', FailureReason.NOT_AN_IMAGE, "SVG"),
        (b"\xff\xd8\xff\xe0garbage" * 10, FailureReason.NOT_AN_IMAGE, ""),
    ],
)
def test_non_images_are_refused_with_a_reason(data: bytes, reason: FailureReason, detail: str) -> None:
    with pytest.raises(ImageRejected) as err:
        inspect_image(data, **LIMITS)
    assert err.value.reason is reason
    assert detail in err.value.detail


@pytest.mark.parametrize("phash", [False, True])
def test_truncated_jpeg_is_refused(coco128, phash: bool) -> None:  # type: ignore[no-untyped-def]
    data = coco128.images[1].read_bytes()
    for cut in (len(data) // 2, len(data) - 64):
        with pytest.raises(ImageRejected) as err:
            inspect_image(data[:cut], **LIMITS, phash=phash)
        assert err.value.reason is FailureReason.NOT_AN_IMAGE


def test_perceptual_hash_comes_from_the_same_decode(coco128) -> None:  # type: ignore[no-untyped-def]
    for photo in coco128.images[:5]:
        data = photo.read_bytes()
        assert inspect_image(data, **LIMITS, phash=True).phash == perceptual_hash_of(data)
    assert inspect_image(_encoded("PNG"), **LIMITS, phash=True).phash == perceptual_hash_of(_encoded("PNG"))
    assert inspect_image(coco128.images[0].read_bytes(), **LIMITS).phash is None


def test_exif_rotation_swaps_the_reported_size(coco128) -> None:  # type: ignore[no-untyped-def]
    with Image.open(coco128.images[0]) as im:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", exif=exif.tobytes())
        width, height = im.size
    info = inspect_image(buffer.getvalue(), **LIMITS, phash=True)
    assert (info.width, info.height) == (height, width)


def test_tiny_image_is_refused() -> None:
    with pytest.raises(ImageRejected) as err:
        inspect_image(_encoded("PNG", (1, 1)), **LIMITS)
    assert err.value.reason is FailureReason.TOO_SMALL


def test_pixel_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageRejected) as err:
        inspect_image(_png_header_only(100_000, 100_000), **LIMITS)
    assert err.value.reason is FailureReason.TOO_MANY_PIXELS


def test_decodable_but_unwanted_format_is_refused() -> None:
    with pytest.raises(ImageRejected) as err:
        inspect_image(_encoded("ICO", (64, 64)), **LIMITS)
    assert err.value.reason is FailureReason.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heic_are_accepted_where_a_decoder_is_installed(fmt: str) -> None:
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow is built without libavif")
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif")
    info = inspect_image(_encoded(fmt, (80, 60)), **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 80, 60)


def test_an_animated_gif_is_judged_by_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 48), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert inspect_image(buffer.getvalue(), **LIMITS).format == "GIF"


def test_a_pixel_bomb_is_refused_whatever_the_format() -> None:
    big = _encoded("GIF", (1500, 1500))  # a few KiB that decode to 2.25 megapixels
    with pytest.raises(ImageRejected) as err:
        inspect_image(big, max_pixels=1_000_000, min_side=32)
    assert err.value.reason is FailureReason.TOO_MANY_PIXELS
    assert len(big) < 50_000
