"""Assemble API views from job state: status with counts and progress, and pages of crops."""

from __future__ import annotations

import base64
import json

from imgsift_api.schemas import CalibrationOut, Counts, CropOut, CropPage, Discovery, JobStatus, ModelOut, Provenance
from imgsift_common.calibration import for_job
from imgsift_common.celery_app import TRAIN_REQUEST_MARKER
from imgsift_common.messages import Job
from imgsift_common.progress import compute_progress, reported_progress
from imgsift_common.state import Counter, Flag, StateStore, discovery_reason


def job_status(job: Job, state: StateStore) -> JobStatus:
    counters = state.counters(job.id)
    c = {name: counters.get(name, 0) for name in Counter}
    accepted = state.count_accepted(job.id, job.spec.threshold)
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


def calibration(job: Job, state: StateStore) -> CalibrationOut:
    found = for_job(job, state)
    cal, at = found.calibration, found.at_threshold
    return CalibrationOut(
        suggested_threshold=cal.suggested,
        basis=cal.basis,
        positive_share=cal.positive_share,
        precision=at.precision,
        recall=at.recall,
        f1=at.f1,
        histogram=found.histogram,
        marked_right=found.marked_right,
        marked_wrong=found.marked_wrong,
    )


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


def crop_page(
    job: Job,
    state: StateStore,
    *,
    threshold: float,
    accepted: bool | None,
    cursor: str | None,
    limit: int,
) -> CropPage:
    page = state.distance_page(
        job.id,
        max_distance=threshold if accepted is True else None,
        min_distance_exclusive=threshold if accepted is False else None,
        after=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )
    distances = dict(page.items)
    crops = state.get_crops(job.id, [key for key, _ in page.items])
    items = []
    for crop in crops:
        image = state.get_image(job.id, crop.image_key)
        distance = distances[crop.key]
        base = f"/v1/jobs/{job.id}/crops/{crop.crop_id}"
        items.append(
            CropOut(
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
        )
    return CropPage(
        threshold=threshold,
        items=items,
        next_cursor=encode_cursor(page.next_after) if page.next_after else None,
    )
