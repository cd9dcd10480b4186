"""Celery task of the detector: a thin wrapper that parses a message, runs the stage, enqueues the next.

Start with ``celery -A imgsift_detector.worker worker -Q detect --pool threads --concurrency 2``:
one process and one model, two tasks at a time on threads. While one task's images are in the
model, the other's are read, decoded, cropped, stored and recorded (a task's own pipeline
overlaps only its steps, and waits for its first reads and last writes); the model's forward
passes take turns (:mod:`imgsift_detector.model`). Settings are read at import, so a bad
configuration stops the worker at start; the object store and the model are opened on the first
task, once for the process (a prefork worker, ``--concurrency 1``, still works: one model per
child, opened in the child).
"""

from __future__ import annotations

import logging
import threading
from functools import cache
from typing import Any

from imgsift_common import webhooks
from imgsift_common.celery_app import TaskName, create_celery_app, retry_policy, send
from imgsift_common.logs import configure_logging
from imgsift_common.messages import CropBatch, ImageBatch, JobState, Stage
from imgsift_common.progress import finish_if_complete
from imgsift_common.servicestate import ServiceStateStore
from imgsift_common.storage import ObjectStore, store_from_settings
from imgsift_detector.detect import detect_batch
from imgsift_detector.model import WeightsError, detector_from_settings
from imgsift_detector.settings import DetectorSettings

log = logging.getLogger(__name__)

settings = DetectorSettings()
configure_logging(settings.log_level)

# Crop keys per message to the Siamese stage.
CROPS_PER_MESSAGE = 64


# Opened at the worker's start (create_celery_app's worker_init hook waits for the database through
# it), before any task thread asks for it.
@cache
def state() -> ServiceStateStore:
    return ServiceStateStore.from_settings(settings)


app = create_celery_app("imgsift-detector", settings.redis_url, state)


_opening = threading.Lock()


@cache
def _store() -> ObjectStore:
    return store_from_settings(settings)


def store() -> ObjectStore:
    """This process's object store, opened once even when two task threads ask for it first together."""
    with _opening:
        return _store()


@app.task(
    name=TaskName.DETECT,
    shared=False,  # this app's task only; Celery would otherwise add it to every app the process creates
    **retry_policy(settings.task_max_retries),
)
def detect(payload: dict[str, Any]) -> None:
    """Detect and crop a batch of stored images; send the crops to the Siamese stage."""
    message = ImageBatch.model_validate(payload)
    fields = {"job_id": message.job_id, "stage": Stage.DETECT.value}
    job = state().get_job(message.job_id)
    if job is None or job.state.is_final:
        log.info("job missing or finished; message dropped", extra=fields)
        return
    try:
        detector = detector_from_settings(settings)
    except WeightsError as exc:
        # No retry fixes a configuration; fail the job with the reason the API shows, not leave it running.
        state().set_job_state(job.id, JobState.FAILED, str(exc))
        webhooks.notify(state(), job.id, lambda m: send(app, TaskName.WEBHOOK, m))
        raise
    crops = detect_batch(job, message.image_keys, store(), state(), detector, settings)
    crop_keys = [crop.key for crop in crops]
    for start in range(0, len(crop_keys), CROPS_PER_MESSAGE):
        send(app, TaskName.COMPARE, CropBatch(job_id=job.id, crop_keys=crop_keys[start : start + CROPS_PER_MESSAGE]))
    log.info("batch detected", extra={**fields, "image_keys": message.image_keys, "crops": len(crop_keys)})
    finish_if_complete(state(), job.id)  # a job whose images hold no target ends here
    webhooks.notify(state(), job.id, lambda m: send(app, TaskName.WEBHOOK, m))
