"""Crop preprocessing: decode, letterbox into a square, normalise like ImageNet training.

The stage feeds the trunk letterboxed pixels, uint8 ``(n, size, size, 3)`` (:func:`prepare`,
:func:`pixels`); the trunk runner normalises them in the model (:func:`normalise`, part of the
exported graph too), so the decode pool does no float pass over the pixels. A JPEG larger than
twice the letterbox is decoded at a reduced scale (``Image.draft``: libjpeg's DCT scaling by 1/2,
1/4 or 1/8, never below the letterboxed size), which spares most of the decode and the resize.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The padding is the mean colour, which normalises to zero: the trunk sees "no signal" there.
PAD_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)

# Errors PIL raises for bytes that are not a decodable image.
DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, EOFError, ValueError, SyntaxError)


def decode_image(data: bytes, size: int | None = None) -> Image.Image:
    """An upright RGB image from encoded bytes (EXIF orientation applied, transparency on the pad colour).

    With ``size``, a JPEG is decoded at the smallest of libjpeg's scales (1/8, 1/4, 1/2) that still
    covers the image letterboxed into ``size`` (:func:`letterbox`), which then only shrinks it less.
    """
    with Image.open(io.BytesIO(data)) as opened:
        if size is not None:
            width, height = opened.size
            opened.draft(None, letterboxed_size(width, height, size))  # JPEG only; a no-op for other formats
        # In place (loads it): otherwise exif_transpose returns a copy of an image already upright, as
        # the detector's crops are. Leaving the block only lets go of the bytes, not the pixels.
        ImageOps.exif_transpose(opened, in_place=True)
    return to_rgb(opened)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB; transparent pixels become the pad colour rather than whatever RGB they hide."""
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*PAD_COLOUR, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized so its longer side is ``size``, centred on a ``size`` square of the pad colour."""
    # Squashing a crop into a square distorts the object's shape, which the trunk reads as a
    # different object. Letterboxing lifted the best F1 of the nearest-reference distance on
    # COCO128 crops from 0.66 to 0.69 for person vs other classes (0.75 to 0.79 in a second
    # run with 3 references) and from 0.80 to 0.94 for elephant vs other animals with one set
    # of references (averaged over 20 random triples of references both give 0.89).
    return Image.fromarray(pixels(image, size))


def letterboxed_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image of this size once :func:`letterbox` has scaled it into ``size``."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def pixels(image: Image.Image, size: int) -> np.ndarray:
    """The trunk's input for one image: ``image`` letterboxed into ``size`` (:func:`letterbox`),
    ``(size, size, 3)`` uint8."""
    # Only the resized image passes from Pillow to numpy, into a copy of the padded square: not a
    # Pillow canvas that the image is pasted on and that is then copied out whole: the same pixels
    # (tests/siamese/test_preprocess.py) for less CPU (bench/embed_bench.py --exports: the letterbox part).
    image = to_rgb(image)
    width, height = letterboxed_size(*image.size, size)
    resized = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)
    out = _pad_square(size).copy()
    left, top = (size - width) // 2, (size - height) // 2
    out[top : top + height, left : left + width] = np.asarray(resized)
    return out


@functools.lru_cache(maxsize=8)
def _pad_square(size: int) -> np.ndarray:
    """A ``(size, size, 3)`` square of the pad colour (read-only: copied, never written)."""
    square = np.empty((size, size, 3), dtype=np.uint8)
    square[:] = PAD_COLOUR
    square.flags.writeable = False
    return square


# (x / 255 - mean) / std as one multiply-add per channel: in to_array (numpy) and normalise (torch,
# inside the trunk runners and their exports), the same float32 operations in the same order.
_SCALE = (1.0 / (255.0 * np.array(IMAGENET_STD, dtype=np.float64))).astype(np.float32)
_SHIFT = (-np.array(IMAGENET_MEAN, dtype=np.float64) / np.array(IMAGENET_STD, dtype=np.float64)).astype(np.float32)


def to_array(image: Image.Image) -> np.ndarray:
    """A ``(3, h, w)`` float32 array of an RGB image, normalised with the ImageNet mean and std."""
    # numpy rather than torch: in a thread of the decode pool, small torch ops fan out to the
    # intra-op thread pool, and with the model's forward pass on the same cores each op waits
    # for them (measured on a busy 2-core machine: 28 ms per crop through torch, 0.4 ms here).
    # Channel by channel from Pillow's own bands: no (h, w, 3) -> (3, h, w) transpose copy, which
    # with the normalisation cost a 224 px crop 0.68 CPU ms, as much as a seventh of the exported
    # trunk (embed_bench --exports); this takes about 0.1 ms and differs by float rounding (5e-7).
    if image.mode != "RGB":
        raise ValueError(f"to_array takes an RGB image, not {image.mode}; convert it with to_rgb first")
    out = np.empty((3, image.height, image.width), dtype=np.float32)
    for channel, band in enumerate(image.split()):
        np.multiply(np.asarray(band), _SCALE[channel], out=out[channel])
        out[channel] += _SHIFT[channel]
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Letterboxed pixels ``(n, h, w, 3)`` uint8 as the trunk's input ``(n, 3, h, w)`` float32, normalised
    as :func:`to_array` does (the same float32 multiply, then add). The trunk runners run it, so an
    export has it in its graph and the host passes uint8."""
    x = images.permute(0, 3, 1, 2).float()
    return x * torch.from_numpy(_SCALE).view(1, 3, 1, 1) + torch.from_numpy(_SHIFT).view(1, 3, 1, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A ``(3, h, w)`` float tensor of an RGB image, normalised with the ImageNet mean and std."""
    return torch.from_numpy(to_array(image))


def prepare(data: bytes, size: int) -> np.ndarray:
    """The trunk runner's input ``(size, size, 3)`` uint8 for one encoded crop: decode (at a reduced
    scale where that covers the letterbox), letterbox."""
    return pixels(decode_image(data, size), size)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """The network input ``(3, size, size)`` for one crop."""
    return to_tensor(letterbox(image, size))
