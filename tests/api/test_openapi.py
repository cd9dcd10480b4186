"""The OpenAPI document in the repository is the API's contract: any change to it is deliberate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_openapi_document_matches_the_app() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "openapi.py")], capture_output=True, text=True, check=True
    ).stdout
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert json.loads(generated) == json.loads(committed), (
        "the API changed: review the change, then run `python scripts/openapi.py > docs/openapi.json`"
    )


def test_the_contract_keeps_its_versioned_paths() -> None:
    paths = json.loads((ROOT / "docs" / "openapi.json").read_text())["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/crops", "/v1/jobs/{job_id}/exports", "/healthz"):
        assert path in paths
    assert all(p.startswith(("/v1/", "/healthz")) for p in paths)
