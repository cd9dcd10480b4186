"""Resident memory of ``compare_batch`` in one process as it scores more and more crops.

    .venv/bin/python bench/siamese_memory.py            # 5 jobs of 640 COCO128 box crops, batches of 32

The Siamese worker's peak memory grew with the crops it scored (docs/benchmarks.md, end to
end); this isolates the stage function from the worker around it: real MobileNetV2, real crops
in a local store, job state in the services' store (a PostgreSQL and a redis-server of its
own). With batches of one size it stays flat; the growth came from batches of every size
(bench/batch_shapes_memory.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from crawl_bench import service_stores  # noqa: E402  # bench/ is on the path of a bench script
from embed_bench import cut_crops, new_job  # noqa: E402

from imgsift_common.servicestate import ServiceStateStore  # noqa: E402
from imgsift_common.storage import LocalStore  # noqa: E402
from imgsift_siamese.compare import compare_batch  # noqa: E402
from imgsift_siamese.embed import get_embedder  # noqa: E402
from imgsift_siamese.settings import SiameseSettings  # noqa: E402
from tests.support.coco import Coco128  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--crops", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, service_stores(Path(tmp_name)) as (database_url, redis_url):
        tmp = Path(tmp_name)
        state = ServiceStateStore.connect(database_url, redis_url)
        store = LocalStore(tmp / "store")
        settings = SiameseSettings(storage="local", local_storage_dir=tmp / "store")
        embedder = get_embedder(settings)
        crops, references = cut_crops(Coco128(args.coco), args.crops)
        process = psutil.Process()
        for j in range(args.jobs):
            job, keys = new_job(f"{j:032x}", crops, references, store, state)
            for start in range(0, len(keys), args.batch):
                compare_batch(job, keys[start : start + args.batch], store, state, embedder, settings)
            print(f"after {(j + 1) * len(keys)} crops: resident {process.memory_info().rss / 2**20:.0f} MB", flush=True)
        state.close()


if __name__ == "__main__":
    main()
