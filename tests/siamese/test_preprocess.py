from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from imgsift_siamese.preprocess import DECODE_ERRORS, PAD_COLOUR, decode_image, letterbox, preprocess, to_tensor

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
