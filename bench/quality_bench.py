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


def baseline_study(args: argparse.Namespace) -> None:
    """Issue 4's comparison on COCO128: YOLO only, the classifier, the Siamese network pretrained and
    fine-tuned (label-free calibration), whole images; ``--baselines``."""
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


# ============================================================================ the answers study (issue 15)

CLOTHING_GROUPS = {  # look-alikes: the target among the others, at their natural shares
    "tops": ("T-Shirt", "Polo", "Shirt", "Longsleeve"),
    "bottoms": ("Pants", "Shorts"),
    "dress/skirt": ("Dress", "Skirt"),
    "outerwear": ("Hoodie", "Blazer", "Outwear"),
}
CLOTHING_COARSE = (  # the target among twice as many photos of every other class
    "T-Shirt", "Longsleeve", "Pants", "Shoes", "Shirt", "Dress", "Outwear", "Shorts", "Hat", "Skirt", "Polo",
    "Undershirt", "Blazer", "Hoodie",
)  # fmt: skip
CLOTHING_CAP = 1500  # photos per clothing job at most (sampled), so a task runs in seconds
ROUND = 5  # questions a simulated user answers before asking again (the UI's batch)


@dataclass
class Case:
    """One task in one rotation: the job's crops (trunk features), their truth, the references."""

    dataset: str
    task: str
    kind: str
    rotation: int
    crops: np.ndarray
    positive: np.ndarray
    total: int  # true instances, found or not: recall's denominator
    scores: np.ndarray  # the detector's confidence of each crop (1 for whole images)
    refs: np.ndarray
    ref_images: list[Image.Image]
    bank: np.ndarray


def coco_cases(
    coco: Coco128,
    found: list[Crop],
    crop_rows: np.ndarray,
    box_rows: np.ndarray,
    conf: float,
    refs: int,
    rotations: int,
) -> list[Case]:
    """COCO128's tasks (``all_tasks``) in each rotation, with the crops the detector keeps at ``conf``."""
    images = coco.images
    truth = [coco.labels(p) for p in images]
    boxes = true_boxes(truth)
    box_names = np.array([t.class_name.replace("_", " ") for _, t in boxes])
    box_image = np.array([i for i, _ in boxes])
    keep = np.array([c.score >= conf for c in found])
    kept = [c for c, k in zip(found, keep, strict=True) if k]
    rows = crop_rows[keep]
    image_of = np.array([c.image for c in kept])
    cls = np.array([c.cls for c in kept])
    truth_of = np.array([c.truth or "" for c in kept])
    score = np.array([c.score for c in kept])
    rng = np.random.default_rng(0)
    cases = []
    for rotation, is_ref, task, total, candidates in task_splits(truth, box_names, box_image, all_tasks(), rotations):
        in_task = ~is_ref[image_of] & np.isin(cls, task.detector_classes)
        picked = _pick_references(candidates, box_image, refs, rng)
        cases.append(
            Case("coco", task.name, task.kind, rotation, rows[in_task], truth_of[in_task] == task.target, total,
                 score[in_task], box_rows[picked], [crop_image(images[boxes[k][0]], boxes[k][1].box) for k in picked],
                 box_rows[is_ref[box_image] & (box_names != task.target)])
        )  # fmt: skip
    return cases


def clothing_cases(folder: Path, rows: np.ndarray, refs: int, rotations: int) -> list[Case]:
    """The clothing set's tasks in each rotation; references and test photos from other senders."""
    import csv

    table = list(csv.DictReader((folder / "labels.csv").open()))
    label = np.array([r["label"] for r in table])
    sender = np.array([int(r["sender_id"]) for r in table])
    group = (sender * 2654435761 % 2**32) % rotations  # senders spread evenly over the rotations
    tasks = [(f"{c} among {g}", c, members, "fine-grained") for g, members in CLOTHING_GROUPS.items() for c in members]
    tasks += [(f"{c} among others", c, None, "coarse") for c in CLOTHING_COARSE]
    cases = []
    for rotation in range(rotations):
        rng = np.random.default_rng(rotation)
        is_ref = group == rotation
        for name, target, members, kind in tasks:
            if members is None:
                own = np.flatnonzero(~is_ref & (label == target))
                own = rng.choice(own, min(len(own), CLOTHING_CAP // 3), replace=False)
                others = np.flatnonzero(~is_ref & (label != target))
                job = np.sort(np.concatenate([own, rng.choice(others, 2 * len(own), replace=False)]))
            else:
                job = np.flatnonzero(~is_ref & np.isin(label, members))
                job = np.sort(rng.choice(job, min(len(job), CLOTHING_CAP), replace=False))
            candidates = rng.permutation(np.flatnonzero(is_ref & (label == target)))
            first = list({int(sender[k]): int(k) for k in candidates[::-1]}.values())[::-1]  # one per sender first
            picked = np.array((first + [int(k) for k in candidates if k not in first])[:refs])
            bank = np.flatnonzero(is_ref & (label != target))
            bank = rng.choice(bank, min(500, len(bank)), replace=False)
            positive = label[job] == target
            cases.append(
                Case("clothing", name, kind, rotation, rows[job], positive, int(positive.sum()), np.ones(len(job)),
                     rows[picked], [Image.open(folder / table[k]["path"]).convert("RGB") for k in picked], rows[bank])
            )  # fmt: skip
    return cases


class SimulatedJob:
    """A simulated job in a real SQLite job-state store, answered from the truth: the product's code
    (``imgsift_common.threshold``: questions, the suggestion; the stores' counts) decides."""

    def __init__(self, workdir: Path, case: Case, distances: np.ndarray, held_out: list[float]) -> None:
        from imgsift_common.messages import Job as JobRecord
        from imgsift_common.messages import JobSpec, SourceKind, SourceSpec
        from imgsift_common.sqlstate import SqlStateStore

        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "state.sqlite"
        path.unlink(missing_ok=True)
        self.state = SqlStateStore.sqlite(path)
        self.job = JobRecord(
            id="bench",
            spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="x", threshold=2.0),
            reference_distances=held_out,
        )
        self.state.create_job(self.job)
        self.keys = [f"jobs/bench/crops/{i:024x}-000.jpg" for i in range(len(distances))]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.case = case
        self.record(distances)

    def record(self, distances: np.ndarray) -> None:
        self.state.reset_distances(self.job.id)
        for key, d in zip(self.keys, distances, strict=True):
            self.state.record_distances(self.job.id, [(key, float(d))])
        self.distances = distances

    def forget_answers(self) -> None:
        for key in list(self.state.feedback(self.job.id)):
            self.state.set_feedback(self.job.id, key, None)

    def answered(self) -> dict[int, bool]:
        return {self.index[k]: v for k, v in self.state.feedback(self.job.id).items()}

    def answer(self, crops: list[int]) -> None:
        for i in crops:
            self.state.set_feedback(self.job.id, self.keys[i], bool(self.case.positive[i]))

    def ask(self, k: int) -> list[int]:
        from imgsift_common.threshold import questions

        return [self.index[key] for key, _ in questions(self.job, self.state, k)]

    def suggested(self) -> float:
        from imgsift_common.threshold import for_job

        return for_job(self.state.get_job(self.job.id) or self.job, self.state).suggested

    def close(self) -> None:
        self.state.close()


def f1_of(case: Case, distances: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> float:
    """F1 of accepting ``distances <= threshold`` (over the crops in ``mask``; recall over every true instance)."""
    if mask is None:
        return prf(distances <= threshold, case.positive, case.total)[2]
    left = case.total - int((case.positive & ~mask).sum())
    return prf((distances <= threshold) & mask, case.positive & mask, left)[2]


def best_f1(case: Case, distances: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is None:
        return best_threshold(distances, case.positive, case.total)[1]
    left = case.total - int((case.positive & ~mask).sum())
    return best_threshold(distances[mask], case.positive[mask], left)[1] if mask.any() else 0.0


def ask_and_answer(job: SimulatedJob, ks: list[int]) -> dict[int, tuple[float, dict[int, bool]]]:
    """A user who answers the job's questions, ``ROUND`` at a time: the suggestion after each ``k`` in ``ks``."""
    found = {}
    for k in sorted(ks):
        while len(job.answered()) < min(k, len(job.distances)):
            asked = job.ask(min(ROUND, k - len(job.answered())))
            if not asked:
                break
            job.answer(asked)
        found[k] = (job.suggested(), job.answered())
    return found


def answer_at_random(job: SimulatedJob, k: int, seed: int) -> tuple[float, dict[int, bool]]:
    """A user who answers ``k`` crops picked at random instead (so the choice of questions is measured)."""
    job.forget_answers()
    picked = np.random.default_rng(seed).choice(len(job.distances), min(k, len(job.distances)), replace=False)
    job.answer([int(i) for i in picked])
    return job.suggested(), job.answered()


def retrained(
    case: Case, view_rows: np.ndarray, group: np.ndarray, pretrained: np.ndarray, answers: dict[int, bool], epochs: int
) -> tuple[np.ndarray, list[float], dict[int, float]]:
    """What a fine-tune does with the answers (``imgsift_siamese.training.train_job``'s rule, on the
    bench's feature rows): the head trained on the references, their views, the bank, the far
    crops and the answers; every crop scored again with the crops answered right among the
    references and those answered wrong among the "not this" images. Returns the new distances,
    the held-out positives and each answered crop's held-out distance."""
    from imgsift_siamese.distance import judged_distances
    from imgsift_siamese.train import far_crops, training_set

    order = [str(i) for i in np.argsort(pretrained, kind="stable")]
    far = np.array([int(i) for i in far_crops(order)], dtype=int)
    answered = np.array(sorted(answers), dtype=int)
    right = np.array([answers[i] for i in answered], dtype=bool)
    config = TrainConfig(epochs=epochs)
    data = training_set(
        case.refs, view_rows, group, bank=case.bank, far=case.crops[far] if len(far) else None, not_this=None,
        answers=case.crops[answered] if len(answered) else None, answer_right=right if len(answered) else None,
        config=config,
    )  # fmt: skip
    trained = fit(data, config)
    crops = embed_features(trained.head, case.crops)
    keys = [str(i) for i in range(len(crops))]
    references = np.concatenate([embed_features(trained.head, case.refs), crops[answered[right]]])
    wrong = answered[~right]
    distances = judged_distances(
        crops, references, crops[wrong] if len(wrong) else None, method="nearest", k=3, margin=0.05,
        crop_keys=keys, reference_keys=[None] * len(case.refs) + [keys[i] for i in answered[right]],
        negative_keys=[keys[i] for i in wrong],
    )  # fmt: skip
    held = {int(i): float(d) for i, d in zip(answered, trained.held_out_answers, strict=True) if np.isfinite(d)}
    return distances, trained.held_out, held


def second_signal_threshold(case: Case, d0: np.ndarray, answers: dict[int, bool]) -> float:
    """A study, not the product: the threshold of the highest expected F1 when the calibrated probability
    also reads the detector's confidence, ``p = sigmoid(a + b z(d) + c z(conf))``, fitted on the same
    answers with the product's priors (0 +- 1.5 for ``a``, 0 +- 2.5 for the slopes; Newton's method)."""
    from imgsift_common import answers as ask

    spread = max((np.quantile(d0, 0.9) - np.quantile(d0, 0.1)) / 2.56, 0.01)
    confidence = (case.scores - case.scores.mean()) / max(case.scores.std(), 1e-3)
    x = np.stack([np.ones(len(d0)), (d0 - np.median(d0)) / spread, confidence], axis=1)
    idx = np.array(sorted(answers), dtype=int)
    y = np.array([answers[i] for i in idx], dtype=float)
    prior = np.array([1 / ask.PRIOR_SHARE_SD**2, 1 / ask.PRIOR_SLOPE_SD**2, 1 / ask.PRIOR_SLOPE_SD**2])
    theta = np.zeros(3)
    for _ in range(50):
        q = 1 / (1 + np.exp(-(x[idx] @ theta)))
        gradient = x[idx].T @ (q - y) + prior * theta
        hessian = (x[idx] * (q * (1 - q))[:, None]).T @ x[idx] + np.diag(prior)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    p = 1 / (1 + np.exp(-(x @ theta)))
    p[idx] = y
    order = np.argsort(d0, kind="stable")
    tp, accepted = np.cumsum(p[order]), np.arange(1, len(d0) + 1)
    f1 = 2 * tp / (accepted + p.sum())
    return float(d0[order][int(np.argmax(f1))])


def run_case(
    case: Case,
    network: SiameseNetwork,
    image_size: int,
    ks: list[int],
    seeds: int,
    retrain: bool,
    epochs: int,
    workdir: Path,
) -> dict[str, Any]:
    """Every policy on one case: no answers, the job's questions and random answers at each ``k``,
    and (``retrain``) fine-tuning on none, on the job's questions' answers at each ``k``, and on
    20 random answers."""
    from imgsift_common.messages import SiameseModel, utcnow
    from imgsift_siamese.train import reference_views

    views, group = reference_views(case.ref_images, TrainConfig.augmentations, case.rotation * 100)
    view_rows = pooled_features(network, views, image_size=image_size)
    held_out = held_out_views(None, case.refs, view_rows, group)
    d0 = reference_distance(embed_features(None, case.crops), embed_features(None, case.refs))
    row: dict[str, Any] = {
        "dataset": case.dataset, "task": case.task, "kind": case.kind, "rotation": case.rotation,
        "crops": len(d0), "positives": int(case.positive.sum()), "truth": case.total,
        "accept_all": f1_of(case, d0, 2.0), "best": best_f1(case, d0),
    }  # fmt: skip
    job = SimulatedJob(workdir, case, d0, held_out)
    try:
        row["answers_0"] = f1_of(case, d0, job.suggested())
        row["threshold_0"] = job.suggested()
        asked = ask_and_answer(job, [k for k in ks if k > 0])
        for k, (t, _) in asked.items():
            row[f"asked_{k}"] = f1_of(case, d0, t)
            row[f"threshold_asked_{k}"] = t
        if case.dataset == "coco" and 20 in asked:
            row["asked_20_with_confidence"] = f1_of(case, d0, second_signal_threshold(case, d0, asked[20][1]))
        for k in (k for k in ks if k > 0):
            row[f"random_{k}"] = float(np.mean([f1_of(case, d0, answer_at_random(job, k, s)[0]) for s in range(seeds)]))
        if retrain:
            row["best_where_tuned"] = row["best"]  # the same task rotations as the tuned columns
            tuned = {f"asked_{k}": asked[k][1] for k in ks if k in asked}
            tuned = {"0": {}, **tuned, "random_20": answer_at_random(job, 20, 0)[1]}
            for name, answers in tuned.items():
                distances, positives, held = retrained(case, view_rows, group, d0, answers, epochs)
                job.forget_answers()
                job.record(distances)
                job.answer(sorted(answers))
                model = SiameseModel(
                    version=1,
                    key="jobs/bench/models/siamese-head-v1.pt",
                    trained_at=utcnow(),
                    held_out=positives,
                    held_out_answers={job.keys[i]: d for i, d in held.items()},
                )
                job.state.update_job(job.job.id, model=model)
                unanswered = np.ones(len(distances), dtype=bool)
                unanswered[sorted(answers)] = False
                row[f"tuned_{name}"] = f1_of(case, distances, job.suggested())
                row[f"tuned_{name}_best"] = best_f1(case, distances)
                row[f"tuned_{name}_best_unanswered"] = best_f1(case, distances, unanswered)
                row[f"best_unanswered_{name}"] = best_f1(case, d0, unanswered)
                job.state.update_job(job.job.id, model=None)
    finally:
        job.close()
    return row


def macro(rows: list[dict[str, Any]], key: str, kind: str | None = None) -> tuple[float, int]:
    """Macro F1 over tasks (a task's F1: its mean over the rotations it ran in) and the task count."""
    by_task: dict[str, list[float]] = {}
    for r in rows:
        if (kind is None or r["kind"] == kind) and key in r:
            by_task.setdefault(r["task"], []).append(r[key])
    return (float(np.mean([np.mean(v) for v in by_task.values()])) if by_task else float("nan")), len(by_task)


def report(rows: list[dict[str, Any]], ks: list[int], title: str) -> dict[str, Any]:
    """Print the macro table per kind of task and the goals; return the figures."""
    kinds = [None, *sorted({r["kind"] for r in rows})]
    keys = ["accept_all", "best", "answers_0"] + [f"{p}_{k}" for k in ks if k > 0 for p in ("asked", "random")]
    tuned = [
        "asked_20_with_confidence", "best_where_tuned", "tuned_0", "tuned_0_best", "tuned_asked_10",
        "tuned_asked_10_best", "tuned_asked_20", "tuned_asked_20_best", "tuned_asked_20_best_unanswered",
        "best_unanswered_asked_20", "tuned_asked_40", "tuned_asked_40_best", "tuned_random_20", "tuned_random_20_best",
    ]  # fmt: skip
    keys += [k for k in tuned if any(k in r for r in rows)]
    figures: dict[str, Any] = {}
    print(f"\n{title}: macro F1 (tasks)")
    print("| tasks | " + " | ".join(keys) + " |")
    for kind in kinds:
        cells = {k: macro(rows, k, kind) for k in keys}
        figures[kind or "all"] = {k: v for k, (v, _) in cells.items()}
        n = cells["best"][1]
        crops = sum(r["crops"] for r in rows if kind is None or r["kind"] == kind)
        positives = sum(r["positives"] for r in rows if kind is None or r["kind"] == kind)
        figures[kind or "all"].update(tasks=n, crops=crops, positives=positives)
        print(f"| {kind or 'all'} ({n} tasks, {crops} crops, {positives} positives) | "
              + " | ".join(f"{v:.3f}" for v, _ in cells.values()) + " |")  # fmt: skip
    a = figures["all"]
    goals = {
        "20 answers within 0.03 of the best": (a.get("asked_20", 0) - a["best"], -0.03),
        "0 answers at most 0.02 below accepting all": (a["answers_0"] - a["accept_all"], -0.02),
        "questions beat 20 random answers by 0.03": (a.get("asked_20", 0) - a.get("random_20", 0), 0.03),
    }
    if "tuned_asked_20_best" in a:
        goals["retrained on 20 answers: best F1 above 0 answers"] = (
            a["tuned_asked_20_best"] - a["best_where_tuned"],
            1e-9,
        )
        goals["retrained on 20 answers: threshold within 0.03 of its best"] = (
            a["tuned_asked_20"] - a["tuned_asked_20_best"],
            -0.03,
        )
    for name, (value, bar) in goals.items():
        print(f"  {name}: {value:+.3f} (needs >= {bar:+.3f}) {'met' if value >= bar else 'NOT met'}")
    figures["goals"] = {n: {"value": v, "bar": b, "met": v >= b} for n, (v, b) in goals.items()}
    return figures


def plot_answers(rows: list[dict[str, Any]], cases: dict[tuple[str, int], tuple[Case, np.ndarray]], out: Path,
                 name: str) -> None:  # fmt: skip
    """Precision-recall curves of each task's first rotation, with the threshold of 0 and 20 answers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = {}
    for r in rows:
        firsts.setdefault(r["task"], r)
    cols = 5
    lines = (len(firsts) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(18, 3.2 * lines), squeeze=False)
    for ax, (task, r) in zip(axes.flat, firsts.items(), strict=False):
        case, d0 = cases[(task, r["rotation"])]
        recall, precision = pr_curve(d0, case.positive, case.total)
        ax.plot(recall, precision, color="#64748b", lw=1)
        for key, colour, label in (("threshold_0", "#b3261e", "0 answers"), ("threshold_asked_20", "#2563eb",
                                                                            "20 answers")):  # fmt: skip
            if key in r:
                p, rc, _ = prf(d0 <= r[key], case.positive, case.total)
                ax.plot([rc], [p], "o", color=colour, label=label)
        ax.set_title(f"{task} (best F1 {r['best']:.2f})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[len(firsts) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"pr-answers-{name}.png", dpi=70)
    plt.close(fig)


def embed_all(network: SiameseNetwork, images: list[Image.Image], image_size: int) -> np.ndarray:
    rows = [pooled_features(network, images[i : i + 128], image_size=image_size) for i in range(0, len(images), 128)]
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def cached_cases(
    args: argparse.Namespace, dataset: str, backbone: str, network: SiameseNetwork, size: int, conf: float = 0.25
) -> list[Case]:
    """A dataset's task rotations for ``backbone``, from the trunk features cached in ``args.out/cache``
    (computed once). COCO128 is detected at the lowest of ``args.confs`` and kept at ``conf``."""
    cache = args.out / "cache"
    if dataset == "coco":
        coco = Coco128(args.coco)
        truth = [coco.labels(p) for p in coco.images]
        lowest = min(getattr(args, "confs", [conf]))
        found = _detections(args.weights, coco, lowest)
        path = cache / f"coco-{backbone}-{lowest}.npz"
        if not path.exists():
            crop_rows = embed_all(network, [crop_image(coco.images[c.image], c.box) for c in found], size)
            box_rows = embed_all(network, [crop_image(coco.images[i], t.box) for i, t in true_boxes(truth)], size)
            np.savez(path, crops=crop_rows, boxes=box_rows)
        saved = np.load(path)
        return coco_cases(coco, found, saved["crops"], saved["boxes"], conf, args.refs, args.rotations)
    path = cache / f"clothing-{backbone}.npy"
    if not path.exists():
        import csv

        table = list(csv.DictReader((args.clothing / "labels.csv").open()))
        photos = [Image.open(args.clothing / r["path"]).convert("RGB") for r in table]
        np.save(path, embed_all(network, photos, size))
    return clothing_cases(args.clothing, np.load(path), args.refs, args.clothing_rotations)


_FOUND: dict[tuple[str, float], list[Crop]] = {}


def _detections(weights: str, coco: Coco128, conf: float) -> list[Crop]:
    """COCO128's detections at ``conf``, matched to the true boxes; once per process."""
    if (weights, conf) not in _FOUND:
        truth = [coco.labels(p) for p in coco.images]
        _FOUND[(weights, conf)] = matched_crops(detect_all(weights, coco.images, conf=conf), truth)
    return _FOUND[(weights, conf)]


def answers_study(args: argparse.Namespace) -> None:
    from imgsift_siamese.settings import SiameseSettings

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    cache.mkdir(exist_ok=True)
    ks = sorted({0, *args.answers})
    results: dict[str, Any] = {"answers": ks, "rounds": ROUND, "seeds": args.seeds, "runs": {}}
    for backbone in args.backbones:
        settings = SiameseSettings(storage="local", backbone=backbone)  # type: ignore[arg-type]
        network = SiameseNetwork(build_backbone(backbone, None)).eval()
        size = settings.image_size
        tuned = args.retrain and backbone == args.backbones[0]
        for dataset in args.datasets:
            if dataset == "coco":
                confs = args.confs if backbone == args.backbones[0] else args.confs[:1]
                runs = [
                    (f"coco conf {c}", cached_cases(args, dataset, backbone, network, size, c), c == args.confs[0])
                    for c in confs
                ]
            else:
                runs = [("clothing", cached_cases(args, dataset, backbone, network, size), True)]
            for name, cases, first in runs:
                label = f"{name}, {backbone}"
                rows, by_task = [], {}
                print(f"\n== {label}: {len(cases)} task rotations", flush=True)
                for case in cases[: args.limit]:
                    if len(case.crops) == 0:
                        continue
                    t0 = time.time()
                    retrain = tuned and first and case.rotation < args.retrain_rotations
                    row = run_case(case, network, size, ks, args.seeds, retrain, args.epochs, args.out / "tmp")
                    rows.append(row)
                    by_task[(case.task, case.rotation)] = (
                        case,
                        reference_distance(embed_features(None, case.crops), embed_features(None, case.refs)),
                    )
                    print(f"r{case.rotation} {case.task:26} crops {row['crops']:4} pos {row['positives']:4}  "
                          f"all {row['accept_all']:.2f} best {row['best']:.2f} 0: {row['answers_0']:.2f} "
                          + " ".join(f"{k}: {row.get(f'asked_{k}', 0):.2f}/{row.get(f'random_{k}', 0):.2f}"
                                     for k in ks if k)
                          + (f" tuned 20: {row['tuned_asked_20']:.2f}/{row['tuned_asked_20_best']:.2f}"
                             if "tuned_asked_20" in row else "")
                          + f" ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
                if not rows:
                    continue
                results["runs"][label] = {"summary": report(rows, ks, label), "tasks": rows}
                plot_answers(rows, by_task, args.out, label.replace(", ", "-").replace(" ", "-"))
                (args.out / "answers.json").write_text(json.dumps(results, indent=1))
    print(f"\n{time.time() - started:.0f} s; written to {args.out / 'answers.json'}")


COLUMNS = [  # (key in answers.json, header) of the tables in docs/quality.md
    ("accept_all", "accept all (no verification)"),
    ("best", "best threshold"),
    ("answers_0", "0 answers"),
    ("asked_10", "10 asked"),
    ("random_10", "10 random"),
    ("asked_20", "20 asked"),
    ("random_20", "20 random"),
    ("asked_40", "40 asked"),
    ("random_40", "40 random"),
    ("asked_20_with_confidence", "20 asked, with the detector's score (study)"),
]
TUNED_COLUMNS = [
    ("best_where_tuned", "best threshold, pretrained"),
    ("tuned_0", "0 answers"),
    ("tuned_0_best", "0: best"),
    ("tuned_asked_10", "10 asked"),
    ("tuned_asked_10_best", "10: best"),
    ("tuned_asked_20", "20 asked"),
    ("tuned_asked_20_best", "20: best"),
    ("tuned_random_20", "20 random"),
    ("tuned_random_20_best", "20 random: best"),
    ("tuned_asked_40", "40 asked"),
    ("tuned_asked_40_best", "40: best"),
    ("best_unanswered_asked_20", "unanswered crops, best, pretrained"),
    ("tuned_asked_20_best_unanswered", "unanswered crops, best, tuned on 20"),
]


def markdown(paths: list[Path]) -> None:
    """The tables of docs/quality.md from the answers.json files of runs (``--report``)."""
    for path in paths:
        for label, run in json.loads(path.read_text())["runs"].items():
            rows = run["tasks"]
            for title, columns in (("without fine-tuning", COLUMNS), ("fine-tuned on the answers", TUNED_COLUMNS)):
                present = [(k, h) for k, h in columns if any(k in r for r in rows)]
                if len(present) < 2:
                    continue
                tuned = columns is TUNED_COLUMNS
                print(f"\n**{label}, {title}**" + (" (first rotation)" if tuned else "") + ": macro F1\n")
                print("| tasks | " + " | ".join(h for _, h in present) + " |")
                print("| --- |" + " ---: |" * len(present))
                for kind in (None, *sorted({r["kind"] for r in rows})):
                    sel = [r for r in rows if (kind is None or r["kind"] == kind) and (not tuned or present[0][0] in r)]
                    tasks = len({r["task"] for r in sel})
                    crops, positives = sum(r["crops"] for r in sel), sum(r["positives"] for r in sel)
                    cells = [f"{macro(sel, k)[0]:.3f}" for k, _ in present]
                    print(f"| {kind or 'all'} ({tasks} tasks; {crops} crops, {positives} positives) | "
                          + " | ".join(cells) + " |")  # fmt: skip
            cut = [r for r in rows if r.get("threshold_0", 2.0) < 2.0]  # judged separable by the references alone
            if cut:
                print(f"- with 0 answers the references were judged to separate the crops in {len(cut)} of {len(rows)} "
                      f"task rotations; there, macro F1 {macro(cut, 'answers_0')[0]:.3f} against "
                      f"{macro(cut, 'accept_all')[0]:.3f} for accepting every crop")  # fmt: skip
            else:
                print(f"- with 0 answers the references were judged to separate the crops in none of {len(rows)} "
                      "task rotations: every crop accepted")  # fmt: skip
            for name, goal in run["summary"]["goals"].items():
                verdict = "met" if goal["met"] else "not met"
                print(f"- {name}: {goal['value']:+.3f} (needs {goal['bar']:+.3f}): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--clothing", type=Path, default=ROOT.parent / "shared" / "data" / "clothing")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--refs", type=int, default=5, help="references per task at most")
    parser.add_argument("--rotations", type=int, default=4, help="COCO128 reference/evaluation splits")
    parser.add_argument("--clothing-rotations", type=int, default=2, help="clothing splits by sender (of 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "quality")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--datasets", type=lambda v: v.split(","), default=["coco", "clothing"])
    parser.add_argument("--backbones", type=lambda v: v.split(","), default=["mobilenet_v2"],
                        help="the first is also fine-tuned (--retrain)")  # fmt: skip
    parser.add_argument("--confs", type=lambda v: [float(x) for x in v.split(",")], default=[0.25],
                        help="detector confidence thresholds of the COCO128 jobs")  # fmt: skip
    parser.add_argument("--answers", type=lambda v: [int(x) for x in v.split(",")], default=[10, 20, 40])
    parser.add_argument("--seeds", type=int, default=3, help="draws of the random answers")
    parser.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune on 0, 10, 20, 40 answers asked, 20 random (minutes a task)")  # fmt: skip
    parser.add_argument("--retrain-rotations", type=int, default=1,
                        help="rotations fine-tuned (the first N; training costs some 15 s a time)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="task rotations per run at most (a quick look)")
    parser.add_argument("--report", type=Path, nargs="+", help="print docs/quality.md's tables from answers.json files")
    parser.add_argument("--baselines", action="store_true", help="issue 4's study instead (classifier, whole images)")
    args = parser.parse_args()
    if args.report:
        markdown(args.report)
    elif args.baselines:
        baseline_study(args)
    else:
        answers_study(args)


if __name__ == "__main__":
    main()
