"""Quality of the verification stage on real labelled photos, against the baselines.

    .venv/bin/python bench/quality_bench.py        # COCO128 + YOLOv8n from ../shared; --help for paths

On COCO128 (its boxes are the truth; a detector box is a true positive when it overlaps an
unmatched true box of the target class with IoU >= 0.5), the images are split once: every
fourth image is a *reference* image (references and the generic negative bank come from
these), the others are *evaluation* images (the job's crops). Tasks:

- direct: the detector keeps the target class itself (``dog`` -> YOLO class dog);
- fine-grained: the detector keeps a COCO supercategory (``animal``, ``vehicle``, ``food``,
  ``kitchen``...) and the target is one class inside it, so YOLO alone cannot separate it
  and the references must.

A task needs at least 5 true boxes of its class in the evaluation images and 3 in the
reference images (up to ``--refs`` of those become references). Methods, each at its
suggested threshold and at its best threshold (the upper bound a user cannot know):

- (a) YOLO only: every detector crop of the detector classes accepted;
- (b) YOLO + MobileNet classifier: a logistic regression on the same frozen MobileNetV2
  features, trained on the same references (and augmented views) against the same
  negatives; suggested threshold: probability 0.5;
- (c) YOLO + Siamese, pretrained embeddings, nearest-reference distance;
- (d) YOLO + Siamese, fine-tuned head (``imgsift_siamese.train``).

(c) and (d) are calibrated by ``imgsift_common.calibration`` from held-out positives (each
reference and its augmented views against the other references, as the product does) and
the job's own crop distances, with no labels. The paper's ablation runs (c) on whole images
instead of crops. Prints the table, writes ``<out>/quality.json`` and precision-recall plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support.coco: the COCO128 reader the tests use

from PIL import Image  # noqa: E402

from imgsift_common.calibration import calibrate  # noqa: E402
from imgsift_detector.coco import COCO_SUPERCATEGORIES  # noqa: E402
from imgsift_detector.detect import padded_box  # noqa: E402
from imgsift_detector.model import Detector  # noqa: E402
from imgsift_siamese.backbone import build_backbone  # noqa: E402
from imgsift_siamese.distance import reference_distance  # noqa: E402
from imgsift_siamese.network import SiameseNetwork  # noqa: E402
from imgsift_siamese.train import (  # noqa: E402
    TrainConfig,
    TrainingSet,
    augmented_views,
    embed_features,
    fit,
    held_out_views,
    leave_one_out,
    pooled_features,
)
from tests.support.coco import COCO_NAMES, Coco128, iou  # noqa: E402

PAD = 0.1  # the detector's default crop padding


@dataclass
class Crop:
    image: int  # index into the image list
    cls: str  # detector class
    score: float
    box: tuple[float, float, float, float]
    truth: str | None  # class of the true box it matches (IoU >= 0.5), None if none


@dataclass
class Task:
    name: str
    target: str
    detector_classes: tuple[str, ...]
    kind: str  # direct | fine-grained


def detect_all(weights: str, images: list[Path], conf: float = 0.25) -> list[list[tuple[str, float, tuple]]]:
    detector = Detector(weights)
    out = []
    for start in range(0, len(images), 16):
        pixels = [Image.open(p).convert("RGB") for p in images[start : start + 16]]
        for found in detector.predict(pixels, conf=conf):
            out.append([(detector.names[d.class_id], d.score, d.box) for d in found])
    return out


def matched_crops(dets: list[list[tuple[str, float, tuple]]], truth: list) -> list[Crop]:
    """Every detection as a Crop, with the class of the true box it matches (``match``)."""
    return [
        Crop(i, name, score, box, t)
        for i, found in enumerate(dets)
        for (name, score, box), t in zip(found, match(found, truth[i]), strict=True)
    ]


def true_boxes(truth: list) -> list[tuple[int, Any]]:
    """(image index, box) of every true box at least 16 px wide and high: references and the bank come from these."""
    boxes = [(i, t) for i in range(len(truth)) for t in truth[i]]
    return [(i, t) for i, t in boxes if (t.box[2] - t.box[0]) >= 16 and (t.box[3] - t.box[1]) >= 16]


def all_tasks() -> list[Task]:
    """Per COCO class: the direct task, and the fine-grained one inside its supercategory (if it has others)."""
    supercat_of = {c: s for s, members in COCO_SUPERCATEGORIES.items() for c in members}
    tasks: list[Task] = []
    for name in COCO_NAMES:
        cls = name.replace("_", " ")
        tasks.append(Task(cls, cls, (cls,), "direct"))
        sup = supercat_of.get(cls)
        if sup and len(COCO_SUPERCATEGORIES[sup]) > 1:
            tasks.append(Task(f"{cls} in {sup}", cls, COCO_SUPERCATEGORIES[sup], "fine-grained"))
    return tasks


def task_splits(
    truth: list, box_names: np.ndarray, box_image: np.ndarray, tasks: list[Task], rotations: int
) -> Iterator[tuple[int, np.ndarray, Task, int, np.ndarray]]:
    """(rotation, which images are reference images, task, true boxes of the target in the
    evaluation images, candidate reference boxes) of every task that runs in each rotation:
    at least 5 true boxes to find and 3 to pick references from."""
    for rotation in range(rotations):
        is_ref_image = np.arange(len(truth)) % rotations == rotation
        ref_box = is_ref_image[box_image]
        for task in tasks:
            total = sum(
                1
                for i in np.flatnonzero(~is_ref_image)
                for t in truth[i]
                if t.class_name.replace("_", " ") == task.target
            )
            candidates = np.flatnonzero(ref_box & (box_names == task.target))
            if total >= 5 and len(candidates) >= 3:
                yield rotation, is_ref_image, task, total, candidates


def match(dets: list[tuple[str, float, tuple]], truth: list) -> list[str | None]:
    """Greedy, by score: each detection gets the class of the best unmatched true box, IoU >= 0.5.

    Whatever class the detector gave the box: a crop is a dog when it shows a true dog box,
    also when the detector called it a cat (in a fine-grained task ``dog in animal`` the
    references, not the detector's label, must say so).
    """
    used: set[int] = set()
    result: list[str | None] = [None] * len(dets)
    for i in sorted(range(len(dets)), key=lambda i: -dets[i][1]):
        _, _, box = dets[i]
        best, best_iou = None, 0.5
        for j, t in enumerate(truth):
            if j in used:
                continue
            v = iou(box, t.box)
            if v >= best_iou:
                best, best_iou = j, v
        if best is not None:
            used.add(best)
            result[i] = truth[best].class_name.replace("_", " ")
    return result


def crop_image(path: Path, box: tuple[float, float, float, float]) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        b = padded_box(box, PAD, im.width, im.height)
        return im.crop(tuple(round(v) for v in b))


def prf(accepted: np.ndarray, positive: np.ndarray, total_positives: int) -> tuple[float, float, float]:
    tp = int((accepted & positive).sum())
    fp = int((accepted & ~positive).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / total_positives if total_positives else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def best_threshold(scores: np.ndarray, positive: np.ndarray, total: int) -> tuple[float, float]:
    best = (float("inf"), 0.0)
    for t in np.unique(scores):
        f = prf(scores <= t, positive, total)[2]
        if f > best[1]:
            best = (float(t), f)
    return best


def pr_curve(scores: np.ndarray, positive: np.ndarray, total: int) -> tuple[list[float], list[float]]:
    ps, rs = [], []
    for t in np.unique(scores):
        p, r, _ = prf(scores <= t, positive, total)
        ps.append(p)
        rs.append(r)
    return rs, ps


def logistic(pos: np.ndarray, neg: np.ndarray, weights: np.ndarray, epochs: int = 300) -> tuple:
    """A logistic-regression classifier on L2-normalised features (torch, full batch, L2 penalty)."""
    import torch

    x = torch.from_numpy(np.concatenate([pos, neg]))
    x = torch.nn.functional.normalize(x, dim=1)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    w = torch.from_numpy(np.concatenate([np.full(len(pos), len(neg) / max(1, len(pos))), weights])).float()
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=epochs)

    def closure():  # type: ignore[no-untyped-def]
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y, weight=w)).mean()
        loss = loss + 1e-3 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def score(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            f = torch.nn.functional.normalize(torch.from_numpy(features), dim=1)
            return 1.0 - torch.sigmoid(model(f).squeeze(1)).numpy()  # a "distance": low = target

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--refs", type=int, default=5, help="references per task at most")
    parser.add_argument("--rotations", type=int, default=4, help="reference/evaluation splits (every image once)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "quality")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    coco = Coco128(args.coco)
    images = coco.images
    truth = [coco.labels(p) for p in images]
    print(f"detecting {len(images)} images ...", flush=True)
    crops = matched_crops(detect_all(args.weights, images), truth)
    boxes = true_boxes(truth)

    print(f"embedding {len(crops)} crops, {len(boxes)} true boxes and {len(images)} whole images ...", flush=True)
    network = SiameseNetwork(build_backbone("mobilenet_v2", None)).eval()
    crop_features = pooled_features(network, [crop_image(images[c.image], c.box) for c in crops])
    box_features = pooled_features(network, [crop_image(images[i], t.box) for i, t in boxes])
    whole_features = pooled_features(network, [Image.open(p).convert("RGB") for p in images])
    box_names = np.array([t.class_name.replace("_", " ") for _, t in boxes])
    box_image = np.array([i for i, _ in boxes])
    crop_image_index = np.array([c.image for c in crops])
    crop_cls = np.array([c.cls for c in crops])
    crop_truth = np.array([c.truth or "" for c in crops])

    tasks = all_tasks()

    methods = (
        "classifier",
        "siamese_pretrained",
        "siamese_pretrained_loo",
        "siamese_finetuned",
        "whole_image_pretrained",
    )
    keys = ["yolo_only"] + [f"{m}_{w}" for m in methods for w in ("suggested", "best")]
    per_task: dict[str, list[dict]] = {}
    raw: list[dict] = []  # per task and split: labels, distances, held-out positives (to study calibration)
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    rng = np.random.default_rng(0)
    for rotation, is_ref_image, task, total, candidates in task_splits(
        truth, box_names, box_image, tasks, args.rotations
    ):
        eval_crop = ~is_ref_image[crop_image_index]
        ref_box = is_ref_image[box_image]
        t0 = time.time()
        in_task = eval_crop & np.isin(crop_cls, task.detector_classes)
        positive = crop_truth[in_task] == task.target
        feats = crop_features[in_task]
        whole = whole_features[crop_image_index[in_task]]
        ref_idx = _pick_references(candidates, box_image, args.refs, rng)
        refs = box_features[ref_idx]
        ref_images = [crop_image(images[boxes[k][0]], boxes[k][1].box) for k in ref_idx]
        n_aug = TrainConfig.augmentations
        views = [v for n, im in enumerate(ref_images) for v in augmented_views(im, n_aug, rotation * 100 + n)]
        view_group = np.repeat(np.arange(len(ref_images)), n_aug)
        view_features = pooled_features(network, views)
        bank = box_features[ref_box & (box_names != task.target)]

        pre_refs = embed_features(None, refs)
        pre = reference_distance(embed_features(None, feats), pre_refs) if len(feats) else np.zeros(0)
        # Far crops of the job itself join the negatives (transductive: no labels used).
        far = feats[pre > np.quantile(pre, 0.5)] if len(pre) >= 4 else feats[:0]
        negatives = np.concatenate([bank, far])
        weights = np.ones(len(negatives))

        trained = fit(TrainingSet(refs, view_features, view_group, negatives, weights), TrainConfig(epochs=args.epochs))
        ft_refs = embed_features(trained.head, refs)
        ft = reference_distance(embed_features(trained.head, feats), ft_refs) if len(feats) else np.zeros(0)
        clf = logistic(np.concatenate([refs, view_features]), negatives, weights)
        cl = clf(feats) if len(feats) else np.zeros(0)
        wh = reference_distance(embed_features(None, whole), pre_refs) if len(feats) else np.zeros(0)

        yolo = prf(np.ones(len(feats), dtype=bool), positive, total)[2]
        row = {
            "rotation": rotation,
            "crops": int(in_task.sum()),
            "positives": int(positive.sum()),
            "truth": total,
            "references": len(refs),
            "yolo_only": yolo,
        }
        pre_held_out = held_out_views(None, refs, view_features, view_group)
        loo = leave_one_out(pre_refs)  # the clean references alone: what calibration used before
        for key, scores, suggested in (
            ("classifier", cl, 0.5),
            ("siamese_pretrained", pre, calibrate(pre_held_out, pre).suggested),
            ("siamese_pretrained_loo", pre, calibrate(loo, pre).suggested),
            ("siamese_finetuned", ft, calibrate(trained.held_out, ft).suggested),
            ("whole_image_pretrained", wh, calibrate(pre_held_out, wh).suggested),
        ):
            row[f"{key}_suggested"] = prf(scores <= suggested, positive, total)[2] if suggested is not None else 0.0
            row[f"{key}_best"] = best_threshold(scores, positive, total)[1]
            if not per_task.get(task.name):  # the first split this task ran in
                curves.setdefault(task.name, {})[key] = pr_curve(scores, positive, total)
        per_task.setdefault(task.name, []).append({"kind": task.kind, **row})
        raw.append(
            {
                "task": task.name,
                "kind": task.kind,
                "rotation": rotation,
                "truth": total,
                "positive": positive.tolist(),
                "pretrained": pre.tolist(),
                "finetuned": ft.tolist(),
                "pretrained_held_out": pre_held_out,
                "loo": loo,
                "held_out": trained.held_out,
            }
        )
        print(
            f"r{rotation} {task.name:26} crops {row['crops']:4} pos {row['positives']:3}/{total:3}  "
            f"yolo {row['yolo_only']:.2f}  clf {row['classifier_suggested']:.2f}/{row['classifier_best']:.2f}  "
            f"pre {row['siamese_pretrained_suggested']:.2f}/{row['siamese_pretrained_best']:.2f}  "
            f"ft {row['siamese_finetuned_suggested']:.2f}/{row['siamese_finetuned_best']:.2f}  "
            f"whole {row['whole_image_pretrained_best']:.2f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )

    # A task's score: the mean over the rotations it ran in; then the macro average over tasks.
    rows = [
        {
            "task": name,
            "kind": runs[0]["kind"],
            "rotations": len(runs),
            **{k: float(np.mean([r[k] for r in runs])) for k in keys},
        }
        for name, runs in per_task.items()
    ]
    summary = {}
    for kind in ("direct", "fine-grained", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        summary[kind] = {"tasks": len(sel), **{k: float(np.mean([r[k] for r in sel])) for k in keys}}
    (args.out / "quality.json").write_text(json.dumps({"summary": summary, "tasks": rows}, indent=2))
    (args.out / "distances.json").write_text(json.dumps(raw))
    _plot(curves, rows, args.out)
    print("\nmacro F1 (suggested / best threshold)")
    for kind, s in summary.items():
        print(
            f"{kind:13} ({s['tasks']:2} tasks)  yolo {s['yolo_only']:.3f}  "
            f"clf {s['classifier_suggested']:.3f}/{s['classifier_best']:.3f}  "
            f"siamese pre {s['siamese_pretrained_suggested']:.3f}/{s['siamese_pretrained_best']:.3f} "
            f"(clean-reference positives {s['siamese_pretrained_loo_suggested']:.3f})  "
            f"fine-tuned {s['siamese_finetuned_suggested']:.3f}/{s['siamese_finetuned_best']:.3f}  "
            f"whole-image {s['whole_image_pretrained_suggested']:.3f}/{s['whole_image_pretrained_best']:.3f}"
        )
    print(f"\n{time.time() - started:.0f} s; written to {args.out}")


def macro_table(f1: dict[tuple[str, str], dict[str, list[float]]], title: str, counts: bool = False) -> None:
    """Print macro F1 per method: a task's F1 is its mean over rotations, then the mean over tasks
    (all, direct, fine-grained). ``f1``: (task name, kind) -> method -> F1 of each rotation."""
    print(f"\n{title} | all | direct | fine-grained")
    for name in next(iter(f1.values())):
        cells = []
        for kind in (None, "direct", "fine-grained"):
            chosen = [np.mean(v[name]) for (_, k), v in f1.items() if kind is None or k == kind]
            cells.append(f"{np.mean(chosen):.3f}" + (f" ({len(chosen)})" if counts else ""))
        print(f"{name} | " + " | ".join(cells))


def _pick_references(candidates: np.ndarray, image_of: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` true boxes, one per image first: users pick varied references, not one flock."""
    order = rng.permutation(candidates)
    first, rest, seen = [], [], set()
    for k in order:
        (rest if image_of[k] in seen else first).append(k)
        seen.add(image_of[k])
    return np.array((first + rest)[:n])


def _plot(curves: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("direct", "fine-grained"):
        names = [r["task"] for r in rows if r["kind"] == kind]
        if not names:
            continue
        cols = 4
        lines = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(lines, cols, figsize=(16, 3.6 * lines), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            for key, label in (("classifier", "classifier"), ("siamese_pretrained", "Siamese pretrained"),
                               ("siamese_finetuned", "Siamese fine-tuned")):  # fmt: skip
                r, p = curves[name][key]
                ax.plot(r, p, label=label)
            yolo = next(x for x in rows if x["task"] == name)
            ax.set_title(f"{name} (YOLO only F1 {yolo['yolo_only']:.2f})", fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"pr-{kind}.png", dpi=80)
        plt.close(fig)


if __name__ == "__main__":
    main()
