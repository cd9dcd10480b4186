"""How long fine-tuning a job's Siamese head takes on this machine, against the bare trunk.

    .venv/bin/python bench/train_bench.py            # 50 references; --refs, --bank, --crops

A job with ``--refs`` reference crops (COCO128 people), a negative bank of ``--bank`` crops of
other classes and ``--crops`` scored crops runs ``imgsift_siamese.training.train_job`` (views,
trunk features, 3 held-out folds and the final head), then ``rescore``. The baseline, in the
same run, is the bare MobileNetV2 trunk over the same number of images training has to embed
(references, views, bank, far crops). The goal of issue 4: training on up to 50 references
within 2 minutes on this machine's CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from imgsift_common.sqlstate import SqlStateStore  # noqa: E402
from imgsift_common.storage import LocalStore  # noqa: E402
from imgsift_siamese.embed import get_embedder  # noqa: E402
from imgsift_siamese.preprocess import preprocess  # noqa: E402
from imgsift_siamese.settings import SiameseSettings  # noqa: E402
from imgsift_siamese.train import TrainConfig  # noqa: E402
from imgsift_siamese.training import rescore, train_job  # noqa: E402
from tests.siamese.stored import create_job, put_crops, put_references  # noqa: E402
from tests.support.coco import Coco128  # noqa: E402


def crops(coco: Coco128, keep: Callable[[str], bool], n: int, min_side: int = 32) -> list[Image.Image]:
    """The first ``n`` labelled boxes whose class ``keep`` accepts, cut from the photos."""
    out: list[Image.Image] = []
    for photo in coco.images:
        for box in coco.labels(photo):
            x0, y0, x1, y1 = box.box
            if min(x1 - x0, y1 - y0) < min_side or not keep(box.class_name):
                continue
            with Image.open(photo) as im:
                out.append(im.convert("RGB").crop((round(x0), round(y0), round(x1), round(y1))))
            if len(out) == n:
                return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--refs", type=int, default=50)
    parser.add_argument("--bank", type=int, default=200)
    parser.add_argument("--crops", type=int, default=200)
    args = parser.parse_args()
    coco = Coco128(args.coco)
    people = crops(coco, lambda name: name == "person", args.refs + args.crops // 2)
    others = crops(coco, lambda name: name != "person", args.bank + args.crops // 2)
    refs, job_people = people[: args.refs], people[args.refs :]
    bank, job_others = others[: args.bank], others[args.bank :]
    print(f"{len(refs)} references, {len(bank)} bank crops, {len(job_people) + len(job_others)} job crops", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bank_dir = tmp / "bank"
        bank_dir.mkdir()
        for i, im in enumerate(bank):
            im.save(bank_dir / f"{i:04d}.jpg")
        store = LocalStore(tmp / "objects")
        state = SqlStateStore.sqlite(tmp / "state.sqlite")
        settings = SiameseSettings(storage="local", negative_bank=bank_dir)
        embedder = get_embedder(settings)
        job = create_job(state, put_references(store, refs))
        put_crops(store, state, job_people, "person")
        put_crops(store, state, job_others, "person")
        rescore(job, store, state, settings)  # the pretrained distances a job has before training

        # Baseline: the bare trunk over as many images as training embeds.
        n_images = len(refs) * (1 + TrainConfig.augmentations) + len(bank) + (len(job_people) + len(job_others)) // 4
        batch = torch.stack([preprocess(im, 224) for im in (refs * 10)[:32]])
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(0, n_images, 32):
                embedder.network.trunk(batch)
        bare = time.perf_counter() - start

        start = time.perf_counter()
        model = train_job(job, store, state, settings, version=1)
        trained = time.perf_counter() - start
        job = state.update_job(job.id, model=model)
        start = time.perf_counter()
        rescored = rescore(job, store, state, settings)
        rescoring = time.perf_counter() - start

    print(f"bare trunk over {n_images} images:        {bare:6.1f} s")
    print(f"train_job ({len(refs)} references, 4 heads): {trained:6.1f} s  ({trained / bare:.2f}x the bare trunk)")
    print(f"rescore {rescored} crops:                   {rescoring:6.1f} s")
    print(f"goal: training within 120 s -> {'met' if trained <= 120 else 'NOT met'} ({trained:.0f} s)")


if __name__ == "__main__":
    main()
