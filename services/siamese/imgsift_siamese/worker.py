"""Celery worker of the siamese stage.

Start with ``celery -A imgsift_siamese.worker worker -Q siamese --concurrency 1``: one process
holds one network and batches inside each task. The same worker with ``-Q train`` fine-tunes
jobs' heads (``siamese.train``), so training scales apart from scoring. Settings are read at import, so a bad
configuration stops the worker at start; the stores and the network are opened on the first
task, in the worker process and never in the prefork parent.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import signals

from imgsift_common import webhooks
from imgsift_common.celery_app import TRAIN_REQUEST_MARKER, TaskName, create_celery_app, retry_policy, send
from imgsift_common.leases import Renewal
from imgsift_common.logs import configure_logging
from imgsift_common.messages import CropBatch, JobState, Stage, TrainMessage
from imgsift_common.progress import finish_if_complete
from imgsift_common.servicestate import ServiceStateStore
from imgsift_common.storage import ObjectStore, store_from_settings
from imgsift_siamese.compare import ReferenceImagesError, compare_batch
from imgsift_siamese.embed import job_embedder
from imgsift_siamese.settings import SiameseSettings
from imgsift_siamese.training import TrainingError, rescore, train_job

log = logging.getLogger(__name__)

TRAIN_LOCK_TTL = 60.0  # seconds a training's lock outlives a killed worker (renewed while it runs)


@functools.cache
def worker_settings() -> SiameseSettings:
    return SiameseSettings()


@functools.cache
def object_store() -> ObjectStore:
    return store_from_settings(worker_settings())


@functools.cache
def state_store() -> ServiceStateStore:
    return ServiceStateStore.from_settings(worker_settings())


app = create_celery_app("imgsift-siamese", worker_settings().redis_url, state_store)


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    configure_logging(worker_settings().log_level)


@app.task(
    name=str(TaskName.COMPARE),
    shared=False,  # this app's task only; Celery would otherwise add it to every app the process creates
    **retry_policy(worker_settings().task_max_retries),
)
def compare(payload: dict[str, Any]) -> int:
    """Record the distance of each crop in the batch to its job's reference images."""
    batch = CropBatch.model_validate(payload)
    state = state_store()
    job = state.get_job(batch.job_id)
    if job is None or job.state.is_final:
        log.info(
            "job missing or finished; batch dropped",
            extra={"job_id": batch.job_id, "stage": Stage.SIAMESE.value, "state": job.state if job else None},
        )
        return 0
    settings = worker_settings()
    try:
        embedder = job_embedder(job, object_store(), settings)
        recorded = compare_batch(job, batch.crop_keys, object_store(), state, embedder, settings)
    except ReferenceImagesError as exc:
        # Without references no crop of this job can ever be scored: fail the job with the reason.
        log.error("job failed: %s", exc, extra={"job_id": job.id, "stage": Stage.SIAMESE.value})
        state.set_job_state(job.id, JobState.FAILED, error=str(exc))
        webhooks.notify(state, job.id, lambda m: send(app, TaskName.WEBHOOK, m))
        return 0
    finish_if_complete(state, job.id)
    webhooks.notify(state, job.id, lambda m: send(app, TaskName.WEBHOOK, m))
    return len(recorded)


@app.task(name=str(TaskName.TRAIN), shared=False, **retry_policy(worker_settings().task_max_retries))
def train(payload: dict[str, Any]) -> int:
    """Fine-tune the job's head, then score every crop of the job again with it."""
    message = TrainMessage.model_validate(payload)
    state = state_store()
    fields = {"job_id": message.job_id, "stage": Stage.SIAMESE.value, "version": message.version}
    job = state.get_job(message.job_id)
    if job is None:
        log.info("job missing; training dropped", extra=fields)
        return 0
    if job.model is not None and job.model.version >= message.version:
        log.info("model version already trained; redelivery dropped", extra=fields)
        return 0
    owner = f"train-{message.version}"

    def hold() -> bool:
        return state.hold_lock(message.job_id, "train", owner, TRAIN_LOCK_TTL)

    if not hold():
        log.info("another training of this job runs", extra=fields)
        return 0
    # Renewed while this task works, so a killed worker's lock runs out within TRAIN_LOCK_TTL
    # and does not hold the job's next training back for long.
    try:
        with Renewal(hold, TRAIN_LOCK_TTL / 3, "train-lock"):
            settings = worker_settings()
            try:
                model = train_job(job, object_store(), state, settings, message.version)
            except TrainingError as exc:
                state.set_marker(job.id, TRAIN_REQUEST_MARKER, "0")  # nothing pending any more
                state.add_note(job.id, f"training v{message.version} failed: {exc}")
                log.warning("training failed: %s", exc, extra=fields)
                return 0
            state.add_note(job.id, f"Siamese head v{model.version} trained; every crop scored again with it")
            # rescore publishes the head once the old head's distances are gone, then scores every crop.
            return rescore(job, object_store(), state, settings, model=model)
    finally:
        state.release_lock(job.id, "train", owner)
