"""docker-compose.yml and docker-compose.gpu.yml against the compose specification's schema."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.support import ROOT, validate_compose
from tests.support.stack import compose_file


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    validate_compose(yaml.safe_load((ROOT / name).read_text()))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return apply


@pytest.mark.parametrize(
    "breakage",
    [
        _set("services.api.healthchek", {"test": ["CMD", "true"]}),  # misspelt key
        _set("services.crawler.command", 5),  # neither a string nor a list
        _set("services.detector.depends_on", {"redis": {"condition": "service_up"}}),  # no such condition
        _set("services.flower.profiles", "flower"),  # a list, not a string
    ],
)
def test_the_schema_refuses_a_broken_compose_file(breakage: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(compose_file())
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(doc)


def test_flower_is_optional_and_watches_the_stack_broker() -> None:
    compose = compose_file()
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    broker = compose["x-imgsift-env"]["IMGSIFT_REDIS_URL"]
    assert f"--broker={broker}" in flower["command"] and "flower" in flower["command"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"]), "Flower has no login: loopback only"
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
