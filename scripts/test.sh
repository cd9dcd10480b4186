#!/usr/bin/env bash
# Install (scripts/install.sh), lint, and run every test, the system test included.
# Real inputs come from ../shared (COCO128 photos, YOLOv8n weights); tests that need them are
# skipped with the reason where that folder is absent (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy common/imgsift_common services/crawler/imgsift_crawler services/detector/imgsift_detector \
    services/siamese/imgsift_siamese services/api/imgsift_api cli/imgsift clients/python/imgsift_client
# Two workers, a test file each at a time (--dist loadfile keeps a file's fixtures in one worker):
# the suite waits on its servers and subprocesses more than it computes, so one worker left a core
# idle (26 min on one, load average about 1). IMGSIFT_TEST_WORKERS=0 runs in one process.
.venv/bin/python -m pytest -n "${IMGSIFT_TEST_WORKERS:-2}" --dist loadfile "$@"
