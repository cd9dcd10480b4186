"""Object key layout. Keys come from job ids and content hashes only, never user strings."""

from __future__ import annotations

import re

from imgsift_common.messages import is_job_id

_HEX = re.compile(r"^[0-9a-f]{16,64}$")
_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "MPO": "jpg",
    "AVIF": "avif",
    "HEIF": "heic",
}


def _job(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"jobs/{job_id}"


def _hex(value: str) -> str:
    if not _HEX.match(value):
        raise ValueError(f"invalid content hash {value!r}")
    return value


def extension(image_format: str) -> str:
    return _EXT.get(image_format.upper(), "img")


def image_key(job_id: str, sha256: str, image_format: str) -> str:
    return f"{_job(job_id)}/images/{_hex(sha256)}.{extension(image_format)}"


def image_meta_key(job_id: str, sha256: str) -> str:
    return f"{_job(job_id)}/images/{_hex(sha256)}.json"


def reference_key(job_id: str, sha256: str, image_format: str) -> str:
    return f"{_job(job_id)}/refs/{_hex(sha256)}.{extension(image_format)}"


def negative_key(job_id: str, sha256: str, image_format: str) -> str:
    return f"{_job(job_id)}/negatives/{_hex(sha256)}.{extension(image_format)}"


def model_key(job_id: str, version: int) -> str:
    return f"{_job(job_id)}/models/siamese-head-v{int(version)}.pt"


def crop_id(image_sha256: str, index: int) -> str:
    return f"{_hex(image_sha256)[:24]}-{index:03d}"


def crop_key(job_id: str, crop_id_: str) -> str:
    if not re.match(r"^[0-9a-f]{24}-\d{3,}$", crop_id_):
        raise ValueError(f"invalid crop id {crop_id_!r}")
    return f"{_job(job_id)}/crops/{crop_id_}.jpg"


def job_prefix(job_id: str) -> str:
    return _job(job_id) + "/"
