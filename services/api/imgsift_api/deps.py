"""Dependencies as ``Annotated`` aliases, like the FastAPI full-stack template's ``deps.py``."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Request, status

from imgsift_api.auth import Principal
from imgsift_api.settings import ApiSettings
from imgsift_common.messages import JOB_ID_PATTERN, Job
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectStore


def get_state(request: Request) -> StateStore:
    return request.app.state.state


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


StateDep = Annotated[StateStore, Depends(get_state)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]


def get_job(state: StateDep, principal: Principal, job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)]) -> Job:
    job = state.get_job(job_id)
    # Another key's job answers exactly like a job that does not exist: ids leak nothing.
    if job is None or job.owner != principal.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id!r}; list jobs with GET /v1/jobs")
    return job


JobDep = Annotated[Job, Depends(get_job)]
