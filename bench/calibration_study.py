"""Why the suggested threshold falls short: a study of the distances bench/quality_bench.py saved.

    .venv/bin/python bench/calibration_study.py [bench-out/quality/distances.json]

Prints, per embedding (pretrained, fine-tuned), the median held-out positive distance (what
calibration sees) against the median distance of true positive and negative crops, and the
macro F1 at the suggested threshold of two calibrations: the one imgsift uses
(``imgsift_common.calibration``) and a two-Gaussian mixture fitted to the job's distances with
the held-out positives as anchors (semi-supervised EM), against the best threshold. For the
pretrained embedding also the calibration from the clean references' leave-one-out distances
(what imgsift used before the augmented views). And where the loss comes from: imgsift's
estimate told the true share of positives among the crops, the true positives' distances, or
both (labels no job has).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean, pstdev

import numpy as np

from imgsift_common.calibration import calibrate

ROOT = Path(__file__).resolve().parents[1]


def _pdf(x: float, mu: float, sd: float) -> float:
    return math.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def mixture_threshold(p: list[float], d: list[float], iters: int = 200, floor: float = 0.01) -> float | None:
    """Semi-supervised two-Gaussian EM on the crop distances; the estimated-F1 maximum."""
    if len(p) < 2 or len(d) < 10:
        return None
    mu_p, sd_p = fmean(p), max(pstdev(p), floor)
    upper = sorted(d)[len(d) // 2 :]
    mu_n, sd_n = max(fmean(upper), mu_p + 2 * sd_p), max(pstdev(upper), floor)
    pi = 0.5
    for _ in range(iters):
        r = []
        for x in d:
            a, b = pi * _pdf(x, mu_p, sd_p), (1 - pi) * _pdf(x, mu_n, sd_n)
            r.append(a / (a + b) if a + b > 0 else float(abs(x - mu_p) < abs(x - mu_n)))
        sr = sum(r)
        pi = min(0.99, max(0.01, sr / len(d)))
        wp, wn = sr + len(p), len(d) - sr
        if wn <= 1e-9:
            return None
        mu_p = (sum(ri * x for ri, x in zip(r, d, strict=True)) + sum(p)) / wp
        var_p = sum(ri * (x - mu_p) ** 2 for ri, x in zip(r, d, strict=True)) + sum((x - mu_p) ** 2 for x in p)
        sd_p = max(math.sqrt(var_p / wp), floor)
        mu_n = sum((1 - ri) * x for ri, x in zip(r, d, strict=True)) / wn
        sd_n = max(math.sqrt(sum((1 - ri) * (x - mu_n) ** 2 for ri, x in zip(r, d, strict=True)) / wn), floor)
    if mu_p >= mu_n:
        return None
    best, best_t = -1.0, None
    for i in range(401):
        t = 2 * i / 400
        recall, false = _phi((t - mu_p) / sd_p), _phi((t - mu_n) / sd_n)
        below = pi * recall + (1 - pi) * false
        precision = pi * recall / below if below > 0 else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        if f1 > best:
            best, best_t = f1, t
    return best_t


def _f1(scores: np.ndarray, positive: np.ndarray, total: int, t: float | None) -> float:
    if t is None:
        return 0.0
    accepted = scores <= t
    tp, fp = int((accepted & positive).sum()), int((accepted & ~positive).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / total if total else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench-out" / "quality" / "distances.json"
    raw = json.loads(path.read_text())
    medians: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    per_task: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    loo_medians: list[float] = []  # per task rotation, as the medians above
    for row in raw:
        positive = np.array(row["positive"], dtype=bool)
        for key, held in (("pretrained", row["pretrained_held_out"]), ("finetuned", row["held_out"])):
            scores = np.array(row[key])
            if len(scores) == 0:
                continue
            if positive.sum() >= 2 and len(held) >= 2 and (~positive).any():
                if key == "pretrained" and row.get("loo"):
                    loo_medians.append(float(np.median(row["loo"])))
                medians[key].append(
                    (float(np.median(held)), float(np.median(scores[positive])), float(np.median(scores[~positive])))
                )
            ours = calibrate(held, scores.tolist()).suggested
            em = mixture_threshold(held, scores.tolist())
            task = per_task[(row["task"], row["kind"])]
            task[f"{key} imgsift"].append(_f1(scores, positive, row["truth"], ours))
            task[f"{key} mixture"].append(_f1(scores, positive, row["truth"], em if em is not None else ours))
            if key == "pretrained" and row.get("loo"):
                loo = calibrate(row["loo"], scores.tolist()).suggested
                task[f"{key} clean-reference positives"].append(_f1(scores, positive, row["truth"], loo))
            # Where the loss comes from: the same estimate told the true share of positives among
            # the crops, or the true positives' distances, or both (labels no job has).
            share = max(float(positive.mean()), 1 / len(scores))
            true_pos = scores[positive].tolist() or held
            for name, p_used, pi in (("true share", held, share), ("true positives", true_pos, None),
                                     ("true both", true_pos, share)):  # fmt: skip
                # Told the share, the estimate is used however few the crops (no 90th-percentile fallback).
                t = calibrate(p_used, scores.tolist(), min_crops=0 if pi else 20, share=pi).suggested
                task[f"{key} oracle {name}"].append(_f1(scores, positive, row["truth"], t))
            best = max([_f1(scores, positive, row["truth"], t) for t in np.unique(scores)] + [0.0])
            task[f"{key} best"].append(best)
    for key, rows in medians.items():
        held, pos, neg = np.median(np.array(rows), axis=0)
        print(f"{key:10} median held-out positive {held:.3f}, true positive crops {pos:.3f}, negatives {neg:.3f}")
    if loo_medians:
        print(f"pretrained median of the clean references' leave-one-out distances {np.median(loo_medians):.3f}")
    for kind in ("direct", "fine-grained", None):
        chosen = [v for (_, k), v in per_task.items() if kind is None or k == kind]
        names = sorted(chosen[0])
        macro = {n: float(np.mean([np.mean(v[n]) for v in chosen])) for n in names}
        print(f"{kind or 'all':13} ({len(chosen)} tasks) " + ", ".join(f"{n} {v:.3f}" for n, v in macro.items()))


if __name__ == "__main__":
    main()
