"""Detector fixtures: the real YOLO model (loaded once), settings, and jobs with stored images."""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import (
    Job,
    JobSpec,
    JobState,
    SourceKind,
    SourceSpec,
    StoredImage,
)
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import DownloadItem
from imgsift_common.storage import ObjectStore
from imgsift_detector.model import Detector, get_detector
from imgsift_detector.settings import DetectorSettings
from tests.support.records import stored_image

JOB_ID = "job-detect"


@pytest.fixture(scope="session")
def detector(yolo_weights: Path) -> Detector:
    """The real yolov8n, loaded once for every detector test (the process cache keeps it)."""
    return get_detector(str(yolo_weights), "cpu")


@pytest.fixture
def detector_settings(yolo_weights: Path) -> DetectorSettings:
    return DetectorSettings(storage="local", weights=str(yolo_weights))


def make_job(state: StateStore, target: str, job_state: JobState = JobState.RUNNING) -> Job:
    job = Job(
        id=JOB_ID,
        spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["https://example.org/a.jpg"])], target=target),
        state=job_state,
    )
    assert state.create_job(job)
    return job


def add_image(
    state: StateStore, store: ObjectStore, data: bytes, size: tuple[int, int], *, store_object: bool = True
) -> StoredImage:
    """Register an image with the job as the crawler would: object first, then the download record."""
    sha = hashlib.sha256(data).hexdigest()
    key = keys.image_key(JOB_ID, sha, "JPEG")
    url = f"https://example.org/{sha[:12]}.jpg"
    record, image = stored_image(JOB_ID, sha, url=url, size=size, nbytes=len(data))
    if store_object:
        store.put(key, data, "image/jpeg")
    state.record_downloads(JOB_ID, [DownloadItem(record, image)], 1000)
    return image


def add_photos(state: StateStore, store: ObjectStore, paths: list[Path]) -> list[StoredImage]:
    images = []
    for path in paths:
        with Image.open(path) as opened:
            size = opened.size
        images.append(add_image(state, store, path.read_bytes(), size))
    return images


@contextmanager
def imported_worker() -> Iterator[ModuleType]:
    """imgsift_detector.worker imported afresh, as a worker process imports it (settings from the
    environment); its state closed and the logging it configured restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the worker configures logging for its process
    sys.modules.pop("imgsift_detector.worker", None)
    try:
        module = importlib.import_module("imgsift_detector.worker")
        yield module
        if module.state.cache_info().currsize:
            module.state().close()
    finally:
        sys.modules.pop("imgsift_detector.worker", None)
        root.handlers[:], root.level = handlers, level
