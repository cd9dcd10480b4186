#!/usr/bin/env bash
# Install imgsift, serve a small demo web of real photos on 127.0.0.1, and run
# `imgsift collect` on it: target "animal" (a COCO supercategory), elephant references.
# Then the loop a user runs: the job asks about the crops that settle its threshold, the
# answers (taken here from COCO128's labels) move it; every step is scored against the labels.
# Last, a threshold given by hand re-decides the job instantly from its stored distances.
#
# Offline, it uses the COCO128 photos and YOLOv8n weights in ../shared when they are there.
# Elsewhere: COCO128 is fetched from the ultralytics release assets and YOLOv8n is downloaded
# by ultralytics itself (both need the internet); or point IMGSIFT_DEMO_COCO and
# IMGSIFT_DEMO_YOLO at local copies.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh

COCO=${IMGSIFT_DEMO_COCO:-../shared/data/coco128}
YOLO=${IMGSIFT_DEMO_YOLO:-../shared/models/yolov8n.pt}
PORT=${IMGSIFT_DEMO_PORT:-8765}
WORK=demo
mkdir -p "$WORK"
if [ ! -d "$COCO/images" ]; then
  echo "fetching COCO128 (6.7 MB) from the ultralytics release assets..."
  curl -fsSL -o "$WORK/coco128.zip" https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip
  (cd "$WORK" && unzip -q -o coco128.zip)
  COCO="$WORK/coco128"
fi
[ -f "$YOLO" ] || YOLO=yolov8n.pt  # a name: ultralytics downloads it

# References: the 8 elephants of two photos; the web serves the other 126 photos, among them
# 9 elephants and 80-odd other animals (giraffes, zebras, dogs, cats, birds...).
.venv/bin/python scripts/demo_site.py serve --coco "$COCO" --workdir "$WORK" --port "$PORT" \
  --ref-class elephant --ref-photos 000000000263,000000000312 > "$WORK/site.json" &
SITE=$!
trap 'kill $SITE 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -s "$WORK/site.json" ] && break; sleep 0.2; done
cat "$WORK/site.json"

collect() {
  # The demo web is on 127.0.0.1, which the crawler refuses unless it is allowlisted.
  IMGSIFT_CRAWLER_NETWORK_ALLOWLIST='["127.0.0.1/32"]' .venv/bin/imgsift collect \
    --source "urls:$WORK/urls.txt" --source "site:http://127.0.0.1:$PORT/" \
    --target animal --refs "$WORK/refs" --out demo-out --yolo-weights "$YOLO" --quiet "$@"
}
score() {
  .venv/bin/python scripts/demo_site.py score --coco "$COCO" --manifest demo-out/manifest.jsonl --ref-class elephant
}
rm -rf demo-out
echo "== collect, no threshold given: the label-free suggestion"
collect
score
for round in 1 2; do
  echo "== round $round: the job's 10 questions, answered from COCO128's labels as a user would"
  .venv/bin/imgsift questions --out demo-out -n 10 > "$WORK/questions-$round.txt"
  .venv/bin/python scripts/demo_site.py answer --coco "$COCO" --manifest demo-out/manifest.jsonl \
    --ref-class elephant < "$WORK/questions-$round.txt" > "$WORK/answers-$round.csv"
  cat "$WORK/answers-$round.csv"
  .venv/bin/imgsift answer --out demo-out --answers "$WORK/answers-$round.csv" --quiet
  score
done
echo "== the same job re-decided at a looser threshold, 1.15, given by hand (no download, no model: stored distances only)"
collect --threshold 1.15
score
echo "crops: demo-out/accepted/ and demo-out/rejected/, one JSON line per crop in demo-out/manifest.jsonl"
