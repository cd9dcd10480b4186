"""Export memory at scale: peak RSS of each export format at 10,000 and at 100,000 crops.

    .venv/bin/python bench/export_bench.py                       # 10,000 and 100,000 crops, every format
    .venv/bin/python bench/export_bench.py --sizes 2000 --formats webdataset parquet   # a quick look

Builds one job in the embedded SQLite store through its public methods, as the workers record it
(``state_bench.record_image``: per image a download record with realistic provenance, 3 crops and
their distances), up to the first size, measures, grows the same job to the next size, measures
again. Every export runs in a child process of its own at threshold 4.0 (every crop accepted, so
every format writes every crop); the child reports its peak RSS (``ru_maxrss``), its RSS before
the export, the crops written, the file's size and the seconds.

The objects are the bench's own store: every crop key answers one real JPEG crop, every image key
one real photo (``--photo``; a generated JPEG without it), so the bench writes no 100,000 files
and the formats still copy real bytes per sample into their archives (each object's bytes made its own
by its key appended after the JPEG's end). What is measured is the export's memory: the store's
reads are one ``bytes`` per call either way.
Writes ``<out>/export_bench.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_bench import CROPS, JOB_ID, record_image

from imgsift_common.exports import ExportFormat, export
from imgsift_common.messages import Job, JobSpec, Limits, SourceKind, SourceSpec
from imgsift_common.sqlstate import SqlStateStore

THRESHOLD = 4.0  # every crop accepted


class SameBytes:
    """An object store that answers one real crop for every crop key and one photo for every image key."""

    def __init__(self, crop: bytes, photo: bytes) -> None:
        self.crop, self.photo = crop, photo

    def get(self, key: str) -> bytes:
        # The key after the JPEG's end (decoders stop at its end marker) makes every object's bytes its own,
        # as real crops are: Parquet's dictionary encoding would otherwise store one copy for the whole job.
        return (self.crop if "/crops/" in key else self.photo) + key.encode()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise NotImplementedError("the bench's store is read-only")

    def exists(self, key: str) -> bool:
        return True

    def delete(self, key: str) -> None:
        raise NotImplementedError("the bench's store is read-only")

    def list(self, prefix: str) -> Iterator[str]:
        return iter(())

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        raise NotImplementedError("the bench's store is read-only")

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        yield self.get(key)


def jpegs(photo: Path | None) -> tuple[bytes, bytes]:
    """(a crop, a photo): the photo's bytes and a 160x120 crop of it, else generated JPEGs."""
    from PIL import Image

    if photo:
        data = photo.read_bytes()
        image = Image.open(io.BytesIO(data)).convert("RGB")
    else:
        image = Image.linear_gradient("L").convert("RGB").resize((640, 480))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        data = out.getvalue()
    crop = io.BytesIO()
    image.crop((0, 0, 160, 120)).save(crop, "JPEG", quality=90)
    return crop.getvalue(), data


def grow(state: SqlStateStore, first_image: int, images: int) -> None:
    for i in range(first_image, images):
        record_image(state, JOB_ID, i, max_images=10_000_000)


def measure(db: Path, fmt: str, workdir: Path, photo: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--db", str(db), "--formats", fmt, "--workdir", str(workdir)]
    if photo:
        cmd += ["--photo", str(photo)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def child(args: argparse.Namespace) -> None:
    def rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    import pyarrow  # noqa: F401  # the writers' library is loaded before "before", as a worker has it loaded

    fmt = ExportFormat(args.formats[0])
    crop, photo = jpegs(args.photo)
    store = SameBytes(crop, photo)
    state = SqlStateStore.sqlite(args.db)
    job = state.get_job(JOB_ID)
    assert job is not None
    before = rss()
    began = time.perf_counter()
    dest = args.workdir / f"export{fmt.suffix}"
    result = export(fmt, job, state, store, THRESHOLD, dest)  # type: ignore[arg-type]
    seconds = time.perf_counter() - began
    size = dest.stat().st_size
    dest.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state.close()
    print(json.dumps({"rss_before": before, "peak_rss": peak, "crops": result.crops, "bytes": size, "s": seconds}))


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": {}, "load_average": os.getloadavg(), "photo": str(args.photo or "")}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        workdir = Path(tmp)
        db = workdir / "state.sqlite"
        state = SqlStateStore.sqlite(db)
        spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="dog",
                       limits=Limits(max_images=1_000_000))  # fmt: skip
        state.create_job(Job(id=JOB_ID, spec=spec))
        images = 0
        for size in sorted(args.sizes):
            target = -(-size // CROPS)
            began = time.perf_counter()
            grow(state, images, target)
            images = target
            built = time.perf_counter() - began
            row: dict[str, Any] = {"images": images, "crops": images * CROPS, "build_s": built, "formats": {}}
            for fmt in args.formats:
                row["formats"][fmt] = measure(db, fmt, workdir, args.photo)
                print(f"{size:>7} {fmt:<12} {json.dumps(row['formats'][fmt])}", flush=True)
            results["sizes"][str(size)] = row
        state.close()
    results["load_average_after"] = os.getloadavg()
    return results


def table(r: dict[str, Any]) -> str:
    mb = 1 << 20
    sizes = list(r["sizes"])
    lines = ["| format | " + " | ".join(f"{int(s):,} crops: peak RSS (grown), file, time" for s in sizes) + " |"]
    lines.append("| --- |" + " --- |" * len(sizes))
    for fmt in next(iter(r["sizes"].values()))["formats"]:
        cells = []
        for s in sizes:
            m = r["sizes"][s]["formats"][fmt]
            grown = (m["peak_rss"] - m["rss_before"]) / mb
            cells.append(f"{m['peak_rss'] / mb:,.0f} MB (+{grown:,.0f}), {m['bytes'] / mb:,.0f} MB, {m['s']:.1f} s")
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="crops in the job")
    parser.add_argument("--formats", nargs="+", default=[f.value for f in ExportFormat])
    parser.add_argument("--photo", type=Path, help="a real JPEG for the originals (default: a generated one)")
    parser.add_argument("--out", type=Path, default=Path(".bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "export_bench.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"load average before / after: {result['load_average']} / {result['load_average_after']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
