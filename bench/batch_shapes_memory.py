"""Resident memory of the Siamese trunk on the CPU when batches come in every size.

    .venv/bin/python bench/batch_shapes_memory.py      # batch sizes 1..64, twice; about 3 minutes

A Siamese worker's batches have every size from 1 to a message's 64 crops. On the CPU each new
batch size the MobileNetV2 trunk sees costs memory the process keeps. Two child processes, one
after the other, run the same inputs (random 224x224 tensors, every size from 1 to ``--max``,
``--rounds`` times):

- baseline: one forward pass per batch, as it comes (what imgsift did before);
- imgsift: ``Embedder.features_of_arrays`` with ``batch_size`` 32, which cuts a batch into
  32s and powers of two below (``forward_sizes``), so the trunk sees at most 6 sizes.

Prints each one's resident set after a warm-up pass of 32 and at the end, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import psutil


def child(mode: str, largest: int, rounds: int) -> None:
    import torch

    from imgsift_siamese.embed import get_embedder
    from imgsift_siamese.settings import SiameseSettings

    embedder = get_embedder(SiameseSettings(storage="local", batch_size=32))
    process = psutil.Process()
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        embedder.features_of_arrays(rng.random((32, 3, 224, 224), dtype=np.float32))
        start, began = process.memory_info().rss, time.perf_counter()
        for _ in range(rounds):
            for n in range(1, largest + 1):
                arrays = rng.random((n, 3, 224, 224), dtype=np.float32)
                if mode == "baseline":
                    embedder.network.features(torch.from_numpy(arrays))
                else:
                    embedder.features_of_arrays(arrays)
    seconds = time.perf_counter() - began
    print(json.dumps({"start_mb": start / 2**20, "end_mb": process.memory_info().rss / 2**20, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=64, help="largest batch size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("baseline", "imgsift"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.max, args.rounds)
        return
    results = {}
    for mode in ("baseline", "imgsift"):
        command = [sys.executable, __file__, "--child", mode, "--max", str(args.max), "--rounds", str(args.rounds)]
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
