"""Print the API's OpenAPI document: `python scripts/openapi.py > docs/openapi.json`.

The committed docs/openapi.json is the API's contract: tests/api/test_openapi.py fails when
the app's document differs from it, so a change to the API is a reviewed change to that file.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("IMGSIFT_STORAGE", "local")  # settings are not read for the document, but must parse

from imgsift_api.main import app

print(json.dumps(app.openapi(), indent=2, sort_keys=True))
