from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imgsift_siamese.preprocess import (
    DECODE_ERRORS,
    PAD_COLOUR,
    decode_image,
    letterbox,
    letterboxed_size,
    normalise,
    pixels,
    prepare,
    preprocess,
    to_array,
    to_tensor,
)
from tests.support.coco import Coco128

RED = (200, 30, 40)


@pytest.mark.parametrize(("size", "content_box"), [((200, 100), (0, 56, 224, 168)), ((50, 200), (84, 0, 140, 224))])
def test_letterbox_keeps_aspect_ratio_and_pads_with_the_mean_colour(
    size: tuple[int, int], content_box: tuple[int, int, int, int]
) -> None:
    boxed = letterbox(Image.new("RGB", size, RED), 224)

    assert boxed.size == (224, 224)
    left, top, right, bottom = content_box
    assert boxed.getbbox() is not None
    assert boxed.getpixel(((left + right) // 2, (top + bottom) // 2)) == RED
    assert boxed.getpixel((left, top)) == RED
    assert boxed.getpixel((right - 1, bottom - 1)) == RED
    # Just outside the content on the padded axis, and the corners, are the pad colour.
    if top > 0:
        assert boxed.getpixel((112, top - 1)) == PAD_COLOUR
        assert boxed.getpixel((112, bottom)) == PAD_COLOUR
    else:
        assert boxed.getpixel((left - 1, 112)) == PAD_COLOUR
        assert boxed.getpixel((right, 112)) == PAD_COLOUR
    assert boxed.getpixel((0, 0)) == PAD_COLOUR == boxed.getpixel((223, 223))


def test_padding_normalises_to_about_zero() -> None:
    tensor = preprocess(Image.new("RGB", (300, 30), RED), 64)

    assert tensor.shape == (3, 64, 64)
    assert torch.allclose(tensor[:, 0, 0], torch.zeros(3), atol=0.01)
    assert not torch.allclose(tensor[:, 32, 32], torch.zeros(3), atol=0.5)


def test_to_tensor_normalises_with_imagenet_statistics() -> None:
    white = to_tensor(Image.new("RGB", (2, 2), (255, 255, 255)))

    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert torch.allclose(white[:, 1, 1], expected, atol=1e-5)


def test_transparent_pixels_become_the_pad_colour() -> None:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((5, 5), (0, 0, 255, 255))

    boxed = letterbox(image, 10)

    assert boxed.getpixel((0, 0)) == PAD_COLOUR
    assert boxed.getpixel((5, 5)) == (0, 0, 255)


def test_decode_image_turns_by_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), RED).save(buffer, "JPEG", exif=exif)

    image = decode_image(buffer.getvalue())

    assert image.size == (20, 40)
    assert image.mode == "RGB"


def test_decode_image_rejects_bytes_that_are_no_image() -> None:
    with pytest.raises(DECODE_ERRORS):
        decode_image(b"<html>not an image</html>")


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)  # the detector's crop quality
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_letterbox(coco128: Coco128) -> None:
    """A real 640 px photo for a 224 px letterbox: libjpeg's 1/2 scale (320 px), not 1/4 (160 px,
    below the letterbox); the letterboxed pixels stay close to those of a full decode."""
    with Image.open(coco128.images[0]) as opened:
        photo = opened.convert("RGB")
    data = _jpeg(photo)
    width, height = photo.size
    assert max(width, height) == 640

    reduced = decode_image(data, 224)

    assert reduced.size == ((width + 1) // 2, (height + 1) // 2)
    assert all(r >= need for r, need in zip(reduced.size, letterboxed_size(width, height, 224), strict=True))
    full = pixels(decode_image(data), 224).astype(np.int16)
    drafted = prepare(data, 224)
    assert drafted.dtype == np.uint8 and drafted.shape == (224, 224, 3)
    difference = np.abs(drafted.astype(np.int16) - full)
    print(f"reduced-scale decode: mean pixel difference {difference.mean():.2f}, 99th percentile "
          f"{np.percentile(difference, 99):.0f}")  # fmt: skip
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 20
    # No reduction where it would not cover the letterbox: a 300 px image for 224 px, and any PNG.
    small = photo.resize((300, 200))
    assert decode_image(_jpeg(small), 224).size == (300, 200)
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_image(png.getvalue(), 224).size == (width, height)


def test_a_reduced_scale_decode_still_turns_by_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image = decode_image(_jpeg(Image.new("RGB", (1000, 400), RED), exif=exif), 224)

    assert image.size == (100, 250)  # 1/4 scale, then turned: covers 224 x 90
    assert pixels(image, 224).shape == (224, 224, 3)


def test_the_runners_normalisation_is_to_arrays(crops_by_class: dict[str, list[Image.Image]]) -> None:
    """``normalise`` (torch, in the trunk runners and their exports) gives to_array's floats bit for bit."""
    images = [crops_by_class["elephant"][0], crops_by_class["person"][1]]
    batch = np.stack([pixels(im, 96) for im in images])

    got = normalise(torch.from_numpy(batch)).numpy()

    assert got.dtype == np.float32 and got.shape == (2, 3, 96, 96)
    assert np.array_equal(got, np.stack([to_array(letterbox(im, 96)) for im in images]))


def _pasted(image: Image.Image, size: int) -> np.ndarray:
    """The letterbox as Pillow composes it: the resized image pasted on a canvas of the pad colour."""
    image = image.convert("RGB")
    width, height = letterboxed_size(*image.size, size)
    canvas = Image.new("RGB", (size, size), PAD_COLOUR)
    canvas.paste(image.resize((width, height), Image.Resampling.BILINEAR), ((size - width) // 2, (size - height) // 2))
    return np.asarray(canvas)


@pytest.mark.parametrize("size", [224, 97])
def test_pixels_are_the_pillow_letterbox_bit_for_bit(crops_by_class: dict[str, list[Image.Image]], size: int) -> None:
    """``pixels`` places the resized image in numpy, not on a Pillow canvas: the same pixels for real
    crops smaller and larger than the square, odd sizes, one that already has the letterbox's size,
    and other modes."""
    images = [im for crops in crops_by_class.values() for im in crops[:3]]
    images += [images[0].resize((size, size // 3)), images[1].convert("L"), images[2].convert("P")]
    for image in images:
        got = pixels(image, size)
        assert got.dtype == np.uint8 and got.shape == (size, size, 3) and got.flags.writeable
        assert np.array_equal(got, _pasted(image, size)), image.size
        assert np.array_equal(np.asarray(letterbox(image, size)), got)
