"""The API app: a lifespan that opens PostgreSQL, Redis, the object store and the Celery producer once.

Run with ``uvicorn imgsift_api.main:app``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from imgsift_api.auth import BodyLimit, RateLimiter, get_principal
from imgsift_api.routes import health, jobs, keys, operations
from imgsift_api.settings import ApiSettings
from imgsift_common.apikeys import ApiKeyStore
from imgsift_common.celery_app import STATE_ERRORS, STORE_ERRORS, create_celery_app
from imgsift_common.logs import configure_logging
from imgsift_common.metrics import api_metrics
from imgsift_common.servicestate import ServiceStateStore, wait_for_database
from imgsift_common.storage import store_from_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = ApiSettings()
    configure_logging(settings.log_level)
    app.state.settings = settings
    state = ServiceStateStore.from_settings(settings)
    # Waits (logging each try) while PostgreSQL is unreachable; a schema this code does not know
    # (SchemaMismatch: the migrate step has not run, or a newer imgsift's) stops the start-up.
    await asyncio.to_thread(wait_for_database, state.engine)
    app.state.state = state
    app.state.store = store_from_settings(settings)
    app.state.celery = create_celery_app("imgsift-api", settings.redis_url)
    app.state.keys = ApiKeyStore(app.state.state.r)
    app.state.limiter = RateLimiter(settings.redis_url, settings.rate_limit)
    if settings.bootstrap_key is not None:
        app.state.keys.add(
            settings.bootstrap_key.get_secret_value(), "bootstrap (IMGSIFT_API_BOOTSTRAP_KEY)", admin=True
        )
    try:
        yield
    finally:
        state.close()


app = FastAPI(
    title="imgsift",
    version="0.1.0",
    summary="Build clean, labelled image datasets from the open web.",
    lifespan=lifespan,
)
app.add_middleware(BodyLimit)
app.include_router(health.router)
# Every route under /v1 needs an API key, except signing the UI in (routes/keys.py).
app.include_router(jobs.router, prefix="/v1", dependencies=[Depends(get_principal)])
app.include_router(operations.router, prefix="/v1", dependencies=[Depends(get_principal)])
app.include_router(keys.router, prefix="/v1")


async def state_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """PostgreSQL or Redis down or restarting: a clear 503 the client can retry, not a 500."""
    return JSONResponse({"detail": "the job state store is unreachable; retry later"}, status_code=503)


async def store_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """The object store down or failing (after the client's own retries): a 503 to retry, not a 500."""
    return JSONResponse({"detail": "the object store is unreachable; retry later"}, status_code=503)


# The faults the workers retry (celery_app.py) are the ones the API answers with 503.
for _error in STATE_ERRORS:
    app.add_exception_handler(_error, state_unreachable)
for _error in STORE_ERRORS:
    app.add_exception_handler(_error, store_unreachable)


# The web UI: plain HTML and JavaScript over the same REST API, served from this package.
app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")


@app.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@app.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics, no key needed: queue depths and dead letters (read from Redis now), this process."""
    body, content_type = api_metrics(request.app.state.state.r)
    return Response(body, media_type=content_type)
