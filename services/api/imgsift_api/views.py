"""Assemble API views from job state: status with counts and progress, and pages of crops."""

from __future__ import annotations

import base64
import json

from imgsift_api.schemas import (
    CalibrationOut,
    Counts,
    CropOut,
    CropPage,
    Discovery,
    EstimateOut,
    JobStatus,
    ModelOut,
    Provenance,
    QuestionsOut,
)
from imgsift_common.celery_app import TRAIN_REQUEST_MARKER
from imgsift_common.messages import Crop, Job, StoredImage
from imgsift_common.progress import compute_progress, reported_progress
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import Counter, Flag, discovery_reason
from imgsift_common.threshold import Estimates, JobThreshold, for_job, questions


def job_status(job: Job, state: StateStore) -> JobStatus:
    counters = state.counters(job.id)
    c = {name: counters.get(name, 0) for name in Counter}
    accepted = state.count_below(job.id, [job.spec.threshold])[0]
    flags = state.flags(job.id)
    progress = compute_progress(counters, flags)
    return JobStatus(
        id=job.id,
        state=job.state,
        spec=job.spec,
        threshold=job.spec.threshold,
        detect_mode=job.detect_mode,
        references=len(job.reference_keys),
        negatives=len(job.negative_keys),
        calibration=calibration(job, state),
        model=ModelOut(
            version=job.model.version if job.model else 0,
            trained_at=job.model.trained_at if job.model else None,
            training=training_requested(job, state),
            stats=job.model.stats if job.model else {},
        ),
        counts=Counts(
            discovered=c[Counter.DISCOVERED],
            downloaded=c[Counter.DOWNLOADED],
            duplicates=c[Counter.DUPLICATES],
            failed=c[Counter.FAILED],
            failed_by_reason={
                k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith(("failed:", "skipped:"))
            },
            skipped=c[Counter.SKIPPED],
            detected=c[Counter.DETECTED],
            crops=c[Counter.CROPS],
            compared=c[Counter.COMPARED],
            compare_failed=c[Counter.COMPARE_FAILED],
            accepted=accepted,
            rejected=c[Counter.COMPARED] - accepted,
        ),
        discovery=Discovery(
            done=Flag.DISCOVERY_DONE in flags, reason=discovery_reason(flags), want_accepted=job.spec.want_accepted
        ),
        stages=progress.stages,
        progress=reported_progress(state, job.id, progress),
        notes=state.notes(job.id),
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


TRAINING_MARKER = TRAIN_REQUEST_MARKER


def training_requested(job: Job, state: StateStore) -> bool:
    """Whether a training is queued or running: a version was asked for that the job does not have yet."""
    requested = state.get_marker(job.id, TRAINING_MARKER)
    return bool(requested) and int(requested or 0) > (job.model.version if job.model else 0)


def calibration(job: Job, state: StateStore, found: JobThreshold | None = None) -> CalibrationOut:
    found = found or for_job(job, state)
    at = found.at_threshold
    return CalibrationOut(
        suggested_threshold=found.suggested if found.crops.n else None,
        basis=found.basis,
        needs_answers=found.needs_answers,
        answers=found.answers,
        positive_share=found.positive_share,
        precision=at.precision,
        recall=at.recall,
        f1=at.f1,
        precision_interval=at.precision_interval,
        recall_interval=at.recall_interval,
        at_suggested=_estimate_out(found.at_suggested) if found.crops.n else None,
        histogram=found.histogram,
        marked_right=found.marked_right,
        marked_wrong=found.marked_wrong,
    )


def _estimate_out(e: Estimates) -> EstimateOut:
    return EstimateOut.model_validate(e, from_attributes=True)


def question_page(job: Job, state: StateStore, limit: int) -> QuestionsOut:
    """The crops the job wants answered next, with the calibration they would refine."""
    found = for_job(job, state)
    asked = questions(job, state, limit, found)
    crops = {c.key: c for c in state.get_crops(job.id, [key for key, _ in asked])}
    images = state.get_images(job.id, {c.image_key for c in crops.values()})
    items = [
        _crop_out(job, crops[key], images.get(crops[key].image_key), distance, job.spec.threshold)
        for key, distance in asked
        if key in crops
    ]
    return QuestionsOut(items=items, calibration=calibration(job, state, found))


def encode_cursor(after: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([after[0], after[1]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (distance, crop key) a cursor points after; ValueError if it is not one of ours."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        distance, key = raw
        return float(distance), str(key)
    except Exception as exc:
        raise ValueError("cursor is not one this API issued; start again without a cursor") from exc


SCAN_PAGES = 20  # pages a filtered listing reads at most per request; its cursor goes on from there


def crop_page(
    job: Job,
    state: StateStore,
    *,
    threshold: float,
    accepted: bool | None,
    cursor: str | None,
    limit: int,
    class_name: str | None = None,
    source: str | None = None,
    min_distance: float | None = None,
    max_distance: float | None = None,
    descending: bool = False,
) -> CropPage:
    """A page of compared crops, by distance (ascending or descending), filtered.

    The distance filters (``accepted``, ``min_distance``, ``max_distance``) are ranges of the
    sorted index; ``class`` and ``source`` are checked per crop, so a filtered page may hold
    fewer than ``limit`` crops while ``next_cursor`` still leads on.
    """
    upper = threshold if accepted is True else None
    if max_distance is not None:
        upper = max_distance if upper is None else min(upper, max_distance)
    lower = threshold if accepted is False else None
    if min_distance is not None:  # inclusive: just below it, exclusive
        floor = min_distance - 1e-12
        lower = floor if lower is None else max(lower, floor)
    after = decode_cursor(cursor) if cursor else None
    items: list[CropOut] = []
    more = True
    for _ in range(SCAN_PAGES):
        page = state.distance_page(
            job.id, max_distance=upper, min_distance_exclusive=lower, after=after, limit=limit, descending=descending
        )
        crops = {c.key: c for c in state.get_crops(job.id, [key for key, _ in page.items])}
        images = state.get_images(job.id, {c.image_key for c in crops.values()})
        full = False
        for key, distance in page.items:
            after = (distance, key)
            crop = crops.get(key)
            if crop is None or (class_name is not None and crop.class_name != class_name):
                continue
            image = images.get(crop.image_key)
            if source is not None and (image is None or image.provenance.source.value != source):
                continue
            items.append(_crop_out(job, crop, image, distance, threshold))
            if len(items) == limit:
                full = True
                break
        more = (full and (key, distance) != page.items[-1]) or page.next_after is not None
        if full or page.next_after is None:
            break
    return CropPage(threshold=threshold, items=items, next_cursor=encode_cursor(after) if more and after else None)


def _crop_out(job: Job, crop: Crop, image: StoredImage | None, distance: float, threshold: float) -> CropOut:
    base = f"/v1/jobs/{job.id}/crops/{crop.crop_id}"
    return CropOut(
        crop_id=crop.crop_id,
        crop_url=f"{base}/image",
        original_url=f"{base}/original",
        box=crop.box,
        padded_box=crop.padded_box,
        class_name=crop.class_name,
        score=crop.score,
        whole_image=crop.whole_image,
        distance=distance,
        accepted=distance <= threshold,
        provenance=Provenance(**image.provenance.model_dump(), fetched_at=image.fetched_at) if image else None,
    )
