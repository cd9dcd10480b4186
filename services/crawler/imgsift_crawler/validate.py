"""Deciding that bytes are an image: by decoding them, never by the Content-Type header."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError, features

from imgsift_common.messages import FailureReason
from imgsift_crawler.dedup import HASH_DRAFT, perceptual_hash

_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _optional_formats() -> set[str]:
    """AVIF and HEIC/HEIF, where a maintained decoder is installed (Pillow's own libavif, pillow-heif)."""
    found = set()
    if features.check("avif"):  # Pillow >= 11.3 built with libavif (the PyPI wheels are)
        found.add("AVIF")
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        pass
    else:
        register_heif_opener(thumbnails=False)  # HEIC/HEIF: the primary image only
        found.add("HEIF")
    return found


# Raster formats a detector can read; of animations (GIF, WebP, AVIF) the first frame only is
# decoded. SVG and HTML never decode here, so they are refused as not_an_image with what they
# look like; formats Pillow decodes but we do not want (EPS, PDF, ICO...) as unsupported.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"} | _optional_formats())


class ImageRejected(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # after EXIF orientation, the pixels a detector sees
    height: int
    sha256: str
    phash: int | None = None  # 64-bit perceptual hash, when asked for


def inspect_image(
    data: bytes, *, max_pixels: int, min_side: int, phash: bool = False, max_frames: int | None = None
) -> ImageInfo:
    """Decode ``data`` fully and return what it is, or raise :class:`ImageRejected` with why.

    With ``phash`` the perceptual hash comes from the same decode. A JPEG is then decoded
    to grey only: every byte of the file is still read and checked (a truncated or corrupt
    stream fails just the same), but the colour conversion is skipped.
    """
    if not data:
        raise ImageRejected(FailureReason.EMPTY, "zero bytes")
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises at twice it; we want a clear refusal
        # at our own cap, checked from the header before any pixel is decoded.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format or "unknown"
                if image_format not in ALLOWED_FORMATS:
                    raise ImageRejected(FailureReason.UNSUPPORTED_FORMAT, f"format {image_format}")
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected(FailureReason.TOO_MANY_PIXELS, f"{width}x{height} is over {max_pixels} pixels")
                if max_frames is not None and getattr(image, "is_animated", False):
                    # Counting walks the frames' headers, not their pixels; then back to the first.
                    frames = getattr(image, "n_frames", 1)
                    if frames > max_frames:
                        raise ImageRejected(FailureReason.TOO_MANY_FRAMES, f"{frames} frames; the cap is {max_frames}")
                    image.seek(0)
                if phash and image_format == "JPEG":
                    image.draft("L", (HASH_DRAFT, HASH_DRAFT))
                image.load()  # decode every byte of the first frame: truncated files fail here
                try:
                    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                except Exception as exc:  # a hostile EXIF block: whatever the parser trips on, refuse it
                    raise ImageRejected(FailureReason.NOT_AN_IMAGE, f"unreadable EXIF metadata: {exc}") from exc
                if orientation in _TURNED:
                    width, height = height, width
                _check_exif(image.info.get("exif"))
                hashed = perceptual_hash(image) if phash else None
        except ImageRejected:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageRejected(FailureReason.TOO_MANY_PIXELS, str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageRejected(FailureReason.NOT_AN_IMAGE, _sniff(data)) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected(FailureReason.NOT_AN_IMAGE, f"does not decode: {exc}") from exc
    if min(width, height) < min_side:
        raise ImageRejected(FailureReason.TOO_SMALL, f"{width}x{height} is under {min_side} px on a side")
    return ImageInfo(
        format=image_format, width=width, height=height, sha256=hashlib.sha256(data).hexdigest(), phash=hashed
    )


def _check_exif(exif: object) -> None:
    """Refuse EXIF whose first directory claims more entries than its segment holds (a parser trap)."""
    if not isinstance(exif, bytes) or len(exif) < 14:
        return
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 10:
        raise ImageRejected(FailureReason.NOT_AN_IMAGE, "malformed EXIF metadata: no TIFF header")
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    if offset + 2 > len(tiff):
        raise ImageRejected(
            FailureReason.NOT_AN_IMAGE, f"malformed EXIF metadata: directory at {offset} is past the end"
        )
    (entries,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    if offset + 2 + 12 * entries > len(tiff):
        raise ImageRejected(
            FailureReason.NOT_AN_IMAGE,
            f"malformed EXIF metadata: {entries} directory entries do not fit in its {len(tiff)} bytes",
        )


def _sniff(data: bytes) -> str:
    """Say what undecodable bytes look like, so the record tells a user more than 'not an image'."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG (vector images are not supported)"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML page"
    return "bytes that no supported image decoder reads"
