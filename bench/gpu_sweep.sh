#!/usr/bin/env bash
# The GPU figures issue 8 asks for, in one run on a machine with CUDA (the `device` tool's):
# the detector and Siamese benchmarks at batch sizes 1 to 64, each in fp32 and fp16
# (IMGSIFT_DETECTOR_HALF, and IMGSIFT_SIAMESE_HALF: the trunk in fp16, issue 18), then the fp16
# test against fp32 on real crops (tests/siamese/test_export.py, which skips without CUDA).
#
#     bench/gpu_sweep.sh [OUT_DIR]       # default bench-out/gpu; JSON per run, log on stdout
#
# SWEEP_CROPS (default 640) sets the Siamese runs' crops; PYTHON the interpreter (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/gpu}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
crops="${SWEEP_CROPS:-640}"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this sweep is for a GPU machine'"
for batch in 1 4 16 64; do
  "$python" bench/detect_bench.py --device cuda --export none --batch "$batch" --out "$out/detect-b$batch-fp32.json"
  "$python" bench/detect_bench.py --device cuda --export none --batch "$batch" --half --out "$out/detect-b$batch-fp16.json"
  "$python" bench/embed_bench.py --device cuda --batch "$batch" --crops "$crops" --out "$out/embed-b$batch-fp32.json"
  "$python" bench/embed_bench.py --device cuda --batch "$batch" --crops "$crops" --half --out "$out/embed-b$batch-fp16.json"
done
"$python" -m pytest -q -p no:cacheprovider tests/siamese/test_export.py -k "half" -rs
