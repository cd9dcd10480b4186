"""Detector stage throughput against per-image predict loops and the bare model, on the same real images.

    .venv/bin/python bench/detect_bench.py                    # 512 images (COCO128 x 4), every installed backend
    .venv/bin/python bench/detect_bench.py --export openvino  # one backend: none (the .pt weights), onnx, openvino

For each backend (the .pt weights on torch, and each export the detector can run: OpenVINO,
ONNX Runtime), over the same stored JPEGs:

1. the stage: ``detect_batch`` (read from the store, decode in a thread pool ahead of the
   model, batches of images that letterbox to the same rectangle, cut and store padded crops,
   record them), target ``any``, one call per message of ``--batch`` image keys;
2. plain loops, as a user would write them: for each image, read, decode, ``model.predict``
   on that one image, with a plain ``YOLO(...)`` of the .pt weights and of the same export;
3. the bare model: the backend's batched forward (ultralytics' ``AutoBackend``) on tensors
   decoded, letterboxed and converted beforehand, outside the timing, batched as the stage
   batches them (same rectangles), and as 640 x 640 squares.

Goals (issue 8): the stage at least 1.5x the plain loop and 0.8x the bare forward. The JSON
report (``--out``) holds every figure and ratio, the load average, and torch's thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
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
    Job,
    JobSpec,
    SourceKind,
    SourceSpec,
)
from imgsift_common.sqlstate import SqlStateStore  # noqa: E402
from imgsift_common.storage import LocalStore  # noqa: E402
from imgsift_detector.detect import detect_batch, load_image  # noqa: E402
from imgsift_detector.export import missing_modules  # noqa: E402
from imgsift_detector.model import Detector, _precision_args, shape_batches  # noqa: E402
from imgsift_detector.settings import DetectorSettings, ExportFormat  # noqa: E402
from tests.support.records import record_stored  # noqa: E402

IMGSZ = 640


def jpegs(photos: list[Path], count: int) -> list[bytes]:
    """``count`` distinct JPEGs: each copy of a photo re-encoded at its own quality."""
    blobs = []
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            buffer = io.BytesIO()
            im.convert("RGB").save(buffer, "JPEG", quality=95 - (i // len(photos)) % 20)
        blobs.append(buffer.getvalue())
    return blobs


def store_images(tmp: Path, blobs: list[bytes]) -> tuple[Job, LocalStore, SqlStateStore, list[str]]:
    """A new job in a new store and state, with ``blobs`` stored and recorded as the crawler would."""
    tmp.mkdir(parents=True)
    store, state = LocalStore(tmp / "objects"), SqlStateStore.sqlite(tmp / "state.sqlite")
    job = Job(id="bench", spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="any"))
    state.create_job(job)
    image_keys = []
    for i, data in enumerate(blobs):
        sha = hashlib.sha256(data).hexdigest()
        key = keys.image_key(job.id, sha, "JPEG")
        store.put(key, data)
        candidate = Candidate(image_url=f"http://127.0.0.1/{i}.jpg", source=SourceKind.URLS)
        width, height = Image.open(io.BytesIO(data)).size
        record_stored(state, job.id, sha, size=(width, height), nbytes=len(data), candidate=candidate,
                      max_images=len(blobs))  # fmt: skip
        image_keys.append(key)
    return job, store, state, image_keys


class Clock:
    """Wall seconds and this process's CPU seconds (every thread's) of a ``with`` block."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def plain_loop(model_path: str, store: LocalStore, image_keys: list[str], device: str, half: bool = False) -> Clock:
    """Per image: read, decode, ``YOLO(model_path).predict`` on it alone (after one warm-up)."""
    from ultralytics import YOLO

    model = YOLO(model_path, task="detect")
    precision = _precision_args(half)
    model.predict(load_image(store.get(image_keys[0])), device=device, verbose=False, **precision)
    with Clock() as clock:
        for key in image_keys:
            model.predict(load_image(store.get(key)), device=device, verbose=False, **precision)
    return clock


def tensors(images: list[Image.Image], message: int, square: bool, device: str, half: bool = False) -> list:  # type: ignore[type-arg]
    """The images as ultralytics' preprocessed BCHW float batches: per message of ``message`` images, grouped
    by letterboxed rectangle as the stage groups them, or letterboxed to squares in plain chunks."""
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox((IMGSZ, IMGSZ), auto=not square, stride=32)
    batches = []
    for first in range(0, len(images), message):
        chunk = images[first : first + message]
        groups = [list(range(len(chunk)))] if square else shape_batches([im.size for im in chunk], IMGSZ, message)
        for group in groups:
            arrays = [letterbox(image=np.asarray(chunk[i])[:, :, ::-1]) for i in group]
            batch = torch.from_numpy(np.stack(arrays)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255
            batches.append(batch.to(device).half() if half else batch.to(device))
    return batches


def bare_forward(detector: Detector, batches: list) -> Clock:  # type: ignore[type-arg]
    """The backend's forward pass over every batch (after one warm-up pass)."""
    import torch

    backend = detector._model.predictor.model  # ultralytics' AutoBackend: torch, OpenVINO or ONNX Runtime
    with torch.inference_mode():
        backend(batches[0])
        with Clock() as clock:
            for batch in batches:
                backend(batch)
    return clock


def bench_backend(
    fmt: ExportFormat, args: argparse.Namespace, tmp: Path, blobs: list[bytes], pt_loop: Clock
) -> dict[str, object]:
    import torch

    n = len(blobs)
    job, store, state, image_keys = store_images(tmp / fmt.value, blobs)  # a job whose images are all to detect
    with Clock() as load:
        detector = Detector(
            args.weights, args.device, half=args.half, export=fmt, export_dir=args.export_dir, imgsz=IMGSZ
        )
    settings = DetectorSettings(
        storage="local",
        batch_size=args.batch,
        device=args.device,
        half=args.half,
        export=fmt,
        export_dir=args.export_dir,
    )
    with Clock() as stage:
        for i in range(0, n, args.batch):
            detect_batch(job, image_keys[i : i + args.batch], store, state, detector, settings)
    loop = pt_loop if fmt is ExportFormat.NONE else plain_loop(detector.model_path, store, image_keys, args.device)
    # fp16 only where the .pt weights run on a GPU; an export runs on the CPU in its own precision
    images = [load_image(data) for data in blobs]
    bare = {}
    for square in (False, True):
        batches = tensors(images, args.batch, square, args.device, args.half and fmt is ExportFormat.NONE)
        bare[square] = bare_forward(detector, batches)
        del batches
    runs = {"stage": stage, "pt_loop": pt_loop, "same_model_loop": loop, "bare_forward": bare[False]}
    runs["bare_forward_square"] = bare[True]
    return {
        "backend": fmt.value,
        "model": Path(detector.model_path).name,
        "load_seconds": round(load.wall, 1),  # the export included, where it was not cached yet
        "torch_threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),  # other processes on the machine, over the last 1, 5, 15 minutes
        **{f"{name}_images_per_second": n / clock.wall for name, clock in runs.items()},
        **{f"{name}_images_per_cpu_second": n / clock.cpu for name, clock in runs.items()},
        **{f"stage_vs_{name}": clock.wall / stage.wall for name, clock in runs.items() if name != "stage"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128" / "images")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "models" / "yolov8n.pt"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="images per message and per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half", action="store_true", help="fp16 on a GPU (the stage, the loop and the bare forward)")
    parser.add_argument(
        "--export",
        choices=["all", *(f.value for f in ExportFormat)],
        default="all",
        help="backend to measure; all: the .pt weights and every export whose runtime is installed",
    )
    parser.add_argument("--export-dir", type=Path, default=ROOT / "bench-out" / "detector-exports")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "detect_bench.json")
    args = parser.parse_args()
    if args.half and args.device == "cpu":
        parser.error("--half runs the model in fp16 on a GPU: give --device cuda as well")
    if args.export == "all":
        formats = [ExportFormat.NONE]
        if args.device == "cpu":
            formats += [f for f in (ExportFormat.OPENVINO, ExportFormat.ONNX) if not missing_modules(f)]
    else:
        formats = [ExportFormat(args.export)]
    photos = sorted(args.coco.glob("*.jpg"))
    n = args.images
    load_before = os.getloadavg()

    blobs = jpegs(photos, n)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _, store, _, image_keys = store_images(tmp / "loop", blobs)
        pt_loop = plain_loop(args.weights, store, image_keys, args.device, args.half)
        results = [bench_backend(fmt, args, tmp, blobs, pt_loop) for fmt in formats]

    report = {
        "images": n,
        "batch": args.batch,
        "device": args.device,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "backends": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{n} images, batch {args.batch}, {args.device}, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    labels = {
        "stage": "stage (detect_batch)",
        "pt_loop": "plain per-image predict, .pt",
        "same_model_loop": "plain per-image predict, same model",
        "bare_forward": "bare forward, the stage's shapes",
        "bare_forward_square": "bare forward, 640 x 640 squares",
    }
    goals = {"pt_loop": "  (goal >= 1.5x)", "same_model_loop": "  (goal >= 1.5x)", "bare_forward": "  (goal >= 0.8x)"}
    for r in results:
        print(f"[{r['backend']}] {r['model']}: images/s, images per CPU-second, the stage's speed against it")
        for name, label in labels.items():
            ratio = "" if name == "stage" else f"{r[f'stage_vs_{name}']:6.2f}x{goals.get(name, '')}"
            print(
                f"  {label:38s}{r[f'{name}_images_per_second']:7.1f}{r[f'{name}_images_per_cpu_second']:7.1f}  {ratio}"
            )


if __name__ == "__main__":
    main()
