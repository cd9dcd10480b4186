"""Batched embedding of PIL images, and a per-process cache of loaded networks.

A worker loads its network once, lazily, on the first task it runs, so the Celery prefork
parent never holds a model and each child holds exactly one (immich machine-learning style).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgsift_common.batching import in_batches
from imgsift_common.messages import Job
from imgsift_common.storage import ObjectStore
from imgsift_common.threads import limit_torch_threads
from imgsift_siamese.backbone import WeightsError, build_backbone, weights_identity
from imgsift_siamese.export import ExportError, ExportFormat, TrunkRunner, trunk_runner
from imgsift_siamese.features import PREPROCESSING_VERSION
from imgsift_siamese.network import SiameseNetwork
from imgsift_siamese.preprocess import pixels
from imgsift_siamese.settings import BackboneName, SiameseSettings


class Embedder:
    """A Siamese embedding branch on a device, turning PIL images into unit-norm float32 rows.

    It runs in two parts: the frozen trunk (images to pooled features, the expensive part,
    whose rows are stored per crop; ``trunk_id`` names them) and the head with L2
    normalisation (features to embeddings, cheap; ``embedding_id`` names the whole branch).
    ``trunk`` runs the trunk (:mod:`imgsift_siamese.export`: torch in fp32 or fp16, or an
    OpenVINO / ONNX export); by default the network's own, in torch. Every f32 runner computes
    the same features within the bounds its tests check, so they share one ``trunk_id``; a bf16
    trunk's rows move by percents, so its ids are its own (:attr:`precision_parts`).
    """

    def __init__(
        self,
        network: SiameseNetwork,
        *,
        backbone: BackboneName,
        weights_id: str,
        image_size: int = 224,
        device: str = "cpu",
        batch_size: int = 32,
        head_id: str | None = None,
        trunk: TrunkRunner | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.trunk: TrunkRunner = (
            trunk
            if trunk is not None
            else trunk_runner(
                self.network, backbone=backbone, weights_id=weights_id, image_size=image_size, device=self.device
            )
        )
        self.backbone = backbone
        self.weights_id = weights_id  # the trunk's weights
        self.head_id = head_id  # the trained head's object key; None: the pretrained embedding
        self.image_size = image_size
        self.batch_size = batch_size

    @property
    def precision_parts(self) -> tuple[str, ...]:
        """What the ids add for the trunk's precision: nothing for f32 (the ids stored rows have always
        had), ``("bf16",)`` for a bf16 trunk, whose rows differ from f32 ones by percents
        (:mod:`imgsift_siamese.export`) and must not be mixed with them. torch's fp16 on CUDA keeps the
        f32 ids (issue 18 item 2: its stored features and distances stay as they are)."""
        return ("bf16",) if self.trunk.precision == "bf16" else ()

    @functools.cached_property
    def embedding_id(self) -> str:
        """Short hash of what determines an embedding: backbone, weights (trunk and head), input size, precision."""
        weights = self.weights_id if self.head_id is None else f"{self.weights_id}+{self.head_id}"
        return short_hash(self.backbone, weights, self.image_size, *self.precision_parts)

    @functools.cached_property
    def trunk_id(self) -> str:
        """Short hash of what determines the trunk's pooled features: backbone, weights, input size, preprocessing,
        precision."""
        return short_hash(
            "trunk", PREPROCESSING_VERSION, self.backbone, self.weights_id, self.image_size, *self.precision_parts
        )

    @functools.cached_property
    def dim(self) -> int:
        """Length of one embedding."""
        return int(self.embed_features(np.zeros((1, self.feature_dim), dtype=np.float32)).shape[1])

    @functools.cached_property
    def feature_dim(self) -> int:
        """Length of one row of pooled trunk features."""
        probe = np.zeros((1, self.image_size, self.image_size, 3), dtype=np.uint8)
        return int(self.trunk(probe).shape[1])

    def features_of_pixels(self, arrays: np.ndarray) -> np.ndarray:
        """Pooled trunk features ``(n, f)`` float32 of letterboxed pixels ``(n, size, size, 3)`` uint8
        (:func:`imgsift_siamese.preprocess.pixels`; the trunk runner normalises them).

        The trunk sees few batch sizes (``imgsift_common.batching``): on the CPU each new one
        costs memory the process keeps, and a worker's batches come in every size.
        """
        rows = [self.trunk(chunk) for chunk in in_batches(arrays, self.batch_size)]
        if not rows:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32, copy=False)

    def features_of_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pooled trunk features ``(n, f)`` float32 of ``images``, in order."""
        rows = [
            self.features_of_pixels(np.stack([pixels(im, self.image_size) for im in chunk]))
            for chunk in (images[start : start + self.batch_size] for start in range(0, len(images), self.batch_size))
        ]
        if not rows:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(rows)

    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings ``(n, d)`` float32 of pooled trunk features: the head, then L2 normalisation."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
            return self.network.embed_features(x).float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings ``(n, d)`` float32 of ``images``, one L2-normalised row per image, in order."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_features(self.features_of_images(images))


def get_embedder(settings: SiameseSettings) -> Embedder:
    """The process's Embedder for these settings; the network is loaded on first use, then reused."""
    limit_torch_threads(settings.torch_threads)
    return _embedder(
        settings.backbone,
        settings.weights,
        settings.device,
        settings.image_size,
        settings.batch_size,
        settings.half,
        ExportFormat(settings.export),
        settings.export_dir,
        settings.torch_threads,
        settings.export_precision,
    )


@functools.lru_cache(maxsize=4)
def _embedder(
    backbone: BackboneName,
    weights: Path | None,
    device: str,
    image_size: int,
    batch_size: int,
    half: bool = False,
    export: ExportFormat = ExportFormat.NONE,
    export_dir: Path | None = None,
    threads: int = 0,
    precision: str = "f32",
) -> Embedder:
    network, weights_id = _network(backbone, weights, device)
    try:
        trunk = trunk_runner(
            network, backbone=backbone, weights_id=weights_id, image_size=image_size, device=torch.device(device),
            half=half, export=export, export_dir=export_dir, threads=threads, precision=precision,
        )  # fmt: skip
    except ExportError as exc:  # reported as a weights problem is: at load, with what to change
        raise WeightsError(str(exc)) from exc
    return Embedder(
        network, backbone=backbone, weights_id=weights_id, image_size=image_size, device=device,
        batch_size=batch_size, trunk=trunk,
    )  # fmt: skip


# A worker has one configuration, so this holds one network; the bound only matters for
# tests and scripts that try several.
@functools.lru_cache(maxsize=2)
def _network(backbone: BackboneName, weights: Path | None, device: str) -> tuple[SiameseNetwork, str]:
    """The network with ImageNet weights and their identity: the expensive part, shared by Embedders."""
    network = SiameseNetwork(build_backbone(backbone, weights)).to(torch.device(device)).eval()
    return network, weights_identity(backbone, weights)


def short_hash(*parts: object) -> str:
    """A 12-hex-digit digest of ``parts``, stable across processes and Python versions."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:12]


# Trained heads of the jobs this process served last, by object key (a few hundred KB each).
_HEAD_CACHE_SIZE = 16
_heads: dict[str, torch.nn.Module] = {}


def job_embedder(job: Job, store: ObjectStore, settings: SiameseSettings) -> Embedder:
    """The embedder that scores ``job``'s crops: the pretrained one, or with the job's trained head."""
    base = get_embedder(settings)
    if job.model is None:
        return base
    from imgsift_siamese.train import TrainedHead

    head = _heads.get(job.model.key)
    if head is None:
        head = TrainedHead.from_bytes(store.get(job.model.key)).head.to(base.device)
        if len(_heads) >= _HEAD_CACHE_SIZE:
            _heads.pop(next(iter(_heads)))
        _heads[job.model.key] = head
    network = SiameseNetwork(base.network.trunk, head)
    tuned = Embedder(
        network,
        backbone=base.backbone,
        weights_id=base.weights_id,
        head_id=job.model.key,
        image_size=base.image_size,
        device=str(base.device),
        batch_size=base.batch_size,
        trunk=base.trunk,  # the same trunk, run the same way; only the head is the job's
    )
    tuned.__dict__["feature_dim"] = base.feature_dim  # the same trunk: known without probing it again
    return tuned
