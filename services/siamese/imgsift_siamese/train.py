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
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2._transform import _RandomApplyTransform

from imgsift_common.batching import in_batches
from imgsift_siamese.distance import judged_distances, reference_distance
from imgsift_siamese.network import SiameseNetwork
from imgsift_siamese.preprocess import preprocess, to_rgb
from imgsift_siamese.settings import DistanceMethod


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
        last = self.net[-1]
        assert isinstance(last, nn.Linear)  # Sequential's indexing is typed Module
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

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
    held_out_answers: list[float] = field(default_factory=list)  # per answered crop, under a head that did not see it

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
            "held_out_answers": self.held_out_answers,
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainedHead:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        meta = json.loads(saved["meta"])
        config = TrainConfig(**meta["config"])
        head = ProjectionHead(meta["features"], config.hidden)
        head.load_state_dict(saved["state"])
        return cls(
            head.eval(), config, meta["features"], meta["stats"], meta["held_out"], meta.get("held_out_answers", [])
        )


# ============================================================================ features


_AUGMENT = v2.Compose(
    [
        v2.RandomResizedCrop(224, scale=(0.5, 1.0), ratio=(0.6, 1.6)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        v2.RandomGrayscale(p=0.1),
    ]
)


# A view's steps: each transform of _AUGMENT that applies to it, with the parameters it drew.
ViewSteps = list[tuple[v2.Transform, dict[str, Any]]]
# Drawing views' parameters seeds torch's global generator: one drawer at a time, so views drawn in
# threads (the calibration's, in compare) are the same as drawn one after the other.
_DRAW_LOCK = threading.Lock()


def augmented_views(image: Image.Image, n: int, seed: int) -> list[Image.Image]:
    """``n`` random views of ``image`` (crops, flips, colour), reproducible from ``seed``."""
    image = to_rgb(image)
    return [apply_view(image, steps) for steps in view_steps(image, n, seed)]


def view_steps(image: Image.Image, n: int, seed: int) -> list[ViewSteps]:
    """The random draws of ``n`` views of ``image`` (RGB) from ``seed``, not applied yet: the draws
    ``_AUGMENT(image)`` makes, in its order (``Transform.forward``: a random-apply transform's coin,
    then ``make_params``). Drawing is cheap and holds torch's generator; applying them
    (:func:`apply_view`) is the costly part and draws nothing, so views can be made in threads."""
    with _DRAW_LOCK:
        torch.manual_seed(seed)
        views: list[ViewSteps] = []
        for _ in range(n):
            steps: ViewSteps = []
            for transform in _AUGMENT.transforms:
                forward = type(transform).forward
                if forward is _RandomApplyTransform.forward:
                    if torch.rand(1) >= transform.p:
                        continue
                elif forward is not v2.Transform.forward:
                    raise TypeError(f"view_steps cannot draw for {type(transform).__name__} (its own forward)")
                # Given the image itself, where _AUGMENT gives each transform the previous one's
                # output: the crop comes first, and the later ones read nothing of it but its
                # channels (RGB throughout); the test compares the two bit for bit.
                steps.append((transform, transform.make_params([image])))
            views.append(steps)
    return views


def apply_view(image: Image.Image, steps: ViewSteps) -> Image.Image:
    """``image`` through the steps :func:`view_steps` drew for one view."""
    for transform, params in steps:
        image = transform.transform(image, params)
    return image


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
    """Feature rows to train on: references (and their views, by group), negatives, answered crops."""

    references: np.ndarray  # (r, f): the references themselves
    views: np.ndarray  # (v, f): augmented views
    view_group: np.ndarray  # (v,): the reference each view comes from
    negatives: np.ndarray  # (n, f): the bank, far crops, "not this" images
    negative_weights: np.ndarray  # (n,)
    answers: np.ndarray | None = None  # (a, f): crops the user answered
    answer_right: np.ndarray | None = None  # (a,) bool: answered right (a positive) or wrong (a hard negative)
    not_this: np.ndarray | None = None  # (t, f): the "not this" images among the negatives, for held-out scores
    hard_weight: float = 3.0  # what a crop answered wrong counts, like a "not this" image

    @property
    def answer_count(self) -> int:
        return 0 if self.answers is None else len(self.answers)


# Caps and shares of the training set: one rule for the worker, ``imgsift verify`` and the bench.
MAX_BANK = 2000  # negative-bank images read at most
MAX_FAR_CROPS = 500  # the job's own far crops used as negatives at most
MIN_CROPS_FOR_FAR = 20  # below this, a job's far crops are too few to say anything


def far_crops(ordered: Sequence[str]) -> list[str]:
    """The job's own crops that its current network puts farthest (its far quarter, at most
    ``MAX_FAR_CROPS``): negatives for training, as few of them show the target. ``ordered``:
    crop keys by ascending distance."""
    if len(ordered) < MIN_CROPS_FOR_FAR:
        return []
    return list(ordered[3 * len(ordered) // 4 :][-MAX_FAR_CROPS:])


def training_set(
    references: np.ndarray,
    views: np.ndarray,
    view_group: np.ndarray,
    *,
    bank: np.ndarray | None,
    far: np.ndarray | None,
    not_this: np.ndarray | None,
    answers: np.ndarray | None = None,
    answer_right: np.ndarray | None = None,
    config: TrainConfig | None = None,
) -> TrainingSet:
    """The rows training learns from: the references and their views against the bank and the far
    crops (weight 1) and the "not this" images (weight ``hard_weight``), and the answered crops."""
    config = config or TrainConfig()
    parts = [(rows, 1.0) for rows in (bank, far) if rows is not None and len(rows)]
    if not_this is not None and len(not_this):
        parts.append((not_this, config.hard_weight))
    if not parts and not (answer_right is not None and (~answer_right).any()):
        raise ValueError("training needs negatives: a negative bank, 'not this' images, crops, or crops answered wrong")
    dim = references.shape[1]
    negatives = np.concatenate([rows for rows, _ in parts]) if parts else np.zeros((0, dim), dtype=np.float32)
    weights = np.concatenate([np.full(len(rows), w) for rows, w in parts]) if parts else np.zeros(0)
    return TrainingSet(
        references, views, view_group, negatives, weights, answers, answer_right,
        not_this if not_this is not None and len(not_this) else None, config.hard_weight,
    )  # fmt: skip


def fit(
    data: TrainingSet,
    config: TrainConfig | None = None,
    *,
    method: DistanceMethod = "nearest",
    k: int = 3,
    margin: float = 0.05,
) -> TrainedHead:
    """Train the job's head on everything, plus per-fold heads for held-out distances.

    Fold ``f`` leaves out a third of the references and a third of the answered crops; its
    head gives the held-out positives (the left-out references' views) and each left-out
    answered crop's distance as the final scoring measures it (to the references and the other
    crops answered right, raised by the "not this" images and the other crops answered wrong,
    ``margin``): what the threshold's calibration reads for crops the final head has seen.
    """
    config = config or TrainConfig()
    held_out: list[float] = []
    held_out_answers = np.full(data.answer_count, np.nan)
    r, a = len(data.references), data.answer_count
    reference_folds = min(config.folds, r) if r >= 3 else 0
    folds = config.folds if reference_folds >= 2 or a >= 2 else 0
    ref_order, answer_order = list(range(r)), list(range(a))
    random.Random(config.seed).shuffle(ref_order)
    random.Random(config.seed + 1).shuffle(answer_order)
    for f in range(folds):
        out = set(ref_order[f::folds]) if reference_folds >= 2 else set()
        keep = np.array([i for i in range(r) if i not in out])
        answers_out = np.array(sorted(answer_order[f::folds]), dtype=int)
        keep_answers = np.setdiff1d(np.arange(a), answers_out)
        head = train_head(*_rows(data, keep, keep_answers), config, negative_weights=_weights(data, keep_answers))
        if out:
            held_out += held_out_views(head, data.references, data.views, data.view_group, keep)
        if len(answers_out):
            held_out_answers[answers_out] = _answer_distances(head, data, answers_out, method, k, margin)
    every = np.arange(a)
    head = train_head(*_rows(data, np.arange(r), every), config, negative_weights=_weights(data, every))
    refs = embed_features(head, data.references)
    negs = embed_features(head, data.negatives) if len(data.negatives) else refs[:0]
    stats = {
        "references": float(r),
        "views": float(len(data.views)),
        "negatives": float(len(data.negatives)),
        "answers": float(a),
    }
    if len(negs):
        stats["negative_distance_median"] = float(np.median(reference_distance(negs, refs)))
    if r >= 2:
        stats["reference_nearest_median"] = float(np.median(leave_one_out(refs)))
    answers = [float(v) for v in held_out_answers]
    return TrainedHead(head, config, data.references.shape[1], stats, held_out, answers)


def _rows(data: TrainingSet, refs: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative rows of a head trained on ``refs`` and the answered crops ``answers``."""
    views = data.views[np.isin(data.view_group, refs)]
    positives = [data.references[refs], views]
    negatives = [data.negatives]
    if data.answers is not None and data.answer_right is not None and len(answers):
        right = data.answer_right[answers]
        positives.append(data.answers[answers][right])
        negatives.append(data.answers[answers][~right])
    return np.concatenate(positives), np.concatenate(negatives)


def _weights(data: TrainingSet, answers: np.ndarray) -> np.ndarray:
    """The negatives' weights for ``_rows``: the crops answered wrong count like "not this" images."""
    wrong = 0
    if data.answer_right is not None and len(answers):
        wrong = int((~data.answer_right[answers]).sum())
    return np.concatenate([data.negative_weights, np.full(wrong, data.hard_weight)])


def _answer_distances(
    head: nn.Module, data: TrainingSet, held: np.ndarray, method: DistanceMethod, k: int, margin: float
) -> np.ndarray:
    """The distances of the answered crops ``held`` under ``head``, scored as the final head scores
    every crop: nearest of the references and the crops answered right, raised by the "not
    this" images and the crops answered wrong, each crop without itself."""
    assert data.answers is not None and data.answer_right is not None
    crops = embed_features(head, data.answers[held])
    answers = embed_features(head, data.answers)
    right, wrong = np.flatnonzero(data.answer_right), np.flatnonzero(~data.answer_right)
    references = np.concatenate([embed_features(head, data.references), answers[right]])
    reference_keys = [None] * len(data.references) + [str(i) for i in right]
    negative_rows = [answers[wrong]]
    negative_keys: list[str | None] = [str(i) for i in wrong]
    if data.not_this is not None:
        negative_rows.insert(0, embed_features(head, data.not_this))
        negative_keys[:0] = [None] * len(data.not_this)
    negatives = np.concatenate(negative_rows)
    return judged_distances(
        crops, references, negatives if len(negatives) else None, method=method, k=k, margin=margin,
        crop_keys=[str(i) for i in held], reference_keys=reference_keys, negative_keys=negative_keys,
    )  # fmt: skip


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
