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
.venv/bin/python -m pytest "$@"
