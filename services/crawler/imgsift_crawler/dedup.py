"""Perceptual hashes for near-duplicate detection (the lookup itself is in imgsift_common.neardup)."""

from __future__ import annotations

import io

import imagehash
from PIL import Image, ImageOps

from imgsift_common.neardup import NearDupQuery, near_dup_query


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of the upright image."""
    upright = ImageOps.exif_transpose(image) or image
    return int(str(imagehash.phash(upright.convert("L"))), 16)


HASH_DRAFT = 256  # JPEGs are decoded at the smallest scale at least this large before hashing


def perceptual_hash_of(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (HASH_DRAFT, HASH_DRAFT))  # JPEG: decode at a fraction of the size, enough for a 32x32 DCT
        return perceptual_hash(image)


def query_for(phash: int, max_distance: int, segments: int) -> NearDupQuery | None:
    """The near-duplicate query, or None when near-duplicate detection is off (distance < 0)."""
    return near_dup_query(phash, max_distance, segments) if max_distance >= 0 else None
