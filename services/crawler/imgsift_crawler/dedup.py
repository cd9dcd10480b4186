"""Perceptual hashes for near-duplicate detection (the lookup itself is in imgsift_common.neardup)."""

from __future__ import annotations

import io

import imagehash
import scipy.fftpack  # noqa: F401  imagehash.phash imports it at its first hash: here, a prefork worker's parent does, once
from PIL import Image, ImageOps

from imgsift_common.neardup import NearDupQuery


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of the upright image."""
    upright = ImageOps.exif_transpose(image) or image
    return int(str(imagehash.phash(upright.convert("L"))), 16)


# JPEGs are decoded at the smallest DCT scale (1/2 to 1/8) at least this large before hashing: twice
# the 32 x 32 grey image the hash is taken from. Decoding at 1/8 instead of 1/2 (HASH_DRAFT 256
# before) halves the crawler's decode-and-hash time; on crawl_bench's 2,000-image corpus it moved a
# hash by 1.1 bits on average (8 at most) and changed no near-duplicate decision
# (bench/crawl_bench.py --hash-drafts 256,64 measures both).
HASH_DRAFT = 64


def perceptual_hash_of(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (HASH_DRAFT, HASH_DRAFT))  # JPEG: decode at a fraction of the size, enough for a 32x32 DCT
        return perceptual_hash(image)


def query_for(phash: int, max_distance: int) -> NearDupQuery | None:
    """The near-duplicate query, or None when near-duplicate detection is off (distance < 0)."""
    return NearDupQuery(phash, max_distance) if max_distance >= 0 else None
