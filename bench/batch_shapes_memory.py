"""Resident memory of a model on the CPU when batches come in every size.

    .venv/bin/python bench/batch_shapes_memory.py                   # Siamese trunk, sizes 1..64 twice; ~3 min
    .venv/bin/python bench/batch_shapes_memory.py --stage detector  # YOLOv8n, sizes 1..16 twice; ~1 min

A Siamese worker's batches have every size from 1 to a message's 64 crops. On the CPU each new
batch size the MobileNetV2 trunk sees costs memory the process keeps. Two child processes, one
after the other, run the same inputs (random 224x224 images, every size from 1 to ``--max``,
``--rounds`` times):

- baseline: one forward pass per batch, as it comes (what imgsift did before);
- imgsift: ``Embedder.features_of_pixels`` with ``batch_size`` 32, which cuts a batch into
  32s and powers of two below (``forward_sizes``), so the trunk sees at most 6 sizes.

With ``--stage detector`` the same for YOLOv8n (``--weights``) on 640x480 images, sizes 1 to
16 (``--max``): the baseline is ``Detector.predict`` with the batch size set to each batch's
size (one pass per batch, as it comes), imgsift the detector's default of 16
(``shape_batches``: 16s and powers of two below).

Prints each one's resident set after a warm-up pass and at the end, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, stage: str, largest: int, rounds: int, weights: str) -> None:
    import torch

    process = psutil.Process()
    rng = np.random.default_rng(0)
    if stage == "detector":
        from PIL import Image

        from imgsift_detector.model import Detector

        detector = Detector(weights)
        images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(largest)]

        def run(n: int) -> None:
            detector.predict(images[:n], batch_size=n if mode == "baseline" else 16)

        warm = 16
    else:
        from imgsift_siamese.embed import get_embedder
        from imgsift_siamese.preprocess import normalise
        from imgsift_siamese.settings import SiameseSettings

        embedder = get_embedder(SiameseSettings(storage="local", batch_size=32))

        def run(n: int) -> None:
            pixels = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
            if mode == "baseline":
                embedder.network.features(normalise(torch.from_numpy(pixels)))
            else:
                embedder.features_of_pixels(pixels)

        warm = 32
    with torch.inference_mode():
        run(min(warm, largest))
        start, began = process.memory_info().rss, time.perf_counter()
        for _ in range(rounds):
            for n in range(1, largest + 1):
                run(n)
    seconds = time.perf_counter() - began
    print(json.dumps({"start_mb": start / 2**20, "end_mb": process.memory_info().rss / 2**20, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("siamese", "detector"), default="siamese")
    parser.add_argument("--max", type=int, help="largest batch size (default: 64 for siamese, 16 for detector)")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("baseline", "imgsift"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max = args.max or (64 if args.stage == "siamese" else 16)
    if args.child:
        child(args.child, args.stage, args.max, args.rounds, args.weights)
        return
    results = {}
    for mode in ("baseline", "imgsift"):
        command = [sys.executable, __file__, "--child", mode, "--stage", args.stage, "--max", str(args.max),
                   "--rounds", str(args.rounds), "--weights", args.weights]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:9} resident {r['start_mb']:6.0f} MB after warm-up, {r['end_mb']:6.0f} MB after "
            f"{args.rounds} x sizes 1..{args.max} ({r['seconds']:.0f} s)",
            flush=True,
        )
    base, ours = results["baseline"], results["imgsift"]
    print(
        f"imgsift / baseline: final resident set {ours['end_mb'] / base['end_mb']:.2f}x, "
        f"growth {(ours['end_mb'] - ours['start_mb']) / max(1.0, base['end_mb'] - base['start_mb']):.2f}x, "
        f"time {ours['seconds'] / base['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
