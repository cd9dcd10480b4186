"""Does fine-tuning the trunk's last stages separate better than the frozen features? (issue 4)

    .venv/bin/python bench/unfreeze_study.py      # about 11 minutes on the 2-core machine

One rotation (the first: ``--rotation``) of bench/quality_bench.py's tasks and reference
picks, detector at conf 0.25. Macro F1 of the nearest-reference distance at the best
threshold, for the frozen ImageNet MobileNetV2 trunk (what imgsift uses) and for the same
trunk with its last two stages (block 17 and the final 1x1 convolution: 0.89 M of the
trunk's 2.22 M parameters) fine-tuned per task: the batch-hard triplet loss of
``imgsift_siamese.train`` on the references and their augmented views against the negative
bank, batch-norm statistics frozen. The best threshold is the upper bound: whether unfreezing
can separate the target better at all, before any calibration.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # quality_bench, next to this file

import quality_bench as qb  # noqa: E402
from PIL import Image  # noqa: E402

from imgsift_common.batching import in_batches  # noqa: E402
from imgsift_siamese.backbone import build_backbone  # noqa: E402
from imgsift_siamese.preprocess import preprocess  # noqa: E402
from imgsift_siamese.train import TrainConfig, augmented_views, batch_hard_triplet  # noqa: E402
from tests.support.coco import Coco128  # noqa: E402

FROZEN = 17  # trunk stages 0..16 stay frozen; 17 (the last inverted residual) and 18 (1x1 conv) train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotation", type=int, default=0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--negatives", type=int, default=48, help="bank rows per step")
    args = parser.parse_args()
    torch.manual_seed(0)
    coco = Coco128(qb.ROOT.parent / "shared" / "data" / "coco128")
    images = coco.images
    truth = [coco.labels(p) for p in images]
    crops = qb.matched_crops(qb.detect_all(str(qb.ROOT.parent / "shared" / "models" / "yolov8n.pt"), images), truth)
    boxes = qb.true_boxes(truth)
    trunk = build_backbone("mobilenet_v2", None).eval()
    low, top = trunk[:FROZEN], trunk[FROZEN:]

    def maps(ims: list[Image.Image]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([low(torch.stack([preprocess(im, 224) for im in chunk])) for chunk in in_batches(ims, 32)])

    box_images = [qb.crop_image(images[i], t.box) for i, t in boxes]
    print(f"trunk stages 0-{FROZEN - 1} of {len(crops)} crops and {len(boxes)} true boxes ...", flush=True)
    crop_maps = maps([qb.crop_image(images[c.image], c.box) for c in crops])
    box_maps = maps(box_images)
    crop_image = np.array([c.image for c in crops])
    crop_cls = np.array([c.cls for c in crops])
    crop_truth = np.array([c.truth or "" for c in crops])
    box_names = np.array([t.class_name.replace("_", " ") for _, t in boxes])
    box_image = np.array([i for i, _ in boxes])

    def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(model(x).mean((2, 3)), dim=1)

    def nearest(model: torch.nn.Module, sel: np.ndarray, ref_idx: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            a = embed(model, crop_maps[torch.from_numpy(np.flatnonzero(sel))])
            return torch.cdist(a, embed(model, box_maps[torch.from_numpy(ref_idx)])).min(dim=1).values.numpy()

    def tuned(positives: torch.Tensor, negatives: torch.Tensor) -> torch.nn.Module:
        model = copy.deepcopy(top).eval()  # eval: batch-norm statistics stay ImageNet's
        for p in model.parameters():
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        rng = np.random.default_rng(0)
        for _ in range(args.steps):
            pick = torch.from_numpy(rng.choice(len(negatives), min(args.negatives, len(negatives)), replace=False))
            loss = batch_hard_triplet(embed(model, positives), embed(model, negatives[pick]), TrainConfig.margin)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return model.eval()

    f1: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rng = np.random.default_rng(0)  # the quality benchmark's reference picks
    for rotation, is_ref_image, task, total, candidates in qb.task_splits(
        truth, box_names, box_image, qb.all_tasks(), 4
    ):
        ref_idx = qb._pick_references(candidates, box_image, 5, rng)
        if rotation != args.rotation:
            continue
        sel = ~is_ref_image[crop_image] & np.isin(crop_cls, task.detector_classes)
        positive = crop_truth[sel] == task.target
        if not sel.any():
            f1[(task.name, task.kind)]["frozen"].append(0.0)
            f1[(task.name, task.kind)]["unfrozen"].append(0.0)
            continue
        views = [
            v
            for n, k in enumerate(ref_idx)
            for v in augmented_views(box_images[k], TrainConfig.augmentations, rotation * 100 + n)
        ]
        positives = torch.cat([box_maps[torch.from_numpy(ref_idx)], maps(views)])
        bank = box_maps[torch.from_numpy(np.flatnonzero(is_ref_image[box_image] & (box_names != task.target)))]
        frozen = qb.best_threshold(nearest(top, sel, ref_idx), positive, total)[1]
        unfrozen = qb.best_threshold(nearest(tuned(positives, bank), sel, ref_idx), positive, total)[1]
        f1[(task.name, task.kind)]["frozen"].append(frozen)
        f1[(task.name, task.kind)]["unfrozen"].append(unfrozen)
        print(f"r{rotation} {task.name:28} frozen {frozen:.3f}  unfrozen {unfrozen:.3f}", flush=True)

    qb.macro_table(f1, f"macro F1 at the best threshold, rotation {args.rotation}", counts=True)


if __name__ == "__main__":
    main()
