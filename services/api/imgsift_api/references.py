"""Reference images uploaded with a job: decoded before they are accepted, stored by content hash."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from imgsift_common import keys
from imgsift_common.storage import ObjectStore

ALLOWED = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO", "TIFF"})


class ReferenceRejected(ValueError):
    pass


def check_reference(filename: str, data: bytes, *, max_bytes: int, max_pixels: int) -> str:
    """The image format of an uploaded reference, or :class:`ReferenceRejected` saying what is wrong."""
    if not data:
        raise ReferenceRejected(f"reference {filename!r} is empty")
    if len(data) > max_bytes:
        raise ReferenceRejected(f"reference {filename!r} has {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ReferenceRejected(f"reference {filename!r} is {image.width}x{image.height}; too many pixels")
                image.load()
                fmt = image.format or ""
        except ReferenceRejected:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ReferenceRejected(f"reference {filename!r} is not an image this API can decode") from exc
    if fmt not in ALLOWED:
        raise ReferenceRejected(f"reference {filename!r} is {fmt}; use JPEG, PNG, WebP, GIF, BMP or TIFF")
    return fmt


def store_reference(store: ObjectStore, job_id: str, data: bytes, image_format: str) -> str:
    key = keys.reference_key(job_id, hashlib.sha256(data).hexdigest(), image_format)
    store.put(key, data, f"image/{image_format.lower()}")
    return key


def store_negative(store: ObjectStore, job_id: str, data: bytes, image_format: str) -> str:
    key = keys.negative_key(job_id, hashlib.sha256(data).hexdigest(), image_format)
    store.put(key, data, f"image/{image_format.lower()}")
    return key
