"""deploy/k8s: valid against Kubernetes' and KEDA's schemas, and consistent with what runs.

The commands are the ones the system test starts (docker-compose.yml via tests/support/stack.py),
each queue a worker consumes has a KEDA trigger on the Redis list of that name, shutdown fits
within the broker's visibility timeout, and the GPU overlay is docker-compose.gpu.yml's.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from imgsift_common.celery_app import QueueName, create_celery_app
from tests.deploy.support import (
    K8S_VERSIONS,
    OVERLAYS,
    ROOT,
    Obj,
    find,
    keda_errors,
    render_overlay,
    validate_k8s,
)
from tests.support.stack import APP_SERVICES, _interpolate, compose_file, service_command

WORKERS = ("crawler", "detector", "siamese")
# What compose needs to interpolate its required variables; values do not matter here.
COMPOSE_ENV = {
    "IMGSIFT_S3_ACCESS_KEY": "x" * 8,
    "IMGSIFT_S3_SECRET_KEY": "y" * 8,
    "IMGSIFT_API_BOOTSTRAP_KEY": "z" * 16,
    "IMGSIFT_POSTGRES_PASSWORD": "p" * 8,
}
# Compose and Kubernetes name these differently (service host names), on purpose.
# Kubernetes sets the detector's threads from the pod's CPU request; compose to one (a detector per core).
PER_PLATFORM = {"IMGSIFT_REDIS_URL", "IMGSIFT_S3_ENDPOINT", "IMGSIFT_DETECTOR_TORCH_THREADS"}
# Secrets in Kubernetes (imgsift-secrets); compose has them from .env.
SECRETS = {*COMPOSE_ENV, "IMGSIFT_CRAWLER_FLICKR_API_KEY", "IMGSIFT_DATABASE_URL"}
# The parameters of KEDA's `redis` (lists) scaler; its CRD accepts any string key in `metadata`.
REDIS_SCALER_PARAMETERS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl",
}  # fmt: skip


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> list[Obj]:
    return render_overlay(request.param)


@pytest.fixture(scope="session")
def keda() -> None:
    """The KEDA checks need node; where it is installed they fail, not skip, if the validators are missing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: ScaledObjects not checked against KEDA's schema (see scripts/install.sh)")


@pytest.fixture(scope="module")
def cpu() -> list[Obj]:
    return render_overlay("cpu")


@pytest.fixture(scope="module")
def gpu() -> list[Obj]:
    return render_overlay("gpu")


def container(objects: list[Obj], name: str) -> Obj:
    containers = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [name]
    return containers[0]


def pod_spec(objects: list[Obj], name: str) -> Obj:
    return find(objects, "Deployment", name)["spec"]["template"]["spec"]


def env_of(objects: list[Obj], name: str) -> dict[str, Any]:
    """The container's environment: ConfigMap values, then its own `env` (a value or a valueFrom)."""
    spec = container(objects, name)
    env: dict[str, Any] = {}
    for source in spec.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in spec.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


# ------------------------------------------------------------------------------- schemas


def test_every_object_is_valid_for_kubernetes(overlay: list[Obj]) -> None:
    for obj in overlay:
        if obj["kind"] != "ScaledObject":
            for version in K8S_VERSIONS:
                validate_k8s(obj, version)  # raises with the path of the first error


def test_every_scaled_object_is_valid_for_keda(overlay: list[Obj], keda: None) -> None:
    scaled = [obj for obj in overlay if obj["kind"] == "ScaledObject"]
    assert {obj["metadata"]["name"] for obj in scaled} == set(WORKERS)
    errors = keda_errors(scaled)
    assert {obj["metadata"]["name"]: e for obj, e in zip(scaled, errors, strict=True) if e} == {}


def test_the_kubernetes_validator_refuses_broken_manifests(cpu: list[Obj]) -> None:
    deployment = copy.deepcopy(find(cpu, "Deployment", "detector"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 300  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment, "1.29")
    deployment = copy.deepcopy(find(cpu, "Deployment", "api"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment, "1.29")


def _behavior(so: Obj) -> Obj:
    behavior: Obj = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return behavior


# Each breaks the detector's ScaledObject; KEDA's validator must say so, with this in the message.
BROKEN_SCALED_OBJECTS: list[tuple[Callable[[Obj], Any], str]] = [
    (lambda so: so["spec"].update(cooldownPeriods=300), "data/spec/cooldownPeriods is not a field of"),  # misspelt
    (lambda so: _behavior(so)["scaleDown"].update(stabilizationWindow=60), "scaleDown/stabilizationWindow is not"),
    (lambda so: so["metadata"].update(label={"a": "b"}), "data/metadata/label is not a field of"),
    (lambda so: so["spec"]["triggers"][0]["metadata"].update(listLength=10), "listLength must be string"),
    (lambda so: so["spec"].pop("scaleTargetRef"), "must have required property scaleTargetRef"),
    (lambda so: so.update(apiVersion="keda.sh/v1"), "data/apiVersion must be"),  # no such version
    (lambda so: so.pop("kind"), "data/kind must be"),
    (lambda so: so["spec"].update(minReplicaCount="0"), "data/spec/minReplicaCount must be integer"),
    (lambda so: so["spec"].update(fallback={"failureThreshold": 3}), "must have required property replicas"),
    (lambda so: so["metadata"].pop("name"), "data/metadata/name must be string"),
]


def test_the_keda_validator_refuses_broken_scaled_objects(cpu: list[Obj], keda: None) -> None:
    scaled = find(cpu, "ScaledObject", "detector")
    broken = []
    for breakage, _ in BROKEN_SCALED_OBJECTS:
        bad = copy.deepcopy(scaled)
        breakage(bad)
        broken.append(bad)
    for (_, expected), errors in zip(BROKEN_SCALED_OBJECTS, keda_errors(broken), strict=True):
        assert any(expected in error for error in errors), (expected, errors)


# ------------------------------------------------------------------ same as what is tested


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_container_runs_the_command_the_system_test_starts(overlay: list[Obj], service: str) -> None:
    command, _ = service_command(service, COMPOSE_ENV)
    spec = container(overlay, service)
    # `args` replaces the image's CMD, as compose's `command` does; no `command` (ENTRYPOINT) override.
    assert "command" not in spec
    assert spec["args"] == command


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_pod_first_runs_the_migrate_step_compose_runs(overlay: list[Obj], service: str) -> None:
    command, _ = service_command("migrate", COMPOSE_ENV)
    image = container(overlay, service)["image"]
    (init,) = pod_spec(overlay, service)["initContainers"]
    assert init["name"] == "migrate" and init["args"] == command and "command" not in init
    assert init["image"] == image  # every service image carries imgsift_common and its migrations
    (url,) = init["env"]
    assert url["name"] == "IMGSIFT_DATABASE_URL"
    assert url["valueFrom"]["secretKeyRef"] == {"name": "imgsift-secrets", "key": "IMGSIFT_DATABASE_URL"}


def test_the_stores_postgres_is_the_one_the_database_url_names(overlay: list[Obj]) -> None:
    secret = find(overlay, "Secret", "imgsift-secrets")["stringData"]
    url = urlsplit(secret["IMGSIFT_DATABASE_URL"])
    service = find(overlay, "Service", "postgres")
    assert url.hostname == f"postgres.{service['metadata']['namespace']}.svc.cluster.local"
    assert url.port == service["spec"]["ports"][0]["port"] == 5432
    assert url.password == secret["IMGSIFT_POSTGRES_PASSWORD"]
    pod = find(overlay, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["secretKeyRef"]["key"] == "IMGSIFT_POSTGRES_PASSWORD"
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (url.username, url.path.lstrip("/"))
    assert "pg_isready" in pod["containers"][0]["readinessProbe"]["exec"]["command"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_container_gets_the_settings_compose_gives(cpu: list[Obj], service: str) -> None:
    _, interpolated = service_command(service, COMPOSE_ENV)
    compose_env = {name: interpolated[name] for name in compose_file()["services"][service]["environment"]}
    k8s_env = env_of(cpu, service)
    assert set(compose_env) - set(k8s_env) == set(), "settings compose passes and Kubernetes does not"
    secret = find(cpu, "Secret", "imgsift-secrets")["stringData"]
    for name, value in compose_env.items():
        if name in SECRETS:
            ref = k8s_env[name]["secretKeyRef"]
            assert ref["name"] == "imgsift-secrets" and ref["key"] == name and name in secret, name
        elif name not in PER_PLATFORM:
            assert k8s_env[name] == value, name


def test_the_gpu_overlay_has_the_gpu_compose_settings(gpu: list[Obj]) -> None:
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    for service, spec in override.items():
        base_env = compose_file()["services"][service]["environment"]
        expected = {k: _interpolate(str(v), {}) for k, v in spec["environment"].items()}
        k8s_env = env_of(gpu, service)
        assert {k: k8s_env[k] for k in expected} == expected, service
        assert set(base_env) <= set(k8s_env), service


def test_every_queue_is_consumed_and_triggers_its_worker_scaling(overlay: list[Obj]) -> None:
    redis_url = urlsplit(find(overlay, "ConfigMap", "imgsift-settings")["data"]["IMGSIFT_REDIS_URL"])
    consumed: set[str] = set()
    for worker in WORKERS:
        args = container(overlay, worker)["args"]
        queues = set(args[args.index("-Q") + 1].split(","))
        consumed |= queues
        scaled = find(overlay, "ScaledObject", worker)
        assert scaled["spec"]["scaleTargetRef"]["name"] == worker
        triggers = scaled["spec"]["triggers"]
        assert {t["metadata"]["listName"] for t in triggers} == queues, worker
        for trigger in triggers:
            meta = trigger["type"], trigger["metadata"]
            assert meta[0] == "redis"
            assert set(meta[1]) <= REDIS_SCALER_PARAMETERS, set(meta[1]) - REDIS_SCALER_PARAMETERS
            # KEDA reads the very Redis and database the workers use.
            assert meta[1]["address"] == f"{redis_url.hostname}:{redis_url.port}", worker
            assert meta[1]["databaseIndex"] == redis_url.path.lstrip("/"), worker
            assert int(meta[1]["listLength"]) >= 1
    assert consumed == {q.value for q in QueueName}


def test_scaling_bounds_and_scale_to_zero(overlay: list[Obj]) -> None:
    for worker in WORKERS:
        spec = find(overlay, "ScaledObject", worker)["spec"]
        assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"], worker
        assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0, worker
        # KEDA owns the replica count: a `replicas` in the Deployment would reset it on each apply.
        assert "replicas" not in find(overlay, "Deployment", worker)["spec"], worker
    # The model workers start from zero; the crawler never does (countdown tasks wait inside it).
    assert find(overlay, "ScaledObject", "detector")["spec"]["minReplicaCount"] == 0
    assert find(overlay, "ScaledObject", "siamese")["spec"]["minReplicaCount"] == 0
    assert find(overlay, "ScaledObject", "crawler")["spec"]["minReplicaCount"] >= 1


def test_shutdown_is_warm_and_within_the_visibility_timeout(overlay: list[Obj]) -> None:
    conf = create_celery_app("deploy-test", "redis://localhost:6379/0").conf
    visibility = conf.broker_transport_options["visibility_timeout"]
    # Prefetch 1 with late acks: the list length KEDA reads is the backlog, and a task is
    # acknowledged only when done, so a worker that leaves gives back what it did not finish.
    assert conf.worker_prefetch_multiplier == 1 and conf.task_acks_late and conf.task_reject_on_worker_lost
    for worker in WORKERS:
        args = container(overlay, worker)["args"]
        assert not any(a.startswith("--prefetch-multiplier") for a in args), worker
        grace = pod_spec(overlay, worker)["terminationGracePeriodSeconds"]
        # Long enough for a batch, shorter than the time after which Redis hands the task to another worker.
        assert 60 <= grace < visibility, worker


def test_every_deployment_has_a_disruption_budget_that_selects_it(overlay: list[Obj]) -> None:
    for service in APP_SERVICES:
        labels = find(overlay, "Deployment", service)["spec"]["template"]["metadata"]["labels"]
        selector = find(overlay, "PodDisruptionBudget", service)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), service
        assert find(overlay, "Deployment", service)["spec"]["selector"]["matchLabels"] == selector


def test_probes_resources_and_metrics(overlay: list[Obj]) -> None:
    metrics_port = int(find(overlay, "ConfigMap", "imgsift-settings")["data"]["IMGSIFT_METRICS_PORT"])
    for service in APP_SERVICES:
        spec = container(overlay, service)
        assert spec["livenessProbe"] and spec["readinessProbe"], service
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(spec["resources"][kind]), service
        annotations = find(overlay, "Deployment", service)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", service
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports.values(), service
        if service != "api":
            assert ports["metrics"] == metrics_port, service
        if service in ("detector", "siamese"):  # torch runs on the CPUs the pod asks for, not the node's
            threads = env_of(overlay, service)[f"IMGSIFT_{service.upper()}_TORCH_THREADS"]["resourceFieldRef"]
            assert threads["resource"] == "requests.cpu" and threads["divisor"] == "1", service
    api = container(overlay, "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert find(overlay, "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == (
        "/metrics"
    )


def test_api_is_exposed_by_service_and_ingress(overlay: list[Obj]) -> None:
    service = find(overlay, "Service", "api")
    labels = find(overlay, "Deployment", "api")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    backend = find(overlay, "Ingress", "api")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "api", "port": {"name": "http"}}
    assert "IMGSIFT_API_BOOTSTRAP_KEY" in find(overlay, "Secret", "imgsift-secrets")["stringData"]


def test_images_are_one_per_service(overlay: list[Obj]) -> None:
    for service in APP_SERVICES:
        image = container(overlay, service)["image"]
        name, tag = image.rsplit(":", 1)
        assert name == f"ghcr.io/imgsift/imgsift-{service}" and tag, image
        assert (ROOT / "services" / service / "Dockerfile").is_file()


def _gpus(spec: Obj) -> set[str]:
    return {kind for kind, values in spec.get("resources", {}).items() if "nvidia.com/gpu" in values}


def test_only_the_gpu_overlay_puts_the_model_workers_on_gpus(cpu: list[Obj], gpu: list[Obj]) -> None:
    for service in APP_SERVICES:
        assert _gpus(container(cpu, service)) == set(), service
        assert "nodeSelector" not in pod_spec(cpu, service) and "tolerations" not in pod_spec(cpu, service)
    for service in ("api", "crawler"):
        assert _gpus(container(gpu, service)) == set(), service
    for service in ("detector", "siamese"):
        spec = container(gpu, service)
        assert spec["resources"]["limits"]["nvidia.com/gpu"] == "1", service
        assert _gpus(spec) == {"requests", "limits"}, service
        pod = pod_spec(gpu, service)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, service
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], service
        assert spec["image"].endswith("-cuda"), service
        assert find(gpu, "ScaledObject", service)["spec"]["minReplicaCount"] == 0
