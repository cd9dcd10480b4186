"""The API app: a lifespan that opens Redis, the object store and the Celery producer once.

Run with ``uvicorn imgsift_api.main:app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from imgsift_api.routes import health, jobs, operations
from imgsift_api.settings import ApiSettings
from imgsift_common.celery_app import create_celery_app
from imgsift_common.logs import configure_logging
from imgsift_common.state import RedisStateStore
from imgsift_common.storage import store_from_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = ApiSettings()
    configure_logging(settings.log_level)
    app.state.settings = settings
    app.state.state = RedisStateStore.from_url(settings.redis_url)
    app.state.store = store_from_settings(settings)
    app.state.celery = create_celery_app("imgsift-api", settings.redis_url)
    yield


app = FastAPI(
    title="imgsift",
    version="0.1.0",
    summary="Build clean, labelled image datasets from the open web.",
    lifespan=lifespan,
)
app.include_router(health.router)
app.include_router(jobs.router, prefix="/v1")
app.include_router(operations.router, prefix="/v1")
# The web UI: plain HTML and JavaScript over the same REST API, served from this package.
app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")


@app.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")
