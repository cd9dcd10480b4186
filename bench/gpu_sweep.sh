#!/usr/bin/env bash
# The GPU figures issue 8 asks for, in one run on a machine with CUDA (the `device` tool's):
# the detector and Siamese benchmarks at batch sizes 1 to 64, the detector in fp32 and fp16.
#
#     bench/gpu_sweep.sh [OUT_DIR]       # default bench-out/gpu; JSON per run, log on stdout
#
# The Siamese stage has no fp16 mode yet, so its sweep is fp32 only.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/gpu}"
mkdir -p "$out"
python=".venv/bin/python"
for batch in 1 4 16 64; do
  "$python" bench/detect_bench.py --device cuda --export none --batch "$batch" --out "$out/detect-b$batch-fp32.json"
  "$python" bench/detect_bench.py --device cuda --export none --batch "$batch" --half --out "$out/detect-b$batch-fp16.json"
  "$python" bench/embed_bench.py --device cuda --batch "$batch" --out "$out/embed-b$batch-fp32.json"
done
