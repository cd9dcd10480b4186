"""Client CPU per recorded image: what one writer's Python costs the store, without the server.

    .venv/bin/python bench/state_client_cpu.py --database-url postgresql://postgres@127.0.0.1:5432/scratch
    .venv/bin/python bench/state_client_cpu.py --database-url ... --text-lists   # psycopg's text arrays

Records ``--images`` images as the workers do (``state_bench.record_images``: batch writes at the
services' batch sizes) into a new job of the database given (migrated first; it must be empty or
this bench's), and prints the process CPU per image, less the CPU of building the bench's records.
``--text-lists`` leaves psycopg's default text dumping of lists (before the binary dumper in
``sqldialect``). Alternate the two in separate processes for an A/B.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import state_bench as sb

from imgsift_common import schema, sqldialect
from imgsift_common.messages import Job, JobSpec, SourceKind, SourceSpec
from imgsift_common.sqlstate import SqlStateStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--text-lists", action="store_true")
    args = parser.parse_args()
    if args.text_lists:
        sqldialect._postgres_connect = lambda *_: None  # type: ignore[assignment]
    schema.migrate(args.database_url)
    store = SqlStateStore.open(args.database_url)
    job_id = uuid.uuid4().hex
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://127.0.0.1/x"])], target="dog")
    store.create_job(Job(id=job_id, spec=spec))
    sb.record_images(store, job_id, 0, 500, 10**9)  # warm: statements prepared, caches filled
    first, last = 500, 500 + args.images
    began = time.process_time()
    for i in range(first, last):
        sb.image_records(job_id, i)
    building = time.process_time() - began
    began, wall = time.process_time(), time.perf_counter()
    sb.record_images(store, job_id, first, last, 10**9)
    cpu = time.process_time() - began - building
    store.close()
    lists = "text" if args.text_lists else "binary"
    print(f"{lists} lists: {cpu * 1000 / args.images:.3f} client CPU ms per image "
          f"({args.images} images, {time.perf_counter() - wall:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
