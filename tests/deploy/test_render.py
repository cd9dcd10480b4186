"""deploy/k8s renders, and the tests' small renderer agrees with kustomize itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import K8S, OVERLAYS, RenderError, by_key, find, kubectl_render, render, render_overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_every_object_once(overlay: str) -> None:
    objects = render_overlay(overlay)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        {
            "Namespace",
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "Ingress",
            "PodDisruptionBudget",
            "ScaledObject",
            "StatefulSet",
        }
    )
    by_key(objects)  # no two objects of one kind share a name
    assert all(o["metadata"].get("namespace") == "imgsift" for o in objects if o["kind"] != "Namespace")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: kustomize itself not run")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_gives_what_kubectl_kustomize_gives(overlay: str) -> None:
    ours = by_key(render_overlay(overlay))
    theirs = by_key(kubectl_render(K8S / "overlays" / overlay) or [])
    assert sorted(ours) == sorted(theirs)
    for key, obj in theirs.items():
        assert ours[key] == obj, key


def _kustomization(tmp_path: Path, body: dict[str, object], files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          image: example/web:1
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
"""


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    path = _kustomization(tmp_path, {"resources": ["web.yaml"], "commonLabels": {"a": "b"}}, {"web.yaml": DEPLOYMENT})
    with pytest.raises(RenderError, match="commonLabels"):
        render(path)


def test_renderer_refuses_a_patch_without_a_target(tmp_path: Path) -> None:
    patch = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nothing-here}\nspec: {}\n"
    body = {"resources": ["web.yaml"], "patches": [{"path": "patch.yaml"}]}
    path = _kustomization(tmp_path, body, {"web.yaml": DEPLOYMENT, "patch.yaml": patch})
    with pytest.raises(RenderError, match="matches 0 objects"):
        render(path)


def test_strategic_merge_merges_env_by_name_and_images_by_name(tmp_path: Path) -> None:
    patch = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          env: [{name: B, value: "3"}, {name: C, value: "4"}]
"""
    body = {
        "resources": ["web.yaml"],
        "patches": [{"path": "patch.yaml"}],
        "namespace": "scratch",
        "images": [{"name": "example/web", "newTag": "2"}],
    }
    path = _kustomization(tmp_path, body, {"web.yaml": DEPLOYMENT, "patch.yaml": patch})
    web = find(render(path), "Deployment", "web")
    container = web["spec"]["template"]["spec"]["containers"][0]
    assert container["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}, {"name": "A", "value": "1"}]
    assert container["image"] == "example/web:2"
    assert web["metadata"]["namespace"] == "scratch"
    if shutil.which("kubectl"):
        assert find(kubectl_render(path) or [], "Deployment", "web") == web
