"""Render deploy/k8s and validate manifests offline: Kubernetes kinds, KEDA objects, compose files.

Users render with ``kubectl kustomize deploy/k8s/overlays/gpu`` (or ``kubectl apply -k``). The
tests need no kubectl: ``render`` below is a small kustomize for the subset ``deploy/k8s`` uses
(``resources``, ``namespace``, ``patches`` by path as strategic merges, ``images``), and refuses
anything else. Where kubectl is installed, a test checks that both render the same objects.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# KEDA's ScaledObject schema: tools/keda pins @kubernetes-models/keda, which scripts/install.sh
# installs into .tools/keda (`npm ci --prefix`); keda_validate.mjs validates with it.
KEDA_PACKAGE = "@kubernetes-models/keda"
KEDA_TOOL = ROOT / "tools" / "keda"
KEDA_PREFIX = ROOT / ".tools" / "keda"
KEDA_SCRIPT = Path(__file__).parent / "keda_validate.mjs"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}

Obj = dict[str, Any]


class RenderError(ValueError):
    """The kustomization uses something this renderer does not do (or is wrong)."""


# ------------------------------------------------------------------------------ rendering


def _load_all(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(path: Path) -> list[Obj]:
    """The objects ``kustomize build path`` gives, for the subset of kustomize deploy/k8s uses."""
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise RenderError(f"{path}: unsupported kustomization fields {sorted(unsupported)}")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        target = (path / entry).resolve()
        objects.extend(render(target) if target.is_dir() else _load_all(target))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{path}: only `patches: - path: FILE` is supported, not {patch}")
        for doc in _load_all(path / patch["path"]):
            target = _target(objects, doc)
            merged = _merge(target, doc, builtin=_is_builtin(doc))
            target.clear()
            target.update(merged)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def _target(objects: list[Obj], patch: Obj) -> Obj:
    found = [
        o
        for o in objects
        if o["kind"] == patch["kind"]
        and o["metadata"]["name"] == patch["metadata"]["name"]
        and o["apiVersion"].split("/")[0] == patch["apiVersion"].split("/")[0]
    ]
    if len(found) != 1:
        raise RenderError(f"patch {patch['kind']}/{patch['metadata']['name']} matches {len(found)} objects")
    return found[0]


def _is_builtin(obj: Obj) -> bool:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return group in ("", "apps", "batch", "policy", "networking.k8s.io")


# Strategic merge: lists of these keys are merged item by item on the key (Kubernetes' patchMergeKey);
# other lists are replaced. A kind kustomize has no schema for (a CRD) gets a JSON merge patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def _merge(base: Any, patch: Any, builtin: bool, key: str | None = None) -> Any:
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise RenderError(f"patch directives are not supported: {sorted(patch)}")
        merged = dict(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = _merge(merged.get(k), v, builtin, k)
        return merged
    if isinstance(patch, list) and builtin and key in MERGE_KEYS and isinstance(base, list):
        on = MERGE_KEYS[key]
        originals = {item[on]: item for item in base}
        # kustomize puts the patch's items first, in the patch's order, then the untouched rest.
        merged_items = [_merge(originals.get(item[on]), item, builtin) for item in patch]
        patched = {item[on] for item in patch}
        return merged_items + [item for item in base if item[on] not in patched]
    return copy.deepcopy(patch)


def _containers(node: Any) -> list[Obj]:
    found: list[Obj] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                found.extend(v)
            else:
                found.extend(_containers(v))
    elif isinstance(node, list):
        for item in node:
            found.extend(_containers(item))
    return found


def _set_image(objects: list[Obj], image: Obj) -> None:
    for container in _containers(objects):
        ref = container.get("image", "")
        name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        tag = image.get("newTag", tag)
        container["image"] = f"{name}:{tag}" if tag else name


def render_overlay(name: str) -> list[Obj]:
    return render(K8S / "overlays" / name)


def kubectl_render(path: Path) -> list[Obj] | None:
    """``kubectl kustomize path``, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True, timeout=60)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_key(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    keyed = {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects share apiVersion, kind and name"
    return keyed


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


# ----------------------------------------------------------------------------- validation

K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


def validate_k8s(obj: Obj, version: str) -> None:
    """Raise unless ``obj`` is valid for Kubernetes ``version``; unknown fields are errors (strict)."""
    kubernetes_validate.validate(obj, version, strict=True)


class KedaUnavailable(RuntimeError):
    """node runs, but the KEDA validators are not installed in .tools/keda at the pinned version."""


def keda_pinned_version() -> str:
    lock = json.loads((KEDA_TOOL / "package-lock.json").read_text())
    version: str = lock["packages"][f"node_modules/{KEDA_PACKAGE}"]["version"]
    return version


def keda_errors(objects: list[Obj]) -> list[list[str]]:
    """Why KEDA would refuse each object as a ScaledObject (``[]`` where it is valid), one list per object.

    ``keda_validate.mjs`` checks them with the validators ``@kubernetes-models/keda`` generates from
    KEDA's CRDs and refuses fields its TypeScript declarations do not declare, as the API server
    does under ``kubectl apply`` (field validation Strict). Needs ``node`` (the tests skip without it)
    and the package ``scripts/install.sh`` installs; without the package this raises KedaUnavailable.
    """
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    install = "run ./scripts/install.sh, which installs tools/keda's packages into .tools/keda with npm"
    out = subprocess.run(
        [node, str(KEDA_SCRIPT), str(KEDA_PREFIX)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode == 2:
        raise KedaUnavailable(f"{out.stderr.strip()}: {install}")
    if out.returncode != 0:
        raise RuntimeError(f"{KEDA_SCRIPT.name} failed ({out.returncode}): {out.stderr.strip()}")
    result = json.loads(out.stdout)
    if result["version"] != keda_pinned_version():
        raise KedaUnavailable(
            f"{KEDA_PACKAGE} {result['version']} is installed in {KEDA_PREFIX}, "
            f"tools/keda/package-lock.json pins {keda_pinned_version()}: {install}"
        )
    errors: list[list[str]] = result["errors"]
    assert len(errors) == len(objects)
    return errors


@cache
def compose_schema() -> Obj:
    """The compose specification's JSON schema as vendored in check-jsonschema."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: Obj = json.loads(ref.read_text())
    return schema


def validate_compose(doc: Obj) -> None:
    validator_class = jsonschema.validators.validator_for(compose_schema())
    validator_class(compose_schema()).validate(doc)
