"""Operator views: tasks that failed for good (poison messages, faults past their retries)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from imgsift_api.auth import Admin
from imgsift_api.deps import StateDep
from imgsift_common.celery_app import DeadLetter, dead_letters

router = APIRouter(tags=["operations"])


@router.get("/dead-letters", response_model=list[DeadLetter])
def list_dead_letters(
    admin: Admin, state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeadLetter]:
    """The newest tasks that failed for good, with their error and message; they are not retried (admin keys)."""
    return dead_letters(state.r, limit)  # type: ignore[attr-defined]
