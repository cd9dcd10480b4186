"""Siamese stage throughput against the bare backbone forward, on the same real crops, in one run.

    .venv/bin/python bench/embed_bench.py          # 640 COCO128 box crops; --crops, --rounds, --device

The crops are COCO128's labelled boxes, padded and JPEG-encoded as the detector stores them,
in a local object store; the job state is in the services' store, on a PostgreSQL and a
redis-server of the bench's own. Measured:

1. the stage: ``compare_batch`` over every crop of a fresh job, in batches of the default
   batch size (read from the store, decode and letterbox in the thread pool ahead of the
   model, trunk, head, distances to 5 references, store the trunk features, record);
2. the same stage with one decode thread (no pool), to show what the pool brings;
3. the bare forward: the trunk as the stage runs it (fp16 with ``--half``) and the head,
   batched (same batch size), over the same crops decoded and letterboxed beforehand, outside
   the timing;
4. ``rescore`` after a trained head: from the stored trunk features, against the trunk over
   every crop again (the stored crop features deleted first, as before they were kept).

1-3 run batch by batch, one after the other in a rotating order (each stage on a fresh job
per round), so load from other processes falls on all three alike; a ratio is the sum of one
run's batch times over the other's, the median over the rounds.
Goal (issue 8): the stage at least 0.85x the bare forward.

    .venv/bin/python bench/embed_bench.py --backbones mobilenet_v2,efficientnet_lite0,efficientnet_lite2

compares backbones instead: each in a fresh process (so its memory is its own), the stage
(``compare_batch``) over the same crops, the processes in turn for ``--rounds`` rounds, so load
falls on all alike. Reported per backbone: crops per second and the process's peak resident
memory, both also as ratios to the first backbone's in the same run (medians over the rounds).

    .venv/bin/python bench/embed_bench.py --exports openvino,onnx   # issue 18: the trunk exported

compares the trunk's runtimes on the default backbone (or ``--backbone``), in one run on the same
crops, batch by batch in a rotating order: the stage (``compare_batch``) with the torch trunk and
with each export (``IMGSIFT_SIAMESE_EXPORT``), and the bare forward of each (trunk and head over
inputs decoded and letterboxed beforehand: the uint8 pixels the stage hands its runner, which
normalises them in its own graph, the bare forward's runner too). Goals (issue 18): the exported
stage at least 2.5x the torch stage, and at least 0.85x its own bare exported forward (all
batches; also printed without each run's first batch, where a fresh job embeds its references
and their augmented views). Then the stage's parts are timed one after the other on a fresh job
of the same crops with each export and torch (issue 18 item 5): object-store read, JPEG decode,
letterbox (uint8), the trunk (normalisation included), head and distances, writing the trunk
features, recording the distances; wall and CPU time per crop.

    .venv/bin/python bench/embed_bench.py --exports openvino,openvino-bf16

``openvino-bf16`` is the OpenVINO export compiled in bf16 (``IMGSIFT_SIAMESE_EXPORT_PRECISION=bf16``;
f32 where the CPU has no native bf16: the report's ``trunk_precision`` says which ran), measured
beside the f32 one on the same crops, against the torch stage and against its own bare forward
(compiled the same way).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support.coco: the COCO128 reader the tests use

import numpy as np  # noqa: E402
import torch  # noqa: E402
from crawl_bench import service_stores  # noqa: E402  # bench/ is on the path of a bench script
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from imgsift_common import keys  # noqa: E402
from imgsift_common.messages import Crop, Job, JobSpec, JobState, SiameseModel, SourceKind, SourceSpec, utcnow  # noqa: E402
from imgsift_common.model_exports import ExportFormat, missing_modules  # noqa: E402
from imgsift_common.servicestate import ServiceStateStore  # noqa: E402
from imgsift_common.storage import LocalStore  # noqa: E402
from imgsift_detector.detect import padded_box  # noqa: E402
from imgsift_siamese import compare  # noqa: E402
from imgsift_siamese import features as stored_features  # noqa: E402
from imgsift_siamese.compare import compare_batch, job_scorer  # noqa: E402
from imgsift_siamese.distance import reference_distance  # noqa: E402
from imgsift_siamese.embed import Embedder, get_embedder  # noqa: E402
from imgsift_siamese.export import TorchTrunk  # noqa: E402
from imgsift_siamese.preprocess import decode_image, normalise, pixels, prepare  # noqa: E402
from imgsift_siamese.settings import SiameseSettings  # noqa: E402
from imgsift_siamese.train import TrainConfig, TrainedHead, train_head  # noqa: E402
from imgsift_siamese.training import rescore  # noqa: E402
from tests.support.coco import Coco128  # noqa: E402

REFERENCE_CLASS = "elephant"
R = TypeVar("R")


class CountingTrunk(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.inner(images)


def cut_crops(coco: Coco128, count: int) -> tuple[list[tuple[str, Crop, bytes]], list[bytes]]:
    """``count`` padded box crops as the detector stores them (image key, crop, JPEG), and 5 reference crops."""
    crops: list[tuple[str, Crop, bytes]] = []
    references: list[bytes] = []
    for path in coco.images:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        for index, label in enumerate(coco.labels(path)):
            x1, y1, x2, y2 = label.box
            if min(x2 - x1, y2 - y1) < 8:  # the detector's min_box_size
                continue
            box = padded_box(label.box, 0.1, photo.width, photo.height)
            buffer = io.BytesIO()
            photo.crop(tuple(round(v) for v in box)).save(buffer, "JPEG", quality=95)  # the detector's quality
            if label.class_name == REFERENCE_CLASS and len(references) < 5 and min(x2 - x1, y2 - y1) >= 48:
                references.append(buffer.getvalue())  # the references are not among the crops
            elif len(crops) < count:
                crop = Crop(job_id="x", key="x", crop_id=keys.crop_id(sha, index), image_key=sha, box=label.box,
                            padded_box=box, score=0.9, class_name=label.class_name)  # fmt: skip
                crops.append((sha, crop, buffer.getvalue()))
        if len(crops) >= count and len(references) >= 5:
            break
    if len(crops) < count:
        raise SystemExit(f"COCO128 has only {len(crops)} boxes of 8 px or more; ask for fewer --crops")
    return crops, references


def new_job(job_id: str, crops: list[tuple[str, Crop, bytes]], references: list[bytes],
            store: LocalStore, state: ServiceStateStore) -> tuple[Job, list[str]]:  # fmt: skip
    """A job holding the references and every crop, stored and recorded as the API and the detector do."""
    reference_keys = []
    for data in references:
        key = keys.reference_key(job_id, hashlib.sha256(data).hexdigest(), "JPEG")
        store.put(key, data, "image/jpeg")
        reference_keys.append(key)
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["https://example.org/a.jpg"])], target="any")
    job = Job(id=job_id, spec=spec, state=JobState.RUNNING, reference_keys=reference_keys)
    state.create_job(job)
    by_image: dict[str, list[Crop]] = {}
    for sha, crop, data in crops:
        key = keys.crop_key(job_id, crop.crop_id)
        store.put(key, data, "image/jpeg")
        image_key = keys.image_key(job_id, sha, "JPEG")
        by_image.setdefault(image_key, []).append(
            crop.model_copy(update={"job_id": job_id, "key": key, "image_key": image_key})
        )
    for image_key, image_crops in by_image.items():
        state.record_detections(job_id, [(image_key, image_crops)])
    return job, [crop.key for image_crops in by_image.values() for crop in image_crops]


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def stage_only(args: argparse.Namespace) -> None:
    """One backbone's stage over the crops, in this process: crops per second and peak memory (JSON on stdout)."""
    import resource

    crops, references = cut_crops(Coco128(args.coco), args.crops)
    settings = SiameseSettings(storage="local", device=args.device, batch_size=args.batch, backbone=args.backbone)
    embedder = get_embedder(settings)
    with tempfile.TemporaryDirectory() as tmp_name, service_stores(Path(tmp_name)) as (database_url, redis_url):
        state = ServiceStateStore.connect(database_url, redis_url)
        store = LocalStore(Path(tmp_name) / "objects")
        warm, warm_keys = new_job("bench-warm", crops[: 2 * settings.batch_size], references, store, state)
        compare_batch(warm, warm_keys, store, state, embedder, settings)  # allocator, thread pools
        job, crop_keys = new_job("bench-stage", crops, references, store, state)
        size = settings.batch_size
        seconds = sum(
            timed(partial(compare_batch, job, crop_keys[i : i + size], store, state, embedder, settings))
            for i in range(0, len(crop_keys), size)
        )
        state.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"backbone": args.backbone, "image_size": settings.image_size, "crops_per_second": len(crops) / seconds,
              "peak_rss_mb": peak_mb}  # fmt: skip
    print(json.dumps(report))


def compare_backbones(args: argparse.Namespace) -> None:
    """Each backbone's stage in its own process, in turn for ``--rounds`` rounds; medians and ratios."""
    names = args.backbones
    runs: dict[str, list[dict]] = {name: [] for name in names}  # type: ignore[type-arg]
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            command = [sys.executable, __file__, "--stage-only", "--backbone", name, "--crops", str(args.crops),
                       "--device", args.device, "--batch", str(args.batch), "--coco", str(args.coco)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]['crops_per_second']:.1f} crops/s, "
                  f"peak {runs[name][-1]['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    first = names[0]

    def median(name: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[name])

    summary = {
        name: {
            "image_size": runs[name][0]["image_size"],
            "crops_per_second": median(name, "crops_per_second"),
            "peak_rss_mb": median(name, "peak_rss_mb"),
            "speed_vs_first": median(name, "crops_per_second") / median(first, "crops_per_second"),
            "memory_vs_first": median(name, "peak_rss_mb") / median(first, "peak_rss_mb"),
        }
        for name in names
    }
    print(f"\n{args.crops} crops, batch {args.batch}, {args.device}, {args.rounds} rounds (medians); ratios to {first}")
    for name, s in summary.items():
        print(f"{name:20} {s['image_size']} px  {s['crops_per_second']:6.1f} crops/s ({s['speed_vs_first']:.2f}x)  "
              f"peak {s['peak_rss_mb']:6.0f} MB ({s['memory_vs_first']:.2f}x)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


def compare_exports(args: argparse.Namespace) -> None:
    """The stage and the bare forward with the torch trunk and with each export, in one run; then the export's parts."""
    load_before = os.getloadavg()
    exports = [export_run(name) for name in args.exports]  # (name, format, precision)
    for name, fmt, _ in exports:
        if missing := missing_modules(fmt):
            raise SystemExit(f"--exports {name}: not installed ({', '.join(missing)})")
    formats = [name for name, _, _ in exports]
    crops, references = cut_crops(Coco128(args.coco), args.crops)
    base = SiameseSettings(storage="local", device=args.device, batch_size=args.batch, backbone=args.backbone)
    export_dir = args.out.parent / "siamese-exports"
    runs = {
        "torch": base,
        **{
            name: base.model_copy(update={"export": fmt, "export_dir": export_dir, "export_precision": precision})
            for name, fmt, precision in exports
        },
    }
    embedders = {}
    for name, settings in runs.items():
        start = time.perf_counter()
        embedders[name] = get_embedder(settings)
        print(f"{name}: loaded in {time.perf_counter() - start:.1f} s ({embedders[name].trunk.name})", flush=True)
    batch, size = base.batch_size, base.image_size
    # The bare forward's inputs: what the stage's decode pool hands the trunk (``prepare``: the JPEG
    # decoded, at a reduced scale where that covers the letterbox, and letterboxed to uint8 pixels).
    # Every runner, the exports included, normalises them in its own graph.
    inputs = [np.stack([prepare(d, size) for _, _, d in crops[i : i + batch]]) for i in range(0, len(crops), batch)]

    def bare(embedder: Embedder, chunk: np.ndarray) -> None:
        embedder.embed_features(embedder.trunk(chunk))

    names = [f"stage {n}" for n in runs] + [f"bare {n}" for n in runs]
    seconds: list[dict[str, float]] = []
    cpu: list[dict[str, float]] = []
    first_batch: list[dict[str, float]] = []  # each run's first batch: a job's first call embeds its references
    with tempfile.TemporaryDirectory() as tmp_name, service_stores(Path(tmp_name)) as (database_url, redis_url):
        state = ServiceStateStore.connect(database_url, redis_url)
        try:
            store = LocalStore(Path(tmp_name) / "objects")
            print(f"{len(crops)} crops, {len(references)} references, {base.backbone} {size} px, batch {batch}, "
                  f"{args.device}, torch threads {torch.get_num_threads()}, "
                  f"load {load_before[0]:.1f}", flush=True)  # fmt: skip
            warm, warm_keys = new_job("bench-warm", crops[: 2 * batch], references, store, state)
            for name, embedder in embedders.items():  # allocator, thread pools, each runtime's first runs
                bare(embedder, inputs[0])
                compare._reference_cache.clear()
                for i in range(0, len(warm_keys), batch):
                    compare_batch(warm, warm_keys[i : i + batch], store, state, embedder, runs[name])
            for r in range(args.rounds):
                jobs = {n: new_job(f"bench-{r}-{n}", crops, references, store, state) for n in runs}
                compare._reference_cache.clear()  # each job embeds its references, as a fresh worker would
                took = dict.fromkeys(names, 0.0)
                took_cpu = dict.fromkeys(names, 0.0)
                first: dict[str, float] = {}
                for b, start in enumerate(range(0, len(crops), batch)):
                    calls: dict[str, Callable[[], object]] = {}
                    for n, embedder in embedders.items():
                        job, keys_ = jobs[n]
                        calls[f"stage {n}"] = partial(compare_batch, job, keys_[start : start + batch], store, state,
                                                      embedder, runs[n])  # fmt: skip
                        calls[f"bare {n}"] = partial(bare, embedder, inputs[b])
                    turn = (b + r) % len(names)
                    for name in names[turn:] + names[:turn]:
                        wall, process = time.perf_counter(), time.process_time()
                        calls[name]()
                        took[name] += time.perf_counter() - wall
                        took_cpu[name] += time.process_time() - process
                        if b == 0:
                            first[name] = took[name]
                seconds.append(took)
                cpu.append(took_cpu)
                first_batch.append(first)
                print(f"round {r + 1}: " + ", ".join(f"{n} {len(crops) / s:6.1f}" for n, s in took.items())
                      + " crops/s", flush=True)  # fmt: skip
            parts = {
                name: stage_parts(name, crops, references, store, state, embedders[name], runs[name])
                for name in [*formats, "torch"]
            }
        finally:
            state.close()

    n = len(crops)

    def rate(name: str) -> float:
        return statistics.median(n / s[name] for s in seconds)

    def ratio(a: str, b: str) -> float:
        return statistics.median(s[b] / s[a] for s in seconds)

    def ratio_after_first(a: str, b: str) -> float:
        """``ratio`` without each run's first batch (for a stage: the job's references and their views)."""
        return statistics.median((s[b] - f[b]) / (s[a] - f[a]) for s, f in zip(seconds, first_batch, strict=True))

    report = {
        "crops": n,
        "backbone": base.backbone,
        "image_size": size,
        "batch": batch,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rounds": [
            {name: {"seconds": s[name], "cpu_seconds": c[name], "crops_per_second": n / s[name]} for name in names}
            for s, c in zip(seconds, cpu, strict=True)
        ],
        "crops_per_second": {name: rate(name) for name in names},
        "trunk_precision": {name: embedders[name].trunk.precision for name in runs},
        "export_stage_vs_torch_stage": {f: ratio(f"stage {f}", "stage torch") for f in formats},
        "export_stage_vs_its_bare_forward": {f: ratio(f"stage {f}", f"bare {f}") for f in formats},
        "export_stage_vs_its_bare_forward_after_first_batch": {
            f: ratio_after_first(f"stage {f}", f"bare {f}") for f in formats
        },
        "first_batch_seconds": first_batch,
        "torch_stage_vs_its_bare_forward": ratio("stage torch", "bare torch"),
        "parts_ms_per_crop": parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{n} crops, {base.backbone}, batch {batch}, {args.device}, {args.rounds} rounds (medians); "
          f"load {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    for name in names:
        print(f"{name:16} {rate(name):7.1f} crops/s")
    for f in formats:
        speed, own = ratio(f"stage {f}", "stage torch"), ratio(f"stage {f}", f"bare {f}")
        fast, close = "met" if speed >= 2.5 else "NOT met", "met" if own >= 0.85 else "NOT met"
        steady = ratio_after_first(f"stage {f}", f"bare {f}")
        print(f"{f} ({embedders[f].trunk.precision}): stage / torch stage {speed:.2f}x (goal >= 2.5x: {fast}); "
              f"stage / its bare forward {own:.2f}x (goal >= 0.85x: {close}); "
              f"without each job's first batch (its references) {steady:.2f}x")  # fmt: skip
    for r, (s, f) in enumerate(zip(seconds, first_batch, strict=True)):
        print(f"round {r + 1}: " + ", ".join(f"{name} {1000 * s[name] / n:.2f} ms/crop (first batch "
                                             f"{1000 * f[name]:.0f} ms)" for name in names))  # fmt: skip
    print(f"torch: stage / its bare forward {ratio('stage torch', 'bare torch'):.2f}x")
    for label, measured in parts.items():
        total = sum(v["wall_ms"] for v in measured.values())
        print(f"\nthe stage's parts, one after the other, {label} trunk (ms per crop; share of their sum):")
        for part, v in measured.items():
            print(f"  {part:26} wall {v['wall_ms']:6.2f}  cpu {v['cpu_ms']:6.2f}  {v['wall_ms'] / total:5.0%}")


def export_run(name: str) -> tuple[str, ExportFormat, str]:
    """An ``--exports`` name: a format (``openvino``, ``onnx``), and for OpenVINO a precision after a dash
    (``openvino-bf16``: IMGSIFT_SIAMESE_EXPORT_PRECISION=bf16; f32 without one)."""
    fmt, _, precision = name.partition("-")
    try:
        settings = SiameseSettings(storage="local", export=fmt, export_precision=precision or "f32")
    except ValueError as exc:
        raise SystemExit(f"--exports {name}: {exc}") from None
    return name, ExportFormat(settings.export), settings.export_precision


def stage_parts(
    label: str,
    crops: list[tuple[str, Crop, bytes]],
    references: list[bytes],
    store: LocalStore,
    state: ServiceStateStore,
    embedder: Embedder,
    settings: SiameseSettings,
) -> dict[str, dict[str, float]]:
    """Each part of ``compare_batch``'s work on a fresh job of the crops, run one after the other, batch by
    batch: wall and CPU milliseconds per crop. The parts are the stage's own functions, unthreaded."""
    job, crop_keys = new_job(f"bench-parts-{label}", crops, references, store, state)
    compare._reference_cache.clear()
    job, scorer = job_scorer(job, store, state, embedder, settings)  # the references, as a batch's first call
    sources = compare.crop_sources(job.id, crop_keys, state)
    totals: dict[str, list[float]] = {}

    def part(name: str, function: Callable[[], R]) -> R:
        wall, process = time.perf_counter(), time.process_time()
        result = function()
        spent = totals.setdefault(name, [0.0, 0.0])
        spent[0] += time.perf_counter() - wall
        spent[1] += time.process_time() - process
        return result

    batch = settings.batch_size
    for start in range(0, len(crop_keys), batch):
        chunk = crop_keys[start : start + batch]
        data = part("read (object store)", lambda: [store.get(k) for k in chunk])  # noqa: B023
        images = part("decode (JPEG)", lambda: [decode_image(d, embedder.image_size) for d in data])  # noqa: B023
        arrays = part("letterbox (uint8)", lambda: np.stack([pixels(im, embedder.image_size)
                                                             for im in images]))  # noqa: B023  # fmt: skip
        rows = part("trunk", lambda: stored_features.as_stored(embedder.features_of_pixels(arrays)))  # noqa: B023
        distances = part("head + distances", lambda: scorer.distances(rows, chunk))  # noqa: B023
        features = stored_features.FeatureRows(list(chunk), [sources[k] for k in chunk], rows)
        key = keys.crop_features_key(job.id, embedder.trunk_id, stored_features.digest(chunk))
        part("write trunk features", lambda: stored_features.write(store, key, embedder.trunk_id, features))  # noqa: B023
        values = [(k, float(d)) for k, d in zip(chunk, distances, strict=True)]
        part("record distances", lambda: state.record_distances(job.id, values))  # noqa: B023
    n = len(crop_keys)
    return {name: {"wall_ms": 1000 * w / n, "cpu_ms": 1000 * c / n} for name, (w, c) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--crops", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    default_batch = SiameseSettings.model_fields["batch_size"].default
    parser.add_argument("--batch", type=int, default=default_batch, help="crops per forward pass")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "embed_bench.json")
    parser.add_argument("--backbones", type=lambda v: v.split(","), default=None,
                        help="compare these backbones' stage (speed, memory) instead")  # fmt: skip
    parser.add_argument("--half", action="store_true", help="the trunk in fp16 (IMGSIFT_SIAMESE_HALF; CUDA)")
    parser.add_argument("--exports", type=lambda v: v.split(","), default=None,
                        help="compare the torch trunk with these exports (openvino, onnx) instead")  # fmt: skip
    parser.add_argument("--backbone", default=None, help="the backbone of --exports (default: the settings')")
    parser.add_argument("--stage-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backbone is None:
        args.backbone = "mobilenet_v2" if args.stage_only else SiameseSettings.model_fields["backbone"].default
    if args.stage_only:
        return stage_only(args)
    if args.exports:
        return compare_exports(args)
    if args.backbones:
        return compare_backbones(args)
    load_before = os.getloadavg()
    crops, references = cut_crops(Coco128(args.coco), args.crops)
    settings = SiameseSettings(storage="local", device=args.device, batch_size=args.batch, half=args.half)
    single = settings.model_copy(update={"decode_threads": 1})
    batch = settings.batch_size
    embedder: Embedder = get_embedder(settings)
    network = embedder.network

    with tempfile.TemporaryDirectory() as tmp_name, service_stores(Path(tmp_name)) as (database_url, redis_url):
        tmp = Path(tmp_name)
        state = ServiceStateStore.connect(database_url, redis_url)
        try:
            store = LocalStore(tmp / "objects")
            print(f"{len(crops)} crops, {len(references)} references, batch {batch}, {args.device}, "
                  f"torch threads {torch.get_num_threads()}, load {load_before[0]:.1f}", flush=True)  # fmt: skip

            # The bare forward's inputs: the same JPEGs, decoded and letterboxed beforehand (uint8).
            size = settings.image_size
            tensors = [
                np.stack([prepare(data, size) for _, _, data in crops[i : i + batch]])
                for i in range(0, len(crops), batch)
            ]

            def bare(inputs: np.ndarray | None = None) -> None:
                # The embedder's trunk runner (torch, fp16 with --half) and head, as the stage runs them.
                for batch_inputs in tensors if inputs is None else [inputs]:
                    embedder.embed_features(embedder.trunk(batch_inputs))

            warm, warm_keys = new_job("bench-warm", crops[: 2 * batch], references, store, state)
            bare()  # warm-up: allocator, thread pools
            for i in range(0, len(warm_keys), batch):
                compare_batch(warm, warm_keys[i : i + batch], store, state, embedder, settings)

            # Batch by batch, the three runs one after the other in a rotating order: load from
            # other processes on the machine changes by the second, and falls on all three alike.
            names = ("bare", "stage", "stage_1_thread")
            rounds = []
            for r in range(args.rounds):
                job, crop_keys = new_job(f"bench-{r}", crops, references, store, state)
                job1, crop_keys1 = new_job(f"bench-single-{r}", crops, references, store, state)
                compare._reference_cache.clear()  # each job embeds its references, as a fresh worker would
                seconds = dict.fromkeys(names, 0.0)
                per_batch = []
                for b, start in enumerate(range(0, len(crop_keys), batch)):
                    chunk, chunk1 = crop_keys[start : start + batch], crop_keys1[start : start + batch]
                    runs = {
                        "bare": partial(bare, tensors[b]),
                        "stage": partial(compare_batch, job, chunk, store, state, embedder, settings),
                        "stage_1_thread": partial(compare_batch, job1, chunk1, store, state, embedder, single),
                    }
                    turn = (b + r) % 3
                    took = {name: timed(runs[name]) for name in names[turn:] + names[:turn]}
                    for name in names:
                        seconds[name] += took[name]
                    per_batch.append(took["bare"] / took["stage"])
                rounds.append(seconds)
                print(f"round {r + 1}: " + ", ".join(f"{n} {len(crops) / s:5.1f} crops/s" for n, s in seconds.items())
                      + f"  -> stage/bare {seconds['bare'] / seconds['stage']:.2f}"
                      + f" (per batch: median {statistics.median(per_batch):.2f}, "
                      + f"{min(per_batch):.2f} to {max(per_batch):.2f})", flush=True)  # fmt: skip
            stage_job, stage_keys = job, crop_keys

            # The stage's distances are the bare forward's: a check that it measured the same work.
            with torch.inference_mode():
                bare_rows = torch.cat([network.embed(normalise(torch.from_numpy(t))) for t in tensors]).numpy()
                refs = network.embed(normalise(torch.from_numpy(np.stack([prepare(d, size) for d in references]))))
            by_key = dict(state.distances(stage_job.id))
            expected = reference_distance(bare_rows, refs.numpy())
            order_of = {crop.crop_id: i for i, (_, crop, _) in enumerate(crops)}
            worst = max(abs(by_key[k] - expected[order_of[k.rsplit("/", 1)[-1][:-4]]]) for k in stage_keys)

            # A trained head: trained on trunk features of the references (positives) and of
            # crops of other classes (negatives), stored and set on the job like train_job's.
            positives = embedder.features_of_images([decode_image(d) for d in references])
            others = [decode_image(data) for _, crop, data in crops if crop.class_name != REFERENCE_CLASS][:100]
            config = TrainConfig(min_steps=200)
            head = train_head(positives, embedder.features_of_images(others), config)
            model_key = keys.model_key(stage_job.id, 1)
            store.put(model_key, TrainedHead(head, config, positives.shape[1]).to_bytes())
            model = SiameseModel(version=1, key=model_key, trained_at=utcnow())
            tuned_job = state.update_job(stage_job.id, model=model)

            # Counted where the stage's trunk runs: the network, or the fp16 copy of it (--half).
            runner = embedder.trunk
            counted = runner.module.network if isinstance(runner, TorchTrunk) else network
            counting = CountingTrunk(counted.trunk)
            counted.trunk = counting
            from_features = timed(lambda: rescore(tuned_job, store, state, settings))
            trunk_images_features = counting.images
            rescored = dict(state.distances(stage_job.id))
            for key in list(store.list(keys.features_prefix(stage_job.id, embedder.trunk_id) + "crops/")):
                store.delete(key)
            counting.images = 0
            full_trunk = timed(lambda: rescore(tuned_job, store, state, settings))
            trunk_images_full = counting.images
            counted.trunk = counting.inner
            rescored_again = dict(state.distances(stage_job.id))
            rescore_difference = max(abs(rescored[k] - rescored_again[k]) for k in rescored)
            moved = float(np.median([abs(rescored[k] - by_key[k]) for k in rescored]))
        finally:
            state.close()

    n = len(crops)
    ratios = [s["bare"] / s["stage"] for s in rounds]
    ratios_single = [s["bare"] / s["stage_1_thread"] for s in rounds]
    report = {
        "crops": n,
        "references": len(references),
        "batch": batch,
        "decode_threads": settings.decode_threads,
        "device": args.device,
        "half": args.half,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rounds": [{name: {"seconds": s, "crops_per_second": n / s} for name, s in r.items()} for r in rounds],
        "stage_vs_bare_forward": ratios,
        "stage_vs_bare_forward_median": statistics.median(ratios),
        "stage_1_thread_vs_bare_forward": ratios_single,
        "stage_1_thread_vs_bare_forward_median": statistics.median(ratios_single),
        "stage_distance_vs_bare_forward_max_difference": worst,
        "rescore_from_features_seconds": from_features,
        "rescore_full_trunk_seconds": full_trunk,
        "rescore_speedup": full_trunk / from_features,
        "rescore_trunk_images": {"from_features": trunk_images_features, "full_trunk": trunk_images_full},
        "rescore_max_difference": rescore_difference,
        "rescore_median_distance_moved_by_head": moved,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    def median_rate(name: str) -> float:
        return statistics.median(n / r[name] for r in rounds)

    print(f"\n{n} crops, batch {batch}, {args.device}, {args.rounds} rounds (medians)")
    print(f"stage (compare_batch, {settings.decode_threads} decode threads): {median_rate('stage'):7.1f} crops/s")
    print(f"stage, 1 decode thread:                  {median_rate('stage_1_thread'):7.1f} crops/s")
    print(f"bare batched network.embed:              {median_rate('bare'):7.1f} crops/s")
    goal = "met" if statistics.median(ratios) >= 0.85 else "NOT met"
    rounds_text = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"stage / bare forward: {statistics.median(ratios):.2f}x (goal >= 0.85x: {goal}); "
          f"1 decode thread {statistics.median(ratios_single):.2f}x; rounds {rounds_text}")  # fmt: skip
    print(f"stage distances vs the bare forward's: max difference {worst:.1e}")
    print(f"rescore with a trained head, {n} crops: from stored features {from_features:6.2f} s "
          f"({trunk_images_features} trunk images), full trunk {full_trunk:6.2f} s ({trunk_images_full} trunk images)"
          f" -> {full_trunk / from_features:.1f}x; max difference {rescore_difference:.1e}, "
          f"median move by the head {moved:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
