"""Fine-tuning the Siamese network on a job's references: a projection head on a frozen trunk.

What is trained, and why this way:

- The MobileNet trunk stays frozen (ImageNet features); a small residual projection head
  (``x + MLP(x)``, the MLP 1280 -> 512 -> 1280 for MobileNetV2, starting at zero) maps its
  pooled features to the embedding whose distances decide. With 5 to 50 references, a frozen trunk
  keeps the general features that references alone could not teach, and the features of
  every image are computed once: the head trains on cached feature rows, in seconds on a CPU.
- Positives: each reference and augmented views of it (random resized crops, flips, colour
  jitter, grey), so the head learns what stays the same across views of the object.
- Negatives: a generic negative bank (images of other things), the job's own crops that the
  pretrained network already puts far from the references, and the user's "not this"
  references (hard negatives: a look-alike breed, a drawing, a logo) and crops marked wrong,
  which count ``hard_weight`` times.
- Loss: a triplet loss with batch-hard mining (Hermans et al., 2017): for each positive
  anchor, its farthest positive and its nearest negative, ``relu(d(a, p) - d(a, n) + margin)``.
  The decision it serves is relative: a crop is accepted by its distance to the *nearest*
  reference, so what matters is that views of the object are nearer each other than anything
  else is, by a margin. A contrastive loss would also pull negatives to a fixed distance from
  each other, which the decision never uses.

``fit`` also returns held-out positive distances for calibration: the references are split
into folds, a head is trained without each fold, and the fold's references and their
augmented views are measured against the others with it (:func:`held_out_views`). Those
distances are what an unseen positive crop would score, which a head that saw every
reference cannot tell.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from imgsift_common.batching import in_batches
from imgsift_siamese.distance import reference_distance
from imgsift_siamese.network import SiameseNetwork
from imgsift_siamese.preprocess import preprocess, to_rgb


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 512
    margin: float = 0.3
    epochs: int = 60
    min_steps: int = 200  # optimiser steps at least, however few the references
    batch_positives: int = 32
    batch_negatives: int = 96
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    augmentations: int = 8  # augmented views per reference, besides the reference itself
    hard_weight: float = 3.0  # how much more a "not this" image counts than a generic negative
    folds: int = 3  # held-out folds of references for calibration (0: none)
    seed: int = 0


class ProjectionHead(nn.Module):
    """``x + MLP(x)`` on the trunk's pooled features, the MLP's last layer starting at zero.

    Untrained, it is the identity: the fine-tuned embedding starts exactly at the pretrained
    one and training moves it only as far as the references and negatives ask.
    """

    def __init__(self, features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


@dataclass
class TrainedHead:
    """A trained head, what it was trained with, and its held-out positive distances."""

    head: ProjectionHead
    config: TrainConfig
    features: int
    stats: dict[str, float] = field(default_factory=dict)
    held_out: list[float] = field(default_factory=list)  # distances of unseen references to the others

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "state": self.head.state_dict(),
                "meta": json.dumps(self._meta()),
            },
            buffer,
        )
        return buffer.getvalue()

    def _meta(self) -> dict[str, object]:
        return {
            "config": asdict(self.config),
            "features": self.features,
            "stats": self.stats,
            "held_out": self.held_out,
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainedHead:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        meta = json.loads(saved["meta"])
        config = TrainConfig(**meta["config"])
        head = ProjectionHead(meta["features"], config.hidden)
        head.load_state_dict(saved["state"])
        return cls(head.eval(), config, meta["features"], meta["stats"], meta["held_out"])


# ============================================================================ features


_AUGMENT = v2.Compose(
    [
        v2.RandomResizedCrop(224, scale=(0.5, 1.0), ratio=(0.6, 1.6)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        v2.RandomGrayscale(p=0.1),
    ]
)


def augmented_views(image: Image.Image, n: int, seed: int) -> list[Image.Image]:
    """``n`` random views of ``image`` (crops, flips, colour), reproducible from ``seed``."""
    torch.manual_seed(seed)
    image = to_rgb(image)
    return [_AUGMENT(image) for _ in range(n)]


def pooled_features(
    network: SiameseNetwork, images: Sequence[Image.Image], *, image_size: int = 224, batch_size: int = 32
) -> np.ndarray:
    """The frozen trunk's pooled features ``(n, f)`` float32: what the head is trained on."""
    device = next(network.parameters()).device
    rows = []
    with torch.inference_mode():
        for chunk in in_batches(images, batch_size):  # few batch sizes: imgsift_common.batching
            batch = torch.stack([preprocess(im, image_size) for im in chunk])
            rows.append(network.features(batch.to(device)).float().cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


def embed_features(head: nn.Module | None, features: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings of pooled feature rows, through ``head`` (None: the pretrained embedding)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.inference_mode():
        if head is not None:
            head.eval()
            x = head(x)
        return F.normalize(x, dim=1).numpy()


# ============================================================================ training


def train_head(
    positives: np.ndarray,
    negatives: np.ndarray,
    config: TrainConfig,
    *,
    negative_weights: np.ndarray | None = None,
) -> ProjectionHead:
    """Train a projection head with the batch-hard triplet loss on feature rows."""
    # The head's matrices are small: one thread is faster than several, and with other
    # workers on the machine, many times faster (measured: 50 steps in 0.85 s on one thread,
    # 17.6 s on two while another process kept both cores busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_head(positives, negatives, config, negative_weights)
    finally:
        torch.set_num_threads(threads)


def _train_head(
    positives: np.ndarray, negatives: np.ndarray, config: TrainConfig, negative_weights: np.ndarray | None
) -> ProjectionHead:
    if len(positives) < 2:
        raise ValueError("training needs at least two positive views")
    if len(negatives) == 0:
        raise ValueError("training needs negatives: give a negative bank, 'not this' images, or crops")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    head = ProjectionHead(positives.shape[1], config.hidden, config.dropout)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pos = torch.from_numpy(positives)
    neg = torch.from_numpy(negatives)
    weights = np.ones(len(negatives)) if negative_weights is None else negative_weights.astype(np.float64)
    p_neg = weights / weights.sum()
    steps = max(config.min_steps, max(1, len(positives) // config.batch_positives) * config.epochs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    head.train()
    for _ in range(steps):
        pi = torch.from_numpy(rng.choice(len(positives), min(config.batch_positives, len(positives)), replace=False))
        ni = torch.from_numpy(rng.choice(len(negatives), config.batch_negatives, p=p_neg))
        loss = batch_hard_triplet(F.normalize(head(pos[pi]), dim=1), F.normalize(head(neg[ni]), dim=1), config.margin)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
    return head.eval()


def batch_hard_triplet(positives: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss: for each positive anchor, its farthest positive ``p`` and nearest
    negative ``n``, ``relu(d(a, p) - d(a, n) + margin)``, averaged over the anchors."""
    hardest_positive = torch.cdist(positives, positives).max(dim=1).values
    hardest_negative = torch.cdist(positives, negatives).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


@dataclass(frozen=True)
class TrainingSet:
    """Feature rows to train on: references (and their views, by group) and negatives."""

    references: np.ndarray  # (r, f): the references themselves
    views: np.ndarray  # (v, f): augmented views
    view_group: np.ndarray  # (v,): the reference each view comes from; -1: a positive in every fold
    negatives: np.ndarray  # (n, f)
    negative_weights: np.ndarray  # (n,)


def fit(data: TrainingSet, config: TrainConfig | None = None) -> TrainedHead:
    """Train the job's head on everything, plus per-fold heads for held-out distances."""
    config = config or TrainConfig()
    held_out: list[float] = []
    r = len(data.references)
    folds = min(config.folds, r) if r >= 3 else 0
    if folds >= 2:
        order = list(range(r))
        random.Random(config.seed).shuffle(order)
        for f in range(folds):
            out = set(order[f::folds])
            keep = np.array([i for i in range(r) if i not in out])
            head = train_head(*_rows(data, keep), config, negative_weights=data.negative_weights)
            held_out += held_out_views(head, data.references, data.views, data.view_group, keep)
    head = train_head(*_rows(data, np.arange(r)), config, negative_weights=data.negative_weights)
    refs = embed_features(head, data.references)
    negs = embed_features(head, data.negatives)
    stats = {
        "references": float(r),
        "views": float(len(data.views)),
        "negatives": float(len(data.negatives)),
        "negative_distance_median": float(np.median(reference_distance(negs, refs))),
    }
    if r >= 2:
        stats["reference_nearest_median"] = float(np.median(leave_one_out(refs)))
    return TrainedHead(head, config, data.references.shape[1], stats, held_out)


def _rows(data: TrainingSet, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    views = data.views[np.isin(data.view_group, refs) | (data.view_group < 0)]  # < 0: in every fold
    return np.concatenate([data.references[refs], views]), data.negatives


def held_out_views(
    head: nn.Module | None,
    references: np.ndarray,
    views: np.ndarray,
    view_group: np.ndarray,
    known: np.ndarray | None = None,
) -> list[float]:
    """What an unseen positive *crop* scores: each reference's views measured against the others.

    For every reference outside ``known`` (default: each reference in turn, against all the
    others), its augmented views and itself are measured against the ``known`` references
    (never against itself), through ``head`` (None: the pretrained embedding). The views are
    partial, flipped, recoloured: like detector crops, which sit farther from the references
    than clean references sit from each other (docs/quality.md measures both).
    """
    r = len(references)
    if r < 2:
        return []
    ref_emb = embed_features(head, references)
    view_emb = embed_features(head, views) if len(views) else np.zeros((0, ref_emb.shape[1]), dtype=np.float32)
    out: list[float] = []
    for i in range(r) if known is None else sorted(set(range(r)) - {int(k) for k in known}):
        others = np.array([j for j in (range(r) if known is None else known) if j != i])
        if len(others) == 0:
            continue
        held = np.concatenate([ref_emb[i : i + 1], view_emb[view_group == i]])
        out += [float(d) for d in reference_distance(held, ref_emb[others])]
    return out


def views_per_reference(references: int, config: TrainConfig | None = None) -> int:
    """Augmented views per reference for held-out distances: all of them for a few references, at least 2."""
    most = (config or TrainConfig()).augmentations
    return max(2, min(most, 64 // max(1, references)))


def reference_views(
    images: Sequence[Image.Image], per_reference: int, seed: int = TrainConfig.seed
) -> tuple[list[Image.Image], np.ndarray]:
    """``per_reference`` augmented views of each image, and the index of the image each view comes from."""
    views = [v for i, im in enumerate(images) for v in augmented_views(im, per_reference, seed + i)]
    return views, np.repeat(np.arange(len(images)), per_reference)


def leave_one_out(references: np.ndarray) -> list[float]:
    """Each reference's distance to the nearest other one (unit-norm embedding rows)."""
    if len(references) < 2:
        return []
    return [float(v) for v in reference_distance(references, references, "nearest_other")]
