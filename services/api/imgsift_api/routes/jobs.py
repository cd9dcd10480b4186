"""Jobs: create with references, read status, list crops at any threshold, change it, mark crops, train, cancel."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, File, Form, Header, HTTPException, Query, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from imgsift_api.auth import Principal
from imgsift_api.deps import CeleryDep, JobDep, SettingsDep, StateDep, StoreDep
from imgsift_api.references import ReferenceRejected, check_reference, store_negative, store_reference
from imgsift_api.schemas import (
    CalibrationOut,
    CropPage,
    ExportOut,
    ExportRequest,
    Feedback,
    JobList,
    JobStatus,
    QuestionsOut,
    ThresholdUpdate,
)
from imgsift_api.views import TRAINING_MARKER, calibration, crop_page, job_status, question_page, training_requested
from imgsift_common import keys, webhooks
from imgsift_common.apikeys import ApiKey
from imgsift_common.celery_app import DISCOVER_CHAIN_MARKER, TaskName, send
from imgsift_common.exports import ExportFormat, ExportState, ExportStatus, load_status, save_status
from imgsift_common.messages import (
    DiscoverMessage,
    ExportMessage,
    Job,
    JobSpec,
    JobState,
    SourceKind,
    TrainMessage,
    utcnow,
)
from imgsift_common.source_checks import unmet_requirements
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore
from imgsift_common.webhooks import Delivery

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

SPEC_HELP = (
    'a JSON JobSpec, e.g. {"query": "golden retriever", "target": "dog", "threshold": 0.9, '
    '"sources": [{"kind": "openverse"}, {"kind": "site", "start_urls": ["https://example.org/"]}]}'
)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings: pydantic's JSON parser reads ``Infinity`` and ``NaN``,
    which an error's echoed input then holds and a JSON response cannot."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _parse_spec(raw: str) -> JobSpec:
    try:
        spec = JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        detail = _json_safe(jsonable_encoder(exc.errors(include_url=False, include_context=False)))
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"field": "spec", "errors": detail}) from None
    for source in spec.sources:
        if source.kind is SourceKind.FILES:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "a 'files' source names a folder of local images for `imgsift verify`; over the API give 'urls'",
            )
        if source.kind is SourceKind.URLS and source.path:
            # A path would name a file on the server: the API takes URLs inline only.
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "a 'urls' source over the API takes 'urls' (a list), not 'path'"
            )
    return spec


IDEMPOTENCY_TTL = 24 * 3600.0  # seconds a retried POST with the same Idempotency-Key returns the first job


@router.post("", response_model=JobStatus, status_code=status.HTTP_201_CREATED)
async def create_job(
    principal: Principal,
    state: StateDep,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    response: Response,
    spec: Annotated[str, Form(description=SPEC_HELP)],
    references: Annotated[list[UploadFile], File(description="reference images of what to collect (1 or more)")],
    negatives: Annotated[
        list[UploadFile] | None,
        File(description="'not this' images: what the job must not collect (a look-alike, a drawing, a logo)"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="a client's unique key for this creation: a retried POST with the same key (within 24 "
            "hours) returns the job the first one created, with 200 instead of 201, and creates nothing",
        ),
    ] = None,
) -> JobStatus:
    """Create a job from a JSON spec and its reference images, and start it."""
    job_spec = _parse_spec(spec)
    if problems := unmet_requirements(job_spec, contact=settings.crawler_contact):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "; ".join(problems))
    job_id = uuid.uuid4().hex
    if not references:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "upload at least one reference image")
    for name, files in (("reference", references), ("'not this'", negatives or [])):
        if len(files) > settings.max_references:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"{len(files)} {name} images; the limit is {settings.max_references}",
            )
    uploads = [await _checked(upload, settings) for upload in references]
    not_this = [await _checked(upload, settings) for upload in negatives or []]
    # Claimed once the request is known to be valid: a refused request binds no key.
    # The state store, object store and broker are synchronous: they run in the thread pool, so a slow
    # PostgreSQL, Redis or S3 never stalls the event loop (and every other request) while this one waits.
    if idempotency_key is not None:
        # Scoped by key: another tenant's equal Idempotency-Key neither finds nor blocks this one.
        claim = f"{principal.id}:{idempotency_key}"
        first = await run_in_threadpool(state.claim_idempotency_key, claim, job_id, IDEMPOTENCY_TTL)
        if first != job_id:
            existing = await run_in_threadpool(state.get_job, first)
            for _ in range(50):  # the first request may still be storing its references
                if existing is not None:
                    break
                await asyncio.sleep(0.1)
                existing = await run_in_threadpool(state.get_job, first)
            if existing is None:
                raise HTTPException(status.HTTP_409_CONFLICT, "a job with this Idempotency-Key is being created")
            response.status_code = status.HTTP_200_OK
            return await run_in_threadpool(job_status, existing, state)
    return await run_in_threadpool(_start_job, job_id, job_spec, principal, state, store, celery, uploads, not_this)


def _start_job(
    job_id: str,
    job_spec: JobSpec,
    principal: ApiKey,
    state: StateStore,
    store: ObjectStore,
    celery: Celery,
    uploads: list[tuple[bytes, str]],
    not_this: list[tuple[bytes, str]],
) -> JobStatus:
    """Store the references, record the job and enqueue its discovery: blocking calls, run off the event loop."""
    reference_keys = sorted({store_reference(store, job_id, data, fmt) for data, fmt in uploads})
    negative_keys = sorted({store_negative(store, job_id, data, fmt) for data, fmt in not_this})
    job = Job(id=job_id, spec=job_spec, owner=principal.id, reference_keys=reference_keys, negative_keys=negative_keys)
    secret = webhooks.new_secret() if job_spec.webhooks else None
    if secret:
        state.set_marker(job_id, webhooks.SECRET_MARKER, secret)  # before the job exists: no event unsigned
    state.create_job(job)
    try:
        chain = uuid.uuid4().hex
        state.set_marker(job_id, DISCOVER_CHAIN_MARKER, chain)
        send(celery, TaskName.DISCOVER, DiscoverMessage(job_id=job_id, chain=chain))
    except Exception as exc:  # the broker is down: say so instead of leaving a job that never starts
        state.set_job_state(job_id, JobState.FAILED, f"could not enqueue the job: {exc}")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is unreachable; retry later") from exc
    log.info("job created", extra={"job_id": job_id, "references": len(reference_keys)})
    return job_status(job, state).model_copy(update={"webhook_secret": secret})


async def _checked(upload: UploadFile, settings: SettingsDep) -> tuple[bytes, str]:
    data = await upload.read(settings.max_reference_bytes + 1)
    try:
        fmt = check_reference(
            upload.filename or "upload",
            data,
            max_bytes=settings.max_reference_bytes,
            max_pixels=settings.max_reference_pixels,
        )
    except ReferenceRejected as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return data, fmt


@router.get("", response_model=JobList)
def list_jobs(principal: Principal, state: StateDep, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> JobList:
    """The calling key's jobs, newest first."""
    return JobList(items=[job_status(job, state) for job in state.list_jobs(limit, owner=principal.id)])


@router.get("/{job_id}", response_model=JobStatus)
def get_job(job: JobDep, state: StateDep) -> JobStatus:
    """A job's status: per-stage counts, failures by reason, progress, notes."""
    return job_status(job, state)


@router.patch("/{job_id}", response_model=JobStatus)
def update_threshold(job: JobDep, state: StateDep, body: ThresholdUpdate) -> JobStatus:
    """Change the job's threshold; accepted and rejected are re-decided from stored distances at once."""
    updated = state.update_job(job.id, spec=job.spec.model_copy(update={"threshold": body.threshold}))
    return job_status(updated, state)


@router.post("/{job_id}/cancel", response_model=JobStatus)
def cancel_job(job: JobDep, state: StateDep, celery: CeleryDep) -> JobStatus:
    """Cancel a job: queued work for it is dropped; what is stored stays readable."""
    if job.state.is_final:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is already {job.state.value}")
    cancelled = state.set_job_state(job.id, JobState.CANCELLED)
    webhooks.notify(state, job.id, lambda m: send(celery, TaskName.WEBHOOK, m))
    return job_status(cancelled, state)


@router.post("/{job_id}/train", response_model=JobStatus, status_code=status.HTTP_202_ACCEPTED)
def train_job(job: JobDep, state: StateDep, celery: CeleryDep) -> JobStatus:
    """Fine-tune the job's Siamese head on its references, 'not this' images and marks, then re-score every crop.

    Runs on a worker of the ``train`` queue; ``model.training`` is true until the new version is in
    place, and ``model.version`` then counts it. A training already queued is not queued twice.
    """
    if len(job.reference_keys) < 2:
        raise HTTPException(status.HTTP_409_CONFLICT, "training needs at least two reference images")
    if training_requested(job, state):
        return job_status(job, state)
    version = (job.model.version if job.model else 0) + 1
    state.set_marker(job.id, TRAINING_MARKER, str(version))
    try:
        send(celery, TaskName.TRAIN, TrainMessage(job_id=job.id, version=version))
    except Exception as exc:
        state.set_marker(job.id, TRAINING_MARKER, "0")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is unreachable; retry later") from exc
    return job_status(job, state)


@router.put("/{job_id}/crops/{crop_id}/feedback", response_model=CalibrationOut)
def mark_crop(job: JobDep, state: StateDep, crop_id: str, body: Feedback) -> CalibrationOut:
    """Answer a crop: right or wrong (null takes the answer back; a new answer replaces the old).

    The answers settle the suggested threshold and its estimates at once, and join the positives
    (right) or the hard negatives (wrong) of the next training. A crop must have a distance.
    """
    crop = _crop(job, state, crop_id)
    if body.correct is not None and not state.distances_of(job.id, [crop.key]):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"crop {crop_id} has no distance yet, so its answer could not calibrate anything; answer it once "
            "the Siamese stage has compared it (GET /v1/jobs/{id}/questions lists crops that are ready)",
        )
    state.set_feedback(job.id, crop.key, body.correct)
    return calibration(job, state)


@router.get("/{job_id}/questions", response_model=QuestionsOut)
def job_questions(
    job: JobDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100, description="how many crops to ask about")] = 10,
) -> QuestionsOut:
    """The crops whose answers would settle the job's threshold most, never one already answered.

    Spread over the distances, more where the fit is unsure and near the suggested threshold
    (docs/siamese.md). Answer each with ``PUT /v1/jobs/{id}/crops/{crop_id}/feedback``; the
    next call asks what is still needed.
    """
    return question_page(job, state, limit)


@router.get("/{job_id}/crops", response_model=CropPage)
def list_crops(
    job: JobDep,
    state: StateDep,
    settings: SettingsDep,
    threshold: Annotated[float | None, Query(ge=0.0, le=4.0, description="default: the job's threshold")] = None,
    accepted: Annotated[bool | None, Query(description="only accepted (true) or rejected (false) crops")] = None,
    cursor: Annotated[str | None, Query(max_length=2048, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    class_name: Annotated[str | None, Query(alias="class", max_length=100, description="detector class")] = None,
    source: Annotated[SourceKind | None, Query(description="the source the crop's image came from")] = None,
    min_distance: Annotated[float | None, Query(ge=0.0, le=4.0, description="distance >= this")] = None,
    max_distance: Annotated[float | None, Query(ge=0.0, le=4.0, description="distance <= this")] = None,
    order: Annotated[Literal["distance", "-distance"], Query(description="by distance, or descending")] = "distance",
) -> CropPage:
    """Compared crops by distance, each with box, distance, provenance and accepted flag; filtered and paged."""
    try:
        return crop_page(
            job,
            state,
            threshold=job.spec.threshold if threshold is None else threshold,
            accepted=accepted,
            cursor=cursor,
            limit=min(limit, settings.page_size_max),
            class_name=class_name,
            source=source.value if source else None,
            min_distance=min_distance,
            max_distance=max_distance,
            descending=order == "-distance",
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _crop(job: Job, state: StateDep, crop_id: str):  # type: ignore[no-untyped-def]
    try:
        key = keys.crop_key(job.id, crop_id)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no crop {crop_id!r} in job {job.id}") from None
    found = state.get_crops(job.id, [key])
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no crop {crop_id!r} in job {job.id}")
    return found[0]


def _object(store: StoreDep, key: str, media_type: str) -> Response:
    try:
        return Response(store.get(key), media_type=media_type)
    except ObjectNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the object is gone from storage") from None


@router.get(
    "/{job_id}/crops/{crop_id}/image", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}}
)
def crop_image(job: JobDep, state: StateDep, store: StoreDep, crop_id: str) -> Response:
    """The crop as JPEG."""
    return _object(store, _crop(job, state, crop_id).key, "image/jpeg")


@router.get(
    "/{job_id}/crops/{crop_id}/original", response_class=Response, responses={200: {"content": {"image/*": {}}}}
)
def crop_original(job: JobDep, state: StateDep, store: StoreDep, crop_id: str) -> Response:
    """The stored original image the crop was cut from."""
    crop = _crop(job, state, crop_id)
    image = state.get_images(job.id, [crop.image_key]).get(crop.image_key)
    return _object(store, crop.image_key, f"image/{image.format.lower()}" if image else "application/octet-stream")


def _export_out(job: Job, status: ExportStatus) -> ExportOut:
    done = status.state is ExportState.DONE
    return ExportOut(
        **status.model_dump(exclude={"key"}),
        download_url=f"/v1/jobs/{job.id}/exports/{status.id}/download" if done else None,
    )


@router.post("/{job_id}/exports", response_model=ExportOut, status_code=status.HTTP_202_ACCEPTED)
def create_export(job: JobDep, state: StateDep, celery: CeleryDep, body: ExportRequest) -> ExportOut:
    """Build a dataset export in the background (the ``export`` queue); poll it, then download it."""
    threshold = job.spec.threshold if body.threshold is None else body.threshold
    options = body.options()
    export = ExportStatus(
        id=uuid.uuid4().hex, format=body.format, threshold=threshold, state=ExportState.QUEUED, created_at=utcnow(),
        options=options,
    )  # fmt: skip
    save_status(state, job.id, export)
    try:
        message = ExportMessage(
            job_id=job.id, export_id=export.id, format=body.format.value, threshold=threshold, options=options
        )
        send(celery, TaskName.EXPORT, message)
    except Exception as exc:
        failed = export.model_copy(update={"state": ExportState.FAILED, "error": "the job queue is unreachable"})
        save_status(state, job.id, failed)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is unreachable; retry later") from exc
    return _export_out(job, export)


def _export_status(job: Job, state: StateDep, export_id: str) -> ExportStatus:
    found = load_status(state, job.id, export_id) if re.fullmatch(r"[0-9a-f]{32}", export_id) else None
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no export {export_id!r} in job {job.id}")
    return found


@router.get("/{job_id}/exports/{export_id}", response_model=ExportOut)
def get_export(job: JobDep, state: StateDep, export_id: str) -> ExportOut:
    """An export's state; ``download_url`` once it is done."""
    return _export_out(job, _export_status(job, state, export_id))


@router.get(
    "/{job_id}/exports/{export_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {t: {} for t in sorted({f.media_type for f in ExportFormat})}}},
)
def download_export(job: JobDep, state: StateDep, store: StoreDep, export_id: str) -> StreamingResponse:
    """The export's file, streamed from storage a chunk at a time."""
    export = _export_status(job, state, export_id)
    if export.state is not ExportState.DONE or export.key is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"export {export_id} is {export.state.value}, not done")
    if not store.exists(export.key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the export's file is gone from storage")
    name = f"imgsift-{job.id}-{export.format.value}-{export.threshold}{export.format.suffix}"
    return StreamingResponse(
        store.iter_chunks(export.key),
        media_type=export.format.media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


EVENT_INTERVAL = 1.0  # seconds between two looks at a job for its event stream


@router.get(
    "/{job_id}/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def job_events(job: JobDep, state: StateDep, request: Request) -> StreamingResponse:
    """Server-sent events: the job's status (``event: status``) whenever it changes, ``event: end`` when final."""

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            current = await run_in_threadpool(state.get_job, job.id)
            if current is None:
                return
            body = (await run_in_threadpool(job_status, current, state)).model_dump_json()
            if body != last:
                yield f"event: status\ndata: {body}\n\n"
                last = body
            if current.state.is_final:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(EVENT_INTERVAL)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/webhooks/deliveries", response_model=list[Delivery])
def webhook_deliveries(job: JobDep, state: StateDep) -> list[Delivery]:
    """Every webhook delivery of the job with each attempt's outcome (status code or error)."""
    return webhooks.deliveries(state, job.id)
