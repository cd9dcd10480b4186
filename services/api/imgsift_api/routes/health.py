"""Probes for compose and Kubernetes."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from imgsift_api.deps import StateDep, StoreDep
from imgsift_api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(state: StateDep, store: StoreDep, response: Response) -> Health:
    """Whether the API can reach PostgreSQL, Redis and the object store (503 when it cannot)."""
    try:
        redis_ok = bool(state.r.ping())  # type: ignore[attr-defined]
    except Exception:
        redis_ok = False
    try:
        state.ping_database()  # type: ignore[attr-defined]
        database_ok = True
    except Exception:
        database_ok = False
    try:
        store.exists("healthz")
        storage_ok = True
    except Exception:
        storage_ok = False
    ok = database_ok and redis_ok and storage_ok
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(status="ok" if ok else "degraded", database=database_ok, redis=redis_ok, storage=storage_ok)
