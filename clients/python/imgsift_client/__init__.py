"""Python client of the imgsift REST API, sync and async.

    from imgsift_client import ImgsiftClient

    with ImgsiftClient("http://localhost:8000", api_key="isk_...") as imgsift:
        job = imgsift.create_job(
            {"query": "elephant", "target": "animal", "sources": [{"kind": "openverse"}]},
            references=["refs/e1.jpg", "refs/e2.jpg"],
        )
        job = imgsift.wait(job.id, on_progress=lambda j: print(f"{j.progress:.0%}"))
        for crop in imgsift.crops(job.id, accepted=True):
            print(crop.crop_id, crop.distance, crop.provenance.license if crop.provenance else None)
        imgsift.export(job.id, "yolo", "elephants-yolo.zip")

``AsyncImgsiftClient`` has the same methods, as coroutines (``crops`` is an async iterator).
Errors are :class:`ImgsiftError` subclasses carrying the API's status and message.
"""

from imgsift_client.client import AsyncImgsiftClient, ImgsiftClient
from imgsift_client.errors import (
    Conflict,
    Forbidden,
    ImgsiftError,
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from imgsift_client.models import Calibration, Crop, Estimate, Export, Job, Provenance, Questions
from imgsift_client.webhooks import InvalidSignature, verify_webhook

__all__ = [
    "AsyncImgsiftClient",
    "Calibration",
    "Conflict",
    "Crop",
    "Estimate",
    "Export",
    "Forbidden",
    "ImgsiftClient",
    "ImgsiftError",
    "InvalidRequest",
    "InvalidSignature",
    "Job",
    "JobFailed",
    "NotFound",
    "Provenance",
    "Questions",
    "RateLimited",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "verify_webhook",
]
