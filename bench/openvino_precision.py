"""An OpenVINO model compiled for the CPU at fp32 and at bf16: crops per second, and how far the outputs move.

    .venv/bin/python bench/openvino_precision.py bench-out/siamese-exports/<trunk dir>/trunk.xml

The Siamese worker compiles its exported trunk with ``INFERENCE_PRECISION_HINT=f32``
(``imgsift_siamese.export.OpenVinoTrunk``), so its features stay within the 1e-4 row bound of
torch's. On a CPU with native bf16 (AVX512_BF16 or AMX) OpenVINO would otherwise run bf16; this
prints what that choice costs and gives on this machine: the CPU's capabilities, each
precision's throughput on a batch of 16 (uint8 224 x 224 inputs, the trunk's input; 8 seconds
each), and the largest difference between the fp32 and bf16 rows (random pixels, so the figure
says how far rows move, not how decisions on real crops move).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import openvino as ov


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an OpenVINO IR (.xml), e.g. the Siamese trunk export")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    core = ov.Core()
    print("CPU:", core.get_property("CPU", "FULL_DEVICE_NAME"))
    print("capabilities:", ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    batch = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    rows: dict[str, np.ndarray] = {}
    for hint in ("f32", "bf16"):
        compiled = core.compile_model(args.model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        compiled(batch)  # warm-up
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            rows[hint] = np.asarray(compiled(batch)[0], dtype=np.float32)
            n += len(batch)
        print(f"{hint:5s} {n / (time.perf_counter() - start):7.1f} crops/s")
    a, b = rows["f32"], rows["bf16"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    largest = np.abs(a - b).max()
    print(f"bf16 against f32: largest difference {largest:.4f} ({largest / np.abs(a).max():.1%} of the largest "
          f"value), lowest cosine similarity of a row {cosine.min():.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
