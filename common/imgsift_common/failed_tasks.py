"""What a task that failed for good leaves in its job: never a job that waits forever, never a silent loss.

A task fails for good when its message is bad, or when a transient fault (Redis or the object
store unreachable) outlives its bounded retries. ``celery_app`` records it as a dead letter and
then calls :func:`settle_failed_task`, which records the loss in the job, where
``GET /v1/jobs/{id}`` shows it:

- ``crawler.discover`` of the job's current discovery chain: the job **fails**, with the reason
  as its ``error``. Nothing else would go on discovering, supervising and completing it.
- ``crawler.download``: each URL of the batch without an outcome is recorded as failed with the
  reason ``task_failed`` (``counts.failed_by_reason``); the other URLs of the job go on.
- ``detector.detect``: each image of the batch not yet detected is recorded with no crops, as an
  unreadable image is; the other images go on.
- ``siamese.compare``: each crop of the batch not yet scored is counted in ``compare_failed``.
- ``siamese.train``: the training request is cleared; ``crawler.export``: the export is marked
  failed; ``crawler.webhook``: the delivery is marked failed.

In every case the job gets a note naming the task, its retries and the error. A lost image
costs the job that image, not the job: the job then completes if that was its last work, with
its losses counted. Work recorded this way is never handed on again by the job's supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from imgsift_common.celery_app import DISCOVER_CHAIN_MARKER, TRAIN_REQUEST_MARKER, DeadLetter, TaskName
from imgsift_common.messages import (
    CropBatch,
    DiscoverMessage,
    DownloadBatch,
    DownloadOutcome,
    DownloadRecord,
    ExportMessage,
    FailureReason,
    ImageBatch,
    Job,
    JobState,
    TrainMessage,
    WebhookMessage,
    utcnow,
)
from imgsift_common.progress import finish_if_complete
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import DownloadItem

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
ERROR_IN_NOTE = 300  # characters of the error a note keeps; the dead letter keeps 2,000


def settle_failed_task(
    state: StateStore, letter: DeadLetter, payload: Any, notify: Callable[[str], object] | None = None
) -> Job | None:
    """Record in the job of ``letter`` what its task could not do; the job as it now is.

    ``payload`` is the task's message; ``notify(job_id)`` hands the job's new events to webhooks.
    """
    if letter.job_id is None:
        return None
    job = state.get_job(letter.job_id)
    if job is None or job.state.is_final:
        return job
    why = f"{letter.task} failed for good after {letter.retries} retries: {letter.error[:ERROR_IN_NOTE]}"
    settled = _settle(state, job, letter.task, payload, why)
    state.add_note(job.id, f"{why}; {settled}" if settled else why)
    log.error("task failed for good: %s", settled or "nothing recorded", extra={"job_id": job.id, "task": letter.task})
    job = finish_if_complete(state, job.id)
    if notify is not None:
        notify(letter.job_id)
    return job


def _parse(model: type[M], payload: Any) -> M | None:
    try:
        return model.model_validate(payload)
    except ValidationError:
        return None  # a poison message: the note and the dead letter say what it was


def _settle(state: StateStore, job: Job, task: str, payload: Any, why: str) -> str:
    """Record the task's unfinished work as failed; says what it recorded ("" if nothing)."""
    if task == TaskName.DISCOVER and (tick := _parse(DiscoverMessage, payload)):
        if state.get_marker(job.id, DISCOVER_CHAIN_MARKER) not in (None, tick.chain):
            return ""  # a superseded chain: the job's current chain goes on
        state.set_job_state(job.id, JobState.FAILED, f"discovery stopped: {why}")
        return "the job failed: its discovery chain stopped"
    if task == TaskName.DOWNLOAD and (downloads := _parse(DownloadBatch, payload)):
        urls = list(dict.fromkeys(c.image_url for c in downloads.candidates))
        known = state.url_records(job.id, urls)
        items = [
            DownloadItem(
                DownloadRecord(
                    url=url, outcome=DownloadOutcome.FAILED, reason=FailureReason.TASK_FAILED, detail=why[:500]
                )
            )
            for url in urls
            if url not in known
        ]
        finals = state.record_downloads(job.id, items, job.spec.limits.max_images)
        failed = sum(final.reason is FailureReason.TASK_FAILED for final in finals)
        return f"{failed} URLs recorded as failed ({FailureReason.TASK_FAILED.value})" if failed else ""
    if task == TaskName.DETECT and (images := _parse(ImageBatch, payload)):
        kept = state.get_images(job.id, images.image_keys)
        lost = sum(state.record_detections(job.id, [(key, []) for key in images.image_keys if key in kept]).values())
        return f"{lost} images recorded with no crops" if lost else ""
    if task == TaskName.COMPARE and (crops := _parse(CropBatch, payload)):
        lost = 0
        scored = state.distances_of(job.id, crops.crop_keys)
        for crop in state.get_crops(job.id, crops.crop_keys):
            if crop.key not in scored and state.record_compare_failure(job.id, crop.key):
                lost += 1
        return f"{lost} crops counted in compare_failed" if lost else ""
    if task == TaskName.TRAIN and (training := _parse(TrainMessage, payload)):
        state.set_marker(job.id, TRAIN_REQUEST_MARKER, "0")
        return f"training v{training.version} abandoned"
    if task == TaskName.EXPORT and (request := _parse(ExportMessage, payload)):
        from imgsift_common.exports import ExportState, load_status, save_status

        status = load_status(state, job.id, request.export_id)
        if status is None or status.state is ExportState.DONE:
            return ""
        save_status(
            state,
            job.id,
            status.model_copy(update={"state": ExportState.FAILED, "error": why, "finished_at": utcnow()}),
        )
        return f"export {request.export_id} failed"
    if task == TaskName.WEBHOOK and (delivery := _parse(WebhookMessage, payload)):
        from imgsift_common import webhooks

        try:
            webhooks.record_attempt(
                state, job.id, delivery.delivery_id, webhooks.Attempt(at=utcnow(), error=why), "failed"
            )
        except KeyError:
            return ""
        return f"webhook delivery {delivery.delivery_id} failed"
    return ""
