"""A Celery app for tests/common/test_metrics.py: imgsift's app factory and one stage task that
does nothing, started as a real prefork worker (``celery -A tests.common.metrics_worker worker``)."""

from __future__ import annotations

import os
from typing import Any

from imgsift_common.celery_app import TaskName, create_celery_app

app = create_celery_app("imgsift-metrics-test", os.environ["IMGSIFT_REDIS_URL"])


@app.task(name=TaskName.DOWNLOAD, shared=False)
def download(payload: dict[str, Any]) -> int:
    return os.getpid()
