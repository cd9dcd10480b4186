"""How much better than random answers can any choice of questions be? The answers study's ceiling.

The suggestion after answers comes from one model: a calibrated probability ``p(d)``, logistic
in the crop's distance, and the threshold of the highest expected F1 under it
(:func:`imgsift_common.threshold.decide`). However well a job picks its questions, its
suggestion cannot beat what that model gives when it is fitted on **every** crop's true label.
This script measures, on the quality benchmark's own task rotations, features and reference
picks (``bench/quality_bench.py``; the same cache folder is reused):

- ``best``: the best threshold in hindsight (the benchmark's upper column);
- ``every label``: the model fitted on the labels of every crop of the job, its suggestion's F1
  (the answers are used only to fit ``p``, not counted as known, so the model is what is measured);
- ``20 random``: 20 crops answered at random (mean over 3 draws, as the benchmark), through the
  same rule;
- ``20 asked``: the job's own questions, 5 at a time, as the benchmark's simulated user.

So ``every label - 20 random`` bounds what a better choice of questions could add under this
model, and ``best - every label`` is what the model's shape (and hindsight) leaves::

    .venv/bin/python bench/answers_ceiling.py --backbones efficientnet_lite0,mobilenet_v2,efficientnet_lite2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality_bench as qb  # noqa: E402

from imgsift_common import answers as ask  # noqa: E402
from imgsift_common.calibration import HISTOGRAM_BINS, MAX_DISTANCE, Distribution, grid_for  # noqa: E402
from imgsift_common.threshold import decide  # noqa: E402


def suggestion(held: list[float], crops: Distribution, given: list[ask.Answer]) -> float:
    return decide(held, crops, given, MAX_DISTANCE)[1].threshold


def every_label(crops: Distribution, d: np.ndarray, positive: np.ndarray) -> float:
    """The suggestion of the model fitted on every crop's label (its MAP fit; the labels not counted as known)."""
    labels = [ask.Answer(float(x), bool(y)) for x, y in zip(d, positive, strict=True)]
    fitted = ask.fit(labels, ask.Scale.of(crops), ask.flat_prior())
    return ask.suggest(ask.Fit(fitted.a, fitted.b, fitted.cov, fitted.scale, 0), crops).threshold


def asked(held: list[float], crops: Distribution, d: np.ndarray, positive: np.ndarray, k: int) -> float:
    """A user answering the job's questions ``ROUND`` at a time (the questions' crops: nearest unanswered
    at or above each target, else below, as ``threshold.questions`` picks them from the store)."""
    order = np.argsort(d, kind="stable")
    ordered = d[order]
    answered: dict[int, bool] = {}
    while len(answered) < min(k, len(d)):
        given = [ask.Answer(float(d[i]), v) for i, v in answered.items()]
        fitted, s, *_ = decide(held, crops, given, MAX_DISTANCE)
        picked: list[int] = []
        for target in ask.question_targets(fitted, crops, s.threshold, min(qb.ROUND, k - len(answered))):
            skip = answered.keys() | set(picked)
            at = int(np.searchsorted(ordered, target - 1e-9))
            above = [int(i) for i in order[at:] if int(i) not in skip][:1]
            below = [int(i) for i in order[:at][::-1] if int(i) not in skip][:1]
            if above or below:
                picked.append((above or below)[0])
        if not picked:
            break
        answered.update({i: bool(positive[i]) for i in picked})
    return suggestion(held, crops, [ask.Answer(float(d[i]), v) for i, v in answered.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--clothing", type=Path, default=ROOT.parent / "shared" / "data" / "clothing")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--backbones", type=lambda v: v.split(","), default=["efficientnet_lite0"])
    parser.add_argument("--datasets", type=lambda v: v.split(","), default=["coco", "clothing"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "quality", help="the quality bench's --out")
    parser.add_argument("--refs", type=int, default=5, help="references per task at most (as quality_bench)")
    parser.add_argument("--rotations", type=int, default=4, help="COCO128 splits (as quality_bench)")
    parser.add_argument("--clothing-rotations", type=int, default=2, help="clothing splits (as quality_bench)")
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    from imgsift_siamese.backbone import build_backbone
    from imgsift_siamese.distance import reference_distance
    from imgsift_siamese.network import SiameseNetwork
    from imgsift_siamese.settings import SiameseSettings
    from imgsift_siamese.train import TrainConfig, embed_features, held_out_views, pooled_features, reference_views

    started = time.time()
    (args.out / "cache").mkdir(parents=True, exist_ok=True)
    k = args.answers
    edges = [round(MAX_DISTANCE * i / HISTOGRAM_BINS, 4) for i in range(HISTOGRAM_BINS + 1)]
    print(f"| run | tasks | crops | positives | best | every label | {k} asked | {k} random | "
          f"every label - {k} random | best - every label |")  # fmt: skip
    print("| --- |" + " ---: |" * 9)
    for backbone in args.backbones:
        network = SiameseNetwork(build_backbone(backbone, None)).eval()
        size = SiameseSettings(storage="local", backbone=backbone).image_size  # type: ignore[arg-type]
        for dataset in args.datasets:
            cases = qb.cached_cases(args, dataset, backbone, network, size, conf=0.25)
            rows = []
            for case in cases:
                if len(case.crops) == 0:
                    continue
                views, group = reference_views(case.ref_images, TrainConfig.augmentations, case.rotation * 100)
                view_rows = pooled_features(network, views, image_size=size)
                held = [float(x) for x in held_out_views(None, case.refs, view_rows, group)]
                d = reference_distance(embed_features(None, case.crops), embed_features(None, case.refs))
                crops = Distribution.from_values([float(x) for x in d], grid_for(held, MAX_DISTANCE, *edges))
                rng_f1 = []
                for s in range(args.seeds):
                    picked = np.random.default_rng(s).choice(len(d), min(k, len(d)), replace=False)
                    given = [ask.Answer(float(d[i]), bool(case.positive[i])) for i in picked]
                    rng_f1.append(qb.f1_of(case, d, suggestion(held, crops, given)))
                rows.append({
                    "task": case.task, "kind": case.kind, "crops": len(d), "positives": int(case.positive.sum()),
                    "best": qb.best_f1(case, d), "every": qb.f1_of(case, d, every_label(crops, d, case.positive)),
                    "asked": qb.f1_of(case, d, asked(held, crops, d, case.positive, k)),
                    "random": float(np.mean(rng_f1)),
                })  # fmt: skip
            m = {key: qb.macro(rows, key)[0] for key in ("best", "every", "asked", "random")}
            print(f"| {dataset}, {backbone} | {qb.macro(rows, 'best')[1]} | {sum(r['crops'] for r in rows)} | "
                  f"{sum(r['positives'] for r in rows)} | {m['best']:.3f} | {m['every']:.3f} | {m['asked']:.3f} | "
                  f"{m['random']:.3f} | {m['every'] - m['random']:+.3f} | {m['best'] - m['every']:+.3f} |",
                  flush=True)  # fmt: skip
    print(f"\n{time.time() - started:.0f} s (macro F1 over tasks; a task's F1 is its mean over its rotations)")


if __name__ == "__main__":
    main()
