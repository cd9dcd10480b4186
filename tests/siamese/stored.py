"""Store reference images and crops, and register a job, the way the API and the detector do."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import Crop, Job, JobSpec, JobState, SourceKind, SourceSpec
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectStore

JOB_ID = "elephants-0001"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def put_references(store: ObjectStore, images: Sequence[Image.Image], job_id: str = JOB_ID) -> list[str]:
    reference_keys = []
    for image in images:
        data = jpeg(image)
        key = keys.reference_key(job_id, hashlib.sha256(data).hexdigest(), "JPEG")
        store.put(key, data, "image/jpeg")
        reference_keys.append(key)
    return reference_keys


def put_crops(
    store: ObjectStore, state: StateStore, images: Sequence[Image.Image], class_name: str, job_id: str = JOB_ID
) -> list[str]:
    """Store each image as one crop of its own source photo and register it as the detector would."""
    crop_keys = []
    for image in images:
        data = jpeg(image)
        sha = hashlib.sha256(data).hexdigest()
        crop_id = keys.crop_id(sha, 0)
        crop_key = keys.crop_key(job_id, crop_id)
        image_key = keys.image_key(job_id, sha, "JPEG")
        store.put(crop_key, data, "image/jpeg")
        box = (0.0, 0.0, float(image.width), float(image.height))
        crop = Crop(
            job_id=job_id,
            key=crop_key,
            crop_id=crop_id,
            image_key=image_key,
            box=box,
            padded_box=box,
            score=0.9,
            class_name=class_name,
        )
        state.record_detections(job_id, [(image_key, [crop])])
        crop_keys.append(crop_key)
    return crop_keys


def new_job(reference_keys: list[str], job_id: str = JOB_ID, job_state: JobState = JobState.RUNNING) -> Job:
    return Job(
        id=job_id,
        spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["https://example.org/a.jpg"])], target="animal"),
        state=job_state,
        reference_keys=reference_keys,
    )


def create_job(
    state: StateStore, reference_keys: list[str], job_id: str = JOB_ID, job_state: JobState = JobState.RUNNING
) -> Job:
    job = new_job(reference_keys, job_id, job_state)
    assert state.create_job(job)
    return job
