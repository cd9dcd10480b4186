"""Detector stage throughput against the bare model, on the same real images, in one run.

    .venv/bin/python bench/detect_bench.py            # 512 images (COCO128 x 4); --images, --device, --batch

Three measurements over the same stored JPEGs:

1. the stage: ``detect_batch`` (read from the store, decode in a thread pool ahead of the
   model, batched inference, cut and store padded crops, record them), target ``any``;
2. a plain loop: for each image, read, decode, ``model.predict`` on that one image;
3. the bare model: batched forward passes of ultralytics' own preprocessed tensors (decode,
   letterbox and tensor conversion done beforehand, outside the timing).

Goals (issue 8): the stage at least 1.5x the plain loop and 0.8x the bare forward.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from imgsift_common import keys  # noqa: E402
from imgsift_common.messages import (  # noqa: E402
    Candidate,
    DownloadOutcome,
    DownloadRecord,
    Job,
    JobSpec,
    SourceKind,
    SourceSpec,
    StoredImage,
    utcnow,
)
from imgsift_common.state import SqliteStateStore  # noqa: E402
from imgsift_common.storage import LocalStore  # noqa: E402
from imgsift_detector.detect import detect_batch, load_image  # noqa: E402
from imgsift_detector.model import Detector  # noqa: E402
from imgsift_detector.settings import DetectorSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128" / "images")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "detect_bench.json")
    args = parser.parse_args()
    photos = sorted(args.coco.glob("*.jpg"))
    import hashlib

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store, state = LocalStore(tmp / "objects"), SqliteStateStore(tmp / "state.sqlite")
        job = Job(id="bench", spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="any"))
        state.create_job(job)
        image_keys, blobs = [], []
        for i in range(args.images):  # distinct bytes: each copy re-encoded at its own quality
            with Image.open(photos[i % len(photos)]) as im:
                buffer = io.BytesIO()
                im.convert("RGB").save(buffer, "JPEG", quality=95 - (i // len(photos)) % 20)
            data = buffer.getvalue()
            sha = hashlib.sha256(data).hexdigest()
            key = keys.image_key(job.id, sha, "JPEG")
            store.put(key, data)
            candidate = Candidate(image_url=f"http://127.0.0.1/{i}.jpg", source=SourceKind.URLS)
            width, height = Image.open(io.BytesIO(data)).size
            stored = StoredImage(job_id=job.id, key=key, sha256=sha, width=width, height=height, format="JPEG",
                                 bytes=len(data), fetched_at=utcnow(), provenance=candidate)  # fmt: skip
            record = DownloadRecord(url=candidate.image_url, outcome=DownloadOutcome.STORED, sha256=sha, image_key=key)
            state.record_download(job.id, record, stored, args.images)
            image_keys.append(key)
            blobs.append(data)

        detector = Detector(args.weights, args.device)
        settings = DetectorSettings(storage="local", batch_size=args.batch, device=args.device)
        detector.predict([load_image(blobs[0])] * 2)  # warm-up: model fused, threads started

        start = time.perf_counter()
        for i in range(0, len(image_keys), args.batch):
            detect_batch(job, image_keys[i : i + args.batch], store, state, detector, settings)
        stage = time.perf_counter() - start

        start = time.perf_counter()
        for key in image_keys:
            detector.predict([load_image(store.get(key))], batch_size=1)
        loop = time.perf_counter() - start

        import torch

        model = detector._model  # the ultralytics YOLO wrapper
        predictor_images = [load_image(b) for b in blobs]
        from ultralytics.data.augment import LetterBox

        letterbox = LetterBox((640, 640), auto=False)
        import numpy as np

        tensors = []
        for i in range(0, len(predictor_images), args.batch):
            arrays = [letterbox(image=np.asarray(im)[:, :, ::-1]) for im in predictor_images[i : i + args.batch]]
            batch = torch.from_numpy(np.stack(arrays)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255
            tensors.append(batch.to(args.device))
        net = model.model.to(args.device).eval()
        with torch.inference_mode():
            net(tensors[0])
            start = time.perf_counter()
            for batch in tensors:
                net(batch)
            bare = time.perf_counter() - start

    n = args.images
    report = {
        "images": n,
        "batch": args.batch,
        "device": args.device,
        "stage_images_per_second": n / stage,
        "loop_images_per_second": n / loop,
        "bare_forward_images_per_second": n / bare,
        "stage_vs_loop": loop / stage,
        "stage_vs_bare_forward": bare / stage,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{n} images, batch {args.batch}, {args.device}")
    print(f"stage (detect_batch):      {n / stage:7.1f} images/s")
    print(f"plain per-image predict:   {n / loop:7.1f} images/s  -> stage {loop / stage:.2f}x (goal >= 1.5x)")
    print(f"bare batched forward:      {n / bare:7.1f} images/s  -> stage {bare / stage:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
