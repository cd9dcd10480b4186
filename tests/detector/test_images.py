"""The pure image helpers: decoding upright RGB, padding boxes inside the image, cutting JPEG crops."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imgsift_detector.detect import UnreadableImage, cut_crop, load_image, padded_box


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_padded_box_grows_by_the_pad_on_each_side() -> None:
    assert padded_box((100, 100, 200, 150), 0.1, 640, 480) == (90, 95, 210, 155)


def test_padded_box_is_clipped_to_the_image() -> None:
    assert padded_box((2, 3, 58, 470), 0.1, 60, 480) == (0, 0, 60, 480)


def test_padded_box_widens_to_whole_pixels() -> None:
    assert padded_box((10.4, 20.6, 30.2, 40.9), 0.0, 640, 480) == (10, 20, 31, 41)


def test_cut_crop_is_a_jpeg_of_the_box_pixels() -> None:
    image = Image.new("RGB", (64, 48), "blue")
    image.paste((255, 0, 0), (0, 0, 32, 48))  # left half red

    data = cut_crop(image, (4.0, 10.0, 24.0, 40.0), quality=95)

    with Image.open(io.BytesIO(data)) as crop:
        assert crop.format == "JPEG"
        assert crop.size == (20, 30)
        red, green, blue = crop.convert("RGB").getpixel((10, 15))
    assert red > 240 and green < 15 and blue < 15


def test_load_image_turns_the_image_upright_by_its_exif_orientation() -> None:
    landscape = Image.new("RGB", (40, 20), "white")
    landscape.paste((0, 0, 0), (0, 0, 10, 20))  # a black band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates it 90° clockwise

    upright = load_image(_encode(landscape, "JPEG", exif=exif.tobytes(), quality=95))

    assert upright.size == (20, 40)
    assert upright.mode == "RGB"
    assert max(upright.getpixel((10, 2))) < 40  # the band is now at the top
    assert min(upright.getpixel((10, 37))) > 215


def test_load_image_shows_transparent_pixels_on_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # transparent, with black hidden underneath

    pixels = load_image(_encode(image, "PNG"))

    assert pixels.mode == "RGB"
    assert pixels.getpixel((0, 0)) == (255, 255, 255)
    assert pixels.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>", _encode(Image.new("RGB", (64, 64)), "JPEG")[:200]])
def test_load_image_refuses_bytes_that_do_not_decode(data: bytes) -> None:
    with pytest.raises(UnreadableImage):
        load_image(data)
