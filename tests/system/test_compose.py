"""docker-compose.yml and the Dockerfiles: the topology the system test runs as processes.

No Docker engine runs here, so the file's structure is checked instead: persistence,
healthchecks, start order, GPU override, one image per service with only its own code.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.support.stack import APP_SERVICES, ROOT, compose_file

MIGRATE_COMMAND = ["python", "-m", "imgsift_common.migrate"]


def test_stores_persist_and_every_long_running_service_has_a_healthcheck() -> None:
    services = compose_file()["services"]
    # Services under a profile (flower) start only when asked for.
    started = {name for name, spec in services.items() if "profiles" not in spec}
    assert started == {"postgres", "redis", "minio", "migrate", *APP_SERVICES}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert services["postgres"]["image"].startswith("postgres:16")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name, spec in services.items():
        if name == "migrate":  # a one-shot: it exits, and the others wait for its exit status
            assert spec["restart"] == "no" and "healthcheck" not in spec
            continue
        assert spec.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_migrate_runs_once_against_a_healthy_postgres_before_every_app_service() -> None:
    services = compose_file()["services"]
    assert services["migrate"]["command"] == MIGRATE_COMMAND
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    url = services["migrate"]["environment"]["IMGSIFT_DATABASE_URL"]
    assert all(services[name]["environment"]["IMGSIFT_DATABASE_URL"] == url for name in APP_SERVICES)
    for name in APP_SERVICES:
        assert services[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
            "minio": {"condition": "service_healthy"},
        }, name


def test_each_service_image_installs_only_its_own_code() -> None:
    services = compose_file()["services"]
    for name in APP_SERVICES:
        dockerfile = ROOT / services[name]["build"]["dockerfile"]
        copied = re.findall(r"^COPY (\S+)", dockerfile.read_text(), flags=re.M)
        assert copied == ["common", f"services/{name}"], (name, copied)


def test_crawler_and_api_need_neither_torch_nor_ultralytics() -> None:
    for name in ("crawler", "api"):
        deps = tomllib.loads((ROOT / "services" / name / "pyproject.toml").read_text())["project"]["dependencies"]
        assert not any(d.startswith(("torch", "ultralytics")) for d in deps), deps
    code = (
        "import sys, imgsift_crawler.worker, imgsift_api.main, imgsift_api.routes.jobs; "
        "bad = [m for m in ('torch', 'ultralytics', 'torchvision') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    env = {"IMGSIFT_STORAGE": "local", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_gpu_override_reserves_a_gpu_for_the_model_workers() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(override) == {"detector", "siamese"}
    for name, spec in override.items():
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert any(k.endswith("_DEVICE") and v == "cuda" for k, v in spec["environment"].items()), name


def test_every_variable_compose_passes_is_documented() -> None:
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), flags=re.M))
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))  # $${X} is the container's own
    for spec in compose_file()["services"].values():
        used |= {k for k in (spec.get("environment") or {}) if k.startswith("IMGSIFT_")}
    assert used - documented == set()


def test_env_example_is_generated_from_the_settings_classes() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from env_example import render
    finally:
        sys.path.pop(0)
    assert (ROOT / ".env.example").read_text() == render(), "run: python scripts/env_example.py > .env.example"


def test_dockerfiles_exist_for_each_service() -> None:
    for name in APP_SERVICES:
        assert (ROOT / "services" / name / "Dockerfile").is_file()
    assert Path(ROOT / "docker-compose.gpu.yml").is_file()
