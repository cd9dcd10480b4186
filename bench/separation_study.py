"""What else was tried for issue 4's goals, on bench/quality_bench.py's tasks and splits.

    .venv/bin/python bench/separation_study.py      # about 8 minutes on the 2-core machine

Pretrained MobileNetV2 embedding, nearest-reference distance, macro F1 over the same 43 tasks
and 4 rotations as the quality benchmark (same reference picks). Prints two tables:

1. Separation, at the best threshold (the upper bound): more references (20 instead of 5);
   scores relative to the negative bank (``d - a * d_bank``: nearer the references than the
   nearest generic negative); the detector's confidence as a second signal
   (``d - w * conf``), on the default crops (conf >= 0.25) and on more crops (conf >= 0.1).
2. Suggested thresholds, no labels: imgsift's calibration from augmented views of the
   references, the same with the views shrunk to the sizes of the job's crops (COCO crops are
   small and upsampled; the views were not), fixed quantiles of the held-out positive
   distances, and accepting everything.

Also the ceiling of verification itself: a perfect verifier (every crop of the target
accepted, nothing else) at both detector thresholds, and a linear classifier on the frozen
features trained on the references against the negative bank (class-balanced logistic
regression, suggested at p = 0.5), other poolings and an earlier layer of the same trunk, and
PCA whitening fitted on each task's crops and bank: whether anything else on the same trunk
separates better.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # quality_bench, next to this file

import quality_bench as qb  # noqa: E402
from PIL import Image  # noqa: E402

from imgsift_common.batching import in_batches  # noqa: E402
from imgsift_common.calibration import calibrate  # noqa: E402
from imgsift_siamese.backbone import build_backbone  # noqa: E402
from imgsift_siamese.distance import pairwise_distances  # noqa: E402
from imgsift_siamese.network import SiameseNetwork  # noqa: E402
from imgsift_siamese.preprocess import preprocess  # noqa: E402
from imgsift_siamese.train import TrainConfig, augmented_views, held_out_views, pooled_features  # noqa: E402
from tests.support.coco import Coco128  # noqa: E402

LOW_CONF = 0.1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _shrunk(views: list[Image.Image], sides: np.ndarray, seed: int) -> list[Image.Image]:
    """Each view scaled down so its longer side is that of a random crop of the job (never up)."""
    rng = np.random.default_rng(seed)
    out = []
    for v in views:
        side, longest = float(rng.choice(sides)), max(v.size)
        if side < longest:
            f = side / longest
            v = v.resize((max(8, round(v.width * f)), max(8, round(v.height * f))), Image.BILINEAR)
        out.append(v)
    return out


def _pooled_ways(network: SiameseNetwork, images: list[Image.Image]) -> dict[str, np.ndarray]:
    """Unit-norm trunk features pooled four ways: ``average`` (what imgsift uses: equal to
    ``pooled_features``), ``GeM`` (generalised mean, p = 3), ``max``, and ``block 17`` (the
    average of the 320-channel block before the trunk's last 1x1 convolution)."""
    ways: dict[str, list[np.ndarray]] = {"average": [], "GeM": [], "max": [], "block 17": []}
    with torch.inference_mode():
        for chunk in in_batches(images, 32):
            x = torch.stack([preprocess(im, 224) for im in chunk])
            for index, layer in enumerate(network.trunk):
                x = layer(x)
                if index == 17:
                    ways["block 17"].append(x.mean((2, 3)).numpy())
            ways["average"].append(x.mean((2, 3)).numpy())
            ways["GeM"].append(x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy())
            ways["max"].append(x.amax((2, 3)).numpy())
    return {way: _unit(np.concatenate(rows)) for way, rows in ways.items()}


def _whitened(crops: np.ndarray, refs: np.ndarray, bank: np.ndarray, dims: int) -> np.ndarray:
    """Nearest-reference distances after PCA whitening fitted on the task's crops and bank (no
    labels), with 10% of the largest variance added to every variance (shrinkage)."""
    fit = np.concatenate([crops, bank])
    mean = fit.mean(axis=0)
    _, sv, vt = np.linalg.svd(fit - mean, full_matrices=False)
    var = sv**2 / len(fit)
    k = min(dims, len(fit) - 1)
    project = vt[:k] / np.sqrt(var[:k] + 0.1 * var[0])[:, None]
    return pairwise_distances(_unit((crops - mean) @ project.T), _unit((refs - mean) @ project.T)).min(axis=1)


def main() -> None:
    coco = Coco128(qb.ROOT.parent / "shared" / "data" / "coco128")
    weights = str(qb.ROOT.parent / "shared" / "models" / "yolov8n.pt")
    images = coco.images
    truth = [coco.labels(p) for p in images]
    # Greedy matching by score: crops at conf >= 0.25 match exactly as in the quality benchmark.
    crops = qb.matched_crops(qb.detect_all(weights, images, conf=LOW_CONF), truth)
    boxes = qb.true_boxes(truth)
    network = SiameseNetwork(build_backbone("mobilenet_v2", None)).eval()
    print(f"embedding {len(crops)} crops (conf >= {LOW_CONF}) and {len(boxes)} true boxes ...", flush=True)
    crop_pooled = _pooled_ways(network, [qb.crop_image(images[c.image], c.box) for c in crops])
    box_pooled = _pooled_ways(network, [qb.crop_image(images[i], t.box) for i, t in boxes])
    crop_feats, box_feats = crop_pooled["average"], box_pooled["average"]  # imgsift's own features
    crop_image = np.array([c.image for c in crops])
    crop_cls = np.array([c.cls for c in crops])
    crop_truth = np.array([c.truth or "" for c in crops])
    crop_conf = np.array([c.score for c in crops])
    crop_side = np.array([max(c.box[2] - c.box[0], c.box[3] - c.box[1]) * (1 + 2 * qb.PAD) for c in crops])
    box_names = np.array([t.class_name.replace("_", " ") for _, t in boxes])
    box_image = np.array([i for i, _ in boxes])

    n_views = TrainConfig.augmentations

    def task_scores(
        target: str,
        total: int,
        rotation: int,
        bank_boxes: np.ndarray,
        in_low: np.ndarray,
        ref_idx: np.ndarray,
        ref20: np.ndarray,
    ) -> dict[str, float]:
        """Every method's F1 for one task in one rotation (0 for all when the detector found nothing)."""
        out: dict[str, float] = {}
        is_target = crop_truth == target
        in_task = in_low & (crop_conf >= 0.25)

        def best(scores: np.ndarray, where: np.ndarray) -> float:
            return qb.best_threshold(scores, is_target[where], total)[1] if where.any() else 0.0

        def at(scores: np.ndarray, t: float | None, where: np.ndarray = in_task) -> float:
            return qb.prf(scores <= t, is_target[where], total)[2] if t is not None and where.any() else 0.0

        refs, bank = box_feats[ref_idx], box_feats[bank_boxes]
        d = pairwise_distances(crop_feats[in_task], refs).min(axis=1)
        d_low = pairwise_distances(crop_feats[in_low], refs).min(axis=1)
        d_bank = pairwise_distances(crop_feats[in_task], bank).min(axis=1)
        out["YOLO only (conf 0.25)"] = at(d, float("inf"))
        out["best: nearest of 5 references"] = best(d, in_task)
        for way in ("GeM", "max", "block 17"):  # other poolings and layers of the same trunk
            for where, conf in ((in_task, 0.25), (in_low, LOW_CONF)):
                other = pairwise_distances(crop_pooled[way][where], box_pooled[way][ref_idx]).min(axis=1)
                out[f"best: {way} features, conf >= {conf}"] = best(other, where)
        out["best: PCA-whitened, 32 dims"] = best(_whitened(crop_feats[in_task], refs, bank, 32), in_task)
        out["best: nearest of up to 20 references"] = best(
            pairwise_distances(crop_feats[in_task], box_feats[ref20]).min(axis=1), in_task
        )
        for a in (0.5, 1.0):
            out[f"best: d - {a} * d_bank"] = best(d - a * d_bank, in_task)
        for w in (0.1, 0.2, 0.3):
            out[f"best: d - {w} * conf"] = best(d - w * crop_conf[in_task], in_task)
        out[f"YOLO only (conf {LOW_CONF})"] = at(d_low, float("inf"), in_low)
        for where, conf in ((in_task, 0.25), (in_low, LOW_CONF)):
            out[f"perfect verifier, conf >= {conf}"] = qb.prf(is_target[where], is_target[where], total)[2]
            linear = qb.logistic(refs, bank, np.ones(len(bank)))(crop_feats[where]) if where.any() else np.zeros(0)
            out[f"best: linear classifier, conf >= {conf}"] = best(linear, where)
            out[f"suggested: linear classifier at p = 0.5, conf >= {conf}"] = at(linear, 0.5, where)
        for w in (0.0, 0.1, 0.2, 0.3):
            out[f"best: d - {w} * conf, conf >= {LOW_CONF}"] = best(d_low - w * crop_conf[in_low], in_low)

        # Suggested thresholds (no labels), from held-out views of the references.
        ref_images = [qb.crop_image(images[boxes[k][0]], boxes[k][1].box) for k in ref_idx]
        group = np.repeat(np.arange(len(ref_images)), n_views)
        views = [v for n, im in enumerate(ref_images) for v in augmented_views(im, n_views, rotation * 100 + n)]
        sides = crop_side[in_task] if in_task.any() else np.array([224.0])
        for label, chosen in (("views", views), ("views shrunk to the crops' sizes", _shrunk(views, sides, rotation))):
            held = held_out_views(None, refs, _unit(pooled_features(network, chosen)), group)
            out[f"suggested: imgsift calibration, {label}"] = at(
                d, calibrate(held, d.tolist()).suggested if len(d) else None
            )
            if label == "views":
                for q in (0.8, 0.9, 1.0):
                    out[f"suggested: {q:.0%} quantile of held-out positives"] = at(d, float(np.quantile(held, q)))
        return out

    f1: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rng, rng20 = np.random.default_rng(0), np.random.default_rng(0)  # the quality benchmark's reference picks
    splits = qb.task_splits(truth, box_names, box_image, qb.all_tasks(), 4)
    for rotation, is_ref_image, task, total, candidates in splits:
        ref_idx = qb._pick_references(candidates, box_image, 5, rng)
        ref20 = qb._pick_references(candidates, box_image, 20, rng20)
        in_low = ~is_ref_image[crop_image] & np.isin(crop_cls, task.detector_classes)
        bank_boxes = is_ref_image[box_image] & (box_names != task.target)  # the generic negative bank
        result = task_scores(task.target, total, rotation, bank_boxes, in_low, ref_idx, ref20)
        for key, value in result.items():
            f1[(task.name, task.kind)][key].append(value)
        print(f"r{rotation} {task.name}", flush=True)

    qb.macro_table(f1, "macro F1")


if __name__ == "__main__":
    main()
