"""Object key layout. Keys come from job ids and content hashes only, never user strings."""

from __future__ import annotations

import re

from imgsift_common.messages import is_job_id

_HEX = re.compile(r"^[0-9a-f]{16,64}$")
_SHORT_ID = re.compile(r"^[0-9a-f]{8,64}$")
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


def features_prefix(job_id: str, trunk_id: str) -> str:
    """Where the trunk features ``trunk_id`` (backbone, weights, input size) computed for the job are stored."""
    if not _SHORT_ID.match(trunk_id):
        raise ValueError(f"invalid trunk id {trunk_id!r}")
    return f"{_job(job_id)}/features/{trunk_id}/"


def crop_features_key(job_id: str, trunk_id: str, digest: str) -> str:
    """One object of crop feature rows: those of one compare batch, named by the hash of its crop keys."""
    return f"{features_prefix(job_id, trunk_id)}crops/{_hex(digest)}.npz"


def feature_set_key(job_id: str, trunk_id: str, digest: str) -> str:
    """Feature rows of a set of images (references, "not this" images), named by the hash of their keys."""
    return f"{features_prefix(job_id, trunk_id)}sets/{_hex(digest)}.npz"


def crop_id(image_sha256: str, index: int) -> str:
    return f"{_hex(image_sha256)[:24]}-{index:03d}"


def crop_key(job_id: str, crop_id_: str) -> str:
    if not re.match(r"^[0-9a-f]{24}-\d{3,}$", crop_id_):
        raise ValueError(f"invalid crop id {crop_id_!r}")
    return f"{_job(job_id)}/crops/{crop_id_}.jpg"


def job_prefix(job_id: str) -> str:
    return _job(job_id) + "/"
