"""Crawler ingest throughput: imgsift against img2dataset on the same URL list, in one run.

    .venv/bin/python bench/crawl_bench.py                 # 2,000 images, 2 processes x 16 threads
    .venv/bin/python bench/crawl_bench.py --images 500    # a quicker look

What it does, all on loopback:

1. builds a corpus of distinct JPEGs from real photos (COCO128 by default): random crops,
   flips, sizes and qualities, each kept only if its perceptual hash is more than
   ``--min-distance`` bits from every photo kept before, so no run drops near-duplicates;
2. serves the corpus from nginx (Debian's; a generated config, one worker) or, where no
   nginx is installed, from uvicorn with Starlette's StaticFiles;
3. starts the services' job-state stores (a PostgreSQL of its own, in a temp dir, migrated by
   the services' migrate step, and a Redis server) and moto's S3 server on free ports;
4. runs, one after the other, each as its own processes with the same parallelism:
   - imgsift's ingest (download, decode check, SHA-256, perceptual hash, near-duplicate
     lookup, store, record) into the local store, and into the S3 endpoint, the job state in
     PostgreSQL (locks and claims in Redis) as in the services (``download_batch``, the crawler task's stage function);
   - img2dataset on the same URL list, with its default re-encoding (resize to 256, JPEG)
     and with ``--disable_all_reencoding True``;
   - the S3 endpoint alone: the same objects PUT from disk by the minio client, nothing
     else, with the same parallelism (moto is a Python server sharing these CPUs, so this is
     the ceiling of any ingest into it);
   - imgsift into the local store again on a quarter of the images, to see whether its
     peak memory grows with the number of images;
5. prints images per second, CPU milliseconds per image (of the run's own processes, not of the
   servers it talks to), peak memory (the sum of the resident sets of the process tree,
   sampled every 50 ms) and the ratios, and writes them to ``<out>/crawl_bench.json``.

    .venv/bin/python bench/crawl_bench.py --hash-drafts 256,64   # the perceptual hash at two JPEG draft sizes

hashes every corpus image with its JPEG decoded at each draft size (``imgsift_crawler.dedup.HASH_DRAFT``,
64 now, 256 before issue 18) and reports the CPU time per image of decode and hash, how many
bits each image's hash moved, and whether any near-duplicate decision of the corpus's pairs
(at every distance up to ``--near-distance``) changed.

    .venv/bin/python bench/crawl_bench.py --profile   # where an imgsift ingest's time goes

runs only imgsift's ingest into the local store, every call ``download_batch`` makes to the state,
the web and the store (and the decode check) timed and summed over the download threads, and
prints the CPU time per image of the ingest processes, of PostgreSQL, Redis and nginx.

img2dataset is installed into ``.bench/img2dataset`` (its own venv; PyPI) the first time.
Politeness limits are lifted for imgsift here (one host serves everything: per-host
concurrency = processes x threads, no interval), since img2dataset has none; robots.txt and
X-Robots-Tag are still checked by imgsift (the server has no robots.txt: one 404 per process).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the PostgreSQL and the stack the tests start

if TYPE_CHECKING:
    from imgsift_common.servicestate import ServiceStateStore
    from tests.support.postgres import PostgresServer

I2D_VERSION = "1.47.0"
I2D_VENV = ROOT / ".bench" / "img2dataset"
I2D_DEFAULT = "img2dataset, default (resize 256, re-encode)"
I2D_RAW = "img2dataset, --disable_all_reencoding"
QUARTER = "imgsift, local store, 1/4 of the images"
LOCAL = "imgsift, local store"
BASELINE = "imgsift, local store, the --baseline tree"
S3 = "imgsift, S3 (moto)"
RUN_KEYS = ("local", "baseline", "s3", "i2d-default", "i2d-raw", "s3-alone", "quarter")
# Where a tree's packages are (what PYTHONPATH names for a checkout that is not installed).
PACKAGE_DIRS = ("common", "cli", "services/crawler", "services/detector", "services/siamese", "services/api",
                "clients/python", ".")  # fmt: skip
S3_CEILING = "S3 (moto) alone: PUT the same objects from disk"


# ============================================================================ corpus


def build_corpus(photos: Path, out: Path, n: int, min_distance: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs whose perceptual hashes are pairwise more than ``min_distance`` bits apart."""
    import numpy as np
    from PIL import Image

    from imgsift_crawler.dedup import perceptual_hash_of

    manifest = out / "corpus.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["n"] == n and saved["min_distance"] == min_distance:
            return [out / name for name in saved["files"]]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise SystemExit(f"no photos in {photos}")
    rng = random.Random(seed)
    kept: list[int] = []
    files: list[str] = []
    attempts = 0
    while len(files) < n:
        attempts += 1
        if attempts > n * 20:
            raise SystemExit(f"only {len(files)} distinct variants after {attempts} tries; lower --min-distance")
        src = sources[attempts % len(sources)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            f = rng.uniform(0.5, 0.9)
            cw, ch = int(w * f), int(h * rng.uniform(0.5, 0.9))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            variant = im.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            side = rng.randint(400, 800)
            scale = side / max(variant.size)
            variant = variant.resize((max(1, int(variant.width * scale)), max(1, int(variant.height * scale))))
            buffer = io.BytesIO()
            variant.save(buffer, "JPEG", quality=rng.randint(75, 95))
        data = buffer.getvalue()
        h64 = perceptual_hash_of(data)
        if kept:
            xor = np.bitwise_xor(np.array(kept, dtype=np.uint64), np.uint64(h64))
            if int(np.unpackbits(xor.view(np.uint8)).reshape(len(kept), 64).sum(axis=1).min()) <= min_distance:
                continue
        kept.append(h64)
        name = f"{len(files):05d}.jpg"
        (out / name).write_bytes(data)
        files.append(name)
    manifest.write_text(json.dumps({"n": n, "min_distance": min_distance, "files": files}))
    return [out / name for name in files]


# ============================================================================ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def process(args: list[str], port: int, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def web_server(root: Path, workdir: Path) -> Iterator[tuple[str, str]]:
    """Serve ``root`` on loopback; yields (base URL, what serves it)."""
    port = free_port()
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx:
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  client_body_temp_path {workdir}/nginx-tmp;
  proxy_temp_path {workdir}/nginx-tmp;
  fastcgi_temp_path {workdir}/nginx-tmp;
  uwsgi_temp_path {workdir}/nginx-tmp;
  scgi_temp_path {workdir}/nginx-tmp;
  types {{ image/jpeg jpg; }}
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
        )
        with process([nginx, "-c", str(conf), "-e", str(workdir / "nginx-error.log")], port):
            yield f"http://127.0.0.1:{port}", "nginx"
        return
    app = workdir / "static_app.py"
    app.write_text(
        "from starlette.applications import Starlette\nfrom starlette.routing import Mount\n"
        "from starlette.staticfiles import StaticFiles\n"
        f"app = Starlette(routes=[Mount('/', StaticFiles(directory={str(root)!r}))])\n"
    )
    uvicorn = [sys.executable, "-m", "uvicorn", "static_app:app", "--host", "127.0.0.1", "--port", str(port)]
    with process([*uvicorn, "--log-level", "warning", "--no-access-log"], port, cwd=workdir):
        yield f"http://127.0.0.1:{port}", "uvicorn + Starlette StaticFiles (no nginx found)"


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process([*args, "--dir", str(workdir)], port):
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 of the bench's own on a free loopback port, in a temp dir (the tests' server)."""
    from tests.support.postgres import PostgresUnavailable, running_postgres

    try:
        with running_postgres(free_port()) as server:
            yield server
    except PostgresUnavailable as exc:
        raise SystemExit(str(exc)) from exc


def migrated_database(server: PostgresServer, logdir: Path) -> str:
    """A new database of ``server`` brought to the schema by the services' migrate step (compose's
    ``migrate`` service, run as tests/support/stack.py runs it before the services start); its URL."""
    from tests.support.stack import Stack

    url = server.create_database(migrated=False)
    # Compose builds its URL from the password; this server trusts local connections.
    Stack(env={"IMGSIFT_DATABASE_URL": url, "IMGSIFT_POSTGRES_PASSWORD": "unused"}, logdir=logdir).migrate()
    return url


@contextmanager
def service_stores(workdir: Path) -> Iterator[tuple[str, str]]:
    """The stores the services keep job state in: a migrated PostgreSQL database and a Redis
    (locks, idempotency keys), both the bench's own; yields their URLs."""
    with postgres_server() as server, redis_server(workdir) as redis:
        yield migrated_database(server, workdir), redis


@contextmanager
def s3_server() -> Iterator[str]:
    port = free_port()
    moto = [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)]
    with process(moto, port):
        yield f"127.0.0.1:{port}"


# ============================================================================ measuring


def run_measured(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, float]:
    """Run a command; its wall time, the CPU time of its process tree (the processes it waited
    for: not the servers it talks to) and the peak of the summed RSS of its process tree."""
    import resource

    import psutil

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    done = threading.Event()
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
    done.set()
    sampler.join()
    reader.join()
    if rc != 0:
        sys.stderr.write(b"".join(output).decode(errors="replace")[-4000:])
        raise SystemExit(f"{args[:3]} failed with exit code {rc}")
    output_text = b"".join(output).decode(errors="replace")
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": peak / 2**20, "output": output_text}  # type: ignore[dict-item]


# ============================================================================ imgsift ingest


def ingest_command(
    urls: Path, store: str, target: str, stores: tuple[str, str], processes: int, threads: int, profile: bool = False
) -> list[str]:
    database, redis = stores
    return [
        sys.executable,
        __file__,
        "_ingest",
        "--urls",
        str(urls),
        "--store",
        store,
        "--target",
        target,
        "--database",
        database,
        "--redis",
        redis,
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        *(["--profile"] if profile else []),
    ]


def ingest(args: argparse.Namespace) -> None:
    """imgsift's ingest of a URL list: ``processes`` worker processes, like crawler workers."""
    urls = Path(args.urls).read_text().split()
    job_id = f"bench-{uuid.uuid4().hex[:12]}"
    _create_job(job_id, len(urls), args)  # before the fork: no connection is shared with a child
    # The stage's modules are imported before the fork, as Celery's prefork pool imports the
    # tasks' in the worker's parent: each process pays its imports once in a worker's life, not per run.
    from imgsift_crawler import pipeline

    # As the crawler worker does before its pool forks (worker_init); a --baseline tree may predate it.
    freeze = getattr(pipeline, "freeze_imported", None)
    if freeze is not None:
        freeze()

    parts = [urls[i :: args.processes] for i in range(args.processes)]
    children = []
    for part in parts:
        pid = os.fork()
        if pid == 0:  # a worker: the parent only waits
            try:
                _ingest_part(args, job_id, part)
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
        children.append(pid)
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in children)
    state = _state(args)
    counters = state.counters(job_id)
    state.close()
    print(json.dumps({"job_id": job_id, "counters": counters}))
    if failed:
        raise SystemExit(f"{failed} ingest processes failed")


def _state(args: argparse.Namespace) -> ServiceStateStore:
    """The services' job state: PostgreSQL, with Redis for locks and claims."""
    from imgsift_common.servicestate import ServiceStateStore

    return ServiceStateStore.connect(args.database, args.redis)


def _create_job(job_id: str, n: int, args: argparse.Namespace) -> None:
    from imgsift_common.messages import Job, JobSpec, Limits, SourceKind, SourceSpec

    spec = JobSpec(
        sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://127.0.0.1/bench"])],
        target="any",
        limits=Limits(max_images=n, per_source=n),
    )
    state = _state(args)
    state.create_job(Job(id=job_id, spec=spec))
    state.close()


def _ingest_part(args: argparse.Namespace, job_id: str, urls: list[str]) -> None:
    from imgsift_common.messages import Candidate, SourceKind
    from imgsift_common.storage import LocalStore, ObjectStore, S3Store
    from imgsift_crawler import pipeline
    from imgsift_crawler.fetch import Fetcher
    from imgsift_crawler.pipeline import download_batch
    from imgsift_crawler.settings import CrawlerSettings

    settings = CrawlerSettings(
        storage="local",  # the store is built here; the settings only shape the downloads
        network_allowlist=["127.0.0.1/32"],
        download_concurrency=args.threads,
        per_host_concurrency=args.threads * args.processes,
        per_host_interval=0.0,
    )
    store: ObjectStore
    if args.store == "s3":
        s3 = S3Store(args.target, "bench", "bench-secret", "bench")
        s3.ensure_bucket()
        store = s3
    else:
        store = LocalStore(args.target)
    state = _state(args)
    job = state.get_job(job_id)
    assert job is not None
    fetcher = Fetcher(settings)
    timer = PartTimer() if args.profile else None
    if timer is not None:  # every call the stage makes to the state, the web and the store, timed
        state, fetcher, store = timer.wrap(state, "state"), timer.wrap(fetcher, "web"), timer.wrap(store, "store")
        pipeline.inspect_image = timer.timed(pipeline.inspect_image, "decode check, SHA-256, phash")
    batch = args.threads * 8
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(urls), batch):
        candidates = [Candidate(image_url=u, source=SourceKind.URLS) for u in urls[start : start + batch]]
        with timer.span("download_batch") if timer else nullcontext():
            download_batch(job, candidates, store, state, settings, fetcher)
    if timer is not None:
        timer.add("process CPU", time.process_time() - cpu)
        timer.add("process wall", time.perf_counter() - wall)
        print(PROFILE_LINE + json.dumps(timer.totals), flush=True)


PROFILE_LINE = "profile: "


class PartTimer:
    """Seconds and calls per named part, summed over threads (a part that waits, for a round trip
    or for the GIL, counts its wait): where one ingest process's time goes."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            entry = self.totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def timed(self, fn: Any, name: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            with self.span(name):
                return fn(*a, **k)

        return call

    def wrap(self, target: Any, prefix: str) -> Any:
        timer = self

        class Timed:
            def __getattr__(self, attr: str) -> Any:
                value = getattr(target, attr)
                return timer.timed(value, f"{prefix}.{attr}") if callable(value) else value

        return Timed()


def put_only_command(corpus: Path, s3: str, processes: int, threads: int) -> list[str]:
    args = ["--corpus", str(corpus), "--target", s3, "--processes", str(processes), "--threads", str(threads)]
    return [sys.executable, __file__, "_put_only", *args]


def put_only(args: argparse.Namespace) -> None:
    """The S3 endpoint's own ceiling: the same objects (image + a 1 kB JSON) PUT by the minio
    client from files already on disk, with the same processes and threads, nothing else."""
    files = sorted(Path(args.corpus).glob("*.jpg"))
    children = []
    for part in (files[i :: args.processes] for i in range(args.processes)):
        pid = os.fork()
        if pid == 0:
            try:
                _put_part(args.target, args.threads, part)
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
        children.append(pid)
    if any(os.waitpid(pid, 0)[1] != 0 for pid in children):
        raise SystemExit("a put process failed")


def _put_part(endpoint: str, threads: int, files: list[Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from imgsift_common.storage import S3Store

    store = S3Store(endpoint, "bench", "bench-secret", "bench-put")
    store.ensure_bucket()
    sidecar = json.dumps({"provenance": "x" * 1000}).encode()

    def put(path: Path) -> None:
        store.put(f"put/{path.name}", path.read_bytes(), "image/jpeg")
        store.put(f"put/{path.name}.json", sidecar, "application/json")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))


# ============================================================================ img2dataset


def img2dataset_bin(spec: str) -> Path | None:
    if spec == "skip":
        return None
    if spec != "auto":
        return Path(spec)
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing img2dataset {I2D_VERSION} into {I2D_VENV} (PyPI) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        pip = [str(I2D_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


def img2dataset_command(exe: Path, urls: Path, out: Path, processes: int, threads: int, reencode: bool) -> list[str]:
    args = [
        str(exe),
        "--url_list",
        str(urls),
        "--input_format",
        "txt",
        "--output_format",
        "files",
        "--output_folder",
        str(out),
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--number_sample_per_shard",
        "1000",
        "--timeout",
        "10",
    ]
    return args if reencode else [*args, "--disable_all_reencoding", "True"]


def img2dataset_stored(out: Path) -> int:
    return sum(1 for _ in out.rglob("*.jpg"))


# ============================================================================ main


def compare_hash_drafts(args: argparse.Namespace) -> None:
    """The corpus's perceptual hashes at each JPEG draft size: CPU per image, bits moved, decisions changed."""
    import numpy as np
    from PIL import Image

    from imgsift_crawler.dedup import perceptual_hash

    files = build_corpus(args.photos, args.out / "corpus", args.images, args.min_distance)
    data = [f.read_bytes() for f in files]

    def hashed(content: bytes, draft: int) -> int:
        with Image.open(io.BytesIO(content)) as image:
            image.draft("L", (draft, draft))
            image.load()
            return perceptual_hash(image)

    hashes = {}
    for draft in args.hash_drafts:
        start = time.process_time()
        hashes[draft] = np.array([hashed(d, draft) for d in data], dtype=np.uint64)
        print(f"draft {draft}: decode + hash {1000 * (time.process_time() - start) / len(data):.2f} CPU ms per image")

    def bits(x: np.ndarray) -> np.ndarray:
        return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)

    first = args.hash_drafts[0]
    pairs = {draft: np.concatenate([bits(h[i] ^ h[i + 1 :]) for i in range(len(h) - 1)]) for draft, h in hashes.items()}
    for draft in args.hash_drafts[1:]:
        moved = bits(hashes[first] ^ hashes[draft])
        changed = {d: int(((pairs[first] <= d) != (pairs[draft] <= d)).sum()) for d in range(args.near_distance + 1)}
        print(f"draft {draft} against {first}, {len(data)} images: hash moved {moved.mean():.2f} bits on average, "
              f"{moved.max()} at most; closest pair {pairs[first].min()} -> {pairs[draft].min()} bits; "
              f"decisions changed (distances 0..{args.near_distance}): {sum(changed.values())}")  # fmt: skip


def server_cpu(pg_port: int) -> dict[str, float]:
    """CPU seconds so far of the servers the ingest talks to: this bench's PostgreSQL (its
    postmaster and backends), Redis and nginx (the children of this process)."""
    import psutil

    def cpu(proc: psutil.Process) -> float:
        """Its CPU seconds and those of its children that ended (PostgreSQL's backends end with their connections)."""
        try:
            times = proc.cpu_times()
            return float(times.user + times.system + times.children_user + times.children_system)
        except psutil.Error:
            return 0.0

    found = {"PostgreSQL": 0.0, "Redis": 0.0, "nginx": 0.0}
    for proc in psutil.Process().children(recursive=True):
        name = proc.name()
        if name.startswith("redis"):
            found["Redis"] += cpu(proc)
        elif name.startswith("nginx"):
            found["nginx"] += cpu(proc)
    for proc in psutil.process_iter(["cmdline"]):
        if f"-p {pg_port} " in " ".join(proc.info["cmdline"] or []) and proc.name() == "postgres":
            found["PostgreSQL"] += cpu(proc) + sum(cpu(c) for c in proc.children(recursive=True))
    return found


def profile_ingest(args: argparse.Namespace) -> None:
    """One imgsift ingest into the local store with every call of the stage timed: where the time goes."""
    files = build_corpus(args.photos, args.out / "corpus", args.images, args.min_distance)
    with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with (
            web_server(args.out / "corpus", tmp) as (base, server),
            postgres_server() as pg,
            redis_server(tmp) as redis,
        ):
            urls = tmp / "urls.txt"
            urls.write_text("".join(f"{base}/{f.name}\n" for f in files))
            stores = (migrated_database(pg, tmp), redis)
            command = ingest_command(urls, "local", str(tmp / "local"), stores, args.processes, args.threads, True)
            before = server_cpu(pg.port)
            measured = run_measured(command, cwd=tmp)
            after = server_cpu(pg.port)
    lines = str(measured["output"]).splitlines()
    totals: dict[str, list[float]] = {}
    for line in lines:
        if line.startswith(PROFILE_LINE):
            for name, (calls, seconds) in json.loads(line.removeprefix(PROFILE_LINE)).items():
                entry = totals.setdefault(name, [0, 0.0])
                entry[0] += calls
                entry[1] += seconds
    stored = json.loads(lines[-1])["counters"].get("downloaded", 0)
    wall = float(measured["seconds"])
    print(f"{stored}/{len(files)} stored in {wall:.1f} s ({stored / wall:.0f} images/s), served by {server}; "
          f"{args.processes} processes x {args.threads} threads")  # fmt: skip
    threads = args.processes * args.threads
    busy = totals.pop("download_batch")[1] * args.threads  # thread-seconds the pools had
    print(f"\n{'part (summed over threads)':44} {'calls':>7} {'ms/call':>8} {'thread-s':>9} {'share':>6}")
    for name, (calls, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        if name.startswith("process"):
            continue
        share = f"{100 * seconds / busy:5.1f}%"
        print(f"{name:44} {int(calls):7d} {1000 * seconds / calls:8.2f} {seconds:9.2f} {share:>6}")
    print(f"(share: of the {threads} download threads' time, {busy:.0f} thread-s)\n")
    print("CPU seconds per image, by process:")
    print(f"  imgsift ingest processes  {1000 * totals['process CPU'][1] / stored:6.2f} ms")
    for name in before:
        print(f"  {name:24}  {1000 * (after[name] - before[name]) / stored:6.2f} ms")
    print(f"  (wall time per image x {os.cpu_count()} CPUs: {1000 * wall * (os.cpu_count() or 1) / stored:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes, for both tools")
    parser.add_argument("--threads", type=int, default=16, help="download threads per process, for both tools")
    parser.add_argument(
        "--photos",
        type=Path,
        default=Path(os.environ.get("IMGSIFT_BENCH_PHOTOS", ROOT.parent / "shared" / "data" / "coco128" / "images")),
        help="real photos the corpus is cut from (default: ../shared/data/coco128/images)",
    )
    parser.add_argument("--min-distance", type=int, default=10, help="perceptual-hash bits between corpus images")
    parser.add_argument("--img2dataset", default="auto", help="'auto' (install into .bench), a path, or 'skip'")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--hash-drafts", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="compare the perceptual hash at these JPEG draft sizes instead (e.g. 256,64)")  # fmt: skip
    parser.add_argument("--near-distance", type=int, default=6, help="--hash-drafts: decisions up to this distance")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=None,
                        help=f"only these runs, of {','.join(RUN_KEYS)} (default: all)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="run the runs this many times, alternating; medians")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of another tree: its ingest (local store) runs too, back to back")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="only an imgsift ingest (local store), every call of the stage timed")  # fmt: skip
    args = parser.parse_args()
    if args.hash_drafts:
        return compare_hash_drafts(args)
    if args.profile:
        return profile_ingest(args)

    args.out.mkdir(parents=True, exist_ok=True)
    corpus_dir = args.out / "corpus"
    print(f"corpus: {args.images} distinct JPEGs from {args.photos} ...", flush=True)
    files = build_corpus(args.photos, corpus_dir, args.images, args.min_distance)
    corpus_bytes = sum(f.stat().st_size for f in files)
    i2d = img2dataset_bin(args.img2dataset)
    with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with web_server(corpus_dir, tmp) as (base, server), service_stores(tmp) as stores, s3_server() as s3:
            urls = tmp / "urls.txt"
            urls.write_text("".join(f"{base}/{f.name}\n" for f in files))
            quarter = tmp / "urls-quarter.txt"
            quarter.write_text("".join(f"{base}/{f.name}\n" for f in files[: len(files) // 4]))
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench-secret",
                "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations would ask PyPI for a newer version
            }
            p, t, n = args.processes, args.threads, len(files)
            runs: list[tuple[str, str, list[str], int, dict[str, str]]] = [  # key, name, command, images, env
                ("local", LOCAL, ingest_command(urls, "local", str(tmp / "local"), stores, p, t), n, env),
                ("s3", S3, ingest_command(urls, "s3", s3, stores, p, t), n, env),
            ]
            if args.baseline is not None:
                tree = args.baseline.resolve()
                baseline_env = {**env, "PYTHONPATH": os.pathsep.join(str(tree / d) for d in PACKAGE_DIRS)}
                command = ingest_command(urls, "local", str(tmp / "local-baseline"), stores, p, t)
                runs.insert(1, ("baseline", BASELINE, command, n, baseline_env))
            if i2d is not None:
                runs += [
                    ("i2d-default", I2D_DEFAULT, img2dataset_command(i2d, urls, tmp / "i2d", p, t, True), n, env),
                    ("i2d-raw", I2D_RAW, img2dataset_command(i2d, urls, tmp / "i2d-raw", p, t, False), n, env),
                ]
            runs.append(("s3-alone", S3_CEILING, put_only_command(corpus_dir, s3, p, t), n, env))
            local_quarter = ingest_command(quarter, "local", str(tmp / "local-q"), stores, p, t)
            runs.append(("quarter", QUARTER, local_quarter, n // 4, env))
            runs = [run for run in runs if args.only is None or run[0] in args.only]
            outputs = {
                LOCAL: tmp / "local", BASELINE: tmp / "local-baseline", I2D_DEFAULT: tmp / "i2d",
                I2D_RAW: tmp / "i2d-raw", QUARTER: tmp / "local-q",
            }  # fmt: skip
            every: dict[str, list[dict[str, float]]] = {}
            for repetition in range(args.repeat):
                for _, name, command, n, run_env in runs:
                    shutil.rmtree(outputs.get(name, tmp / "none"), ignore_errors=True)  # each run starts empty
                    print(f"running: {name} ({repetition + 1} of {args.repeat}) ...", flush=True)
                    measured = run_measured(command, env=run_env, cwd=tmp)
                    output = str(measured.pop("output"))
                    if name.startswith("imgsift"):
                        counters = json.loads(output.strip().splitlines()[-1])["counters"]
                        stored = int(counters.get("downloaded", 0))
                        measured["failed"] = int(counters.get("failed", 0))
                        measured["duplicates"] = int(counters.get("duplicates", 0))
                    elif name == S3_CEILING:
                        stored = n
                    else:
                        stored = img2dataset_stored(outputs[name])
                    measured.update(images=n, stored=stored, images_per_second=stored / measured["seconds"])
                    measured["cpu_ms_per_image"] = 1000 * measured["cpu_seconds"] / max(1, stored)
                    every.setdefault(name, []).append(measured)
                    print(
                        f"  {stored}/{n} stored in {measured['seconds']:.1f} s: "
                        f"{measured['images_per_second']:.0f} images/s, "
                        f"{measured['cpu_ms_per_image']:.2f} CPU ms per image, "
                        f"peak {measured['peak_rss_mb']:.0f} MB",
                        flush=True,
                    )

    # With --repeat, each figure is the median of its runs (the runs alternate, so load that
    # comes and goes on a shared machine falls on every tool alike).
    results = {name: {key: statistics.median(m[key] for m in ms) for key in ms[0]} for name, ms in every.items()}
    ips = {k: v["images_per_second"] for k, v in results.items()}
    ratios: dict[str, float | list[float]] = {}
    for mine in (LOCAL, BASELINE, S3):
        for theirs, label in ((I2D_DEFAULT, "img2dataset default"), (I2D_RAW, "img2dataset no re-encoding")):
            if mine in ips and theirs in ips:
                ratios[f"{mine} / {label}"] = ips[mine] / ips[theirs]
                if args.repeat > 1:  # each repetition's own ratio: how far the noise moves it
                    pairs = zip(every[mine], every[theirs], strict=True)
                    ratios[f"{mine} / {label}, each repetition"] = [
                        a["images_per_second"] / b["images_per_second"] for a, b in pairs
                    ]
    if LOCAL in ips and BASELINE in ips:
        ratios[f"{LOCAL} / {BASELINE}"] = ips[LOCAL] / ips[BASELINE]
    if S3 in ips and S3_CEILING in ips:
        ratios[f"{S3} / S3 (moto) alone"] = ips[S3] / ips[S3_CEILING]
    if LOCAL in results and QUARTER in results:
        full, part = results[LOCAL], results[QUARTER]
        ratios["imgsift peak memory, all / a quarter of the images"] = full["peak_rss_mb"] / part["peak_rss_mb"]
    report = {
        "images": len(files),
        "corpus_mb": corpus_bytes / 2**20,
        "server": server,
        "processes": args.processes,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "baseline": str(args.baseline) if args.baseline else None,
        "results": results,
        "every_run": every,
        "ratios": ratios,
    }
    (args.out / "crawl_bench.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{len(files)} images ({corpus_bytes / 2**20:.0f} MB) served by {server}; "
        f"{args.processes} processes x {args.threads} threads each"
    )
    print(f"{'run':48} {'images/s':>9} {'CPU ms/image':>13} {'peak MB':>8}")
    for name, r in results.items():
        print(f"{name:48} {r['images_per_second']:9.0f} {r['cpu_ms_per_image']:13.2f} {r['peak_rss_mb']:8.0f}")
    print()
    for name, value in ratios.items():
        shown = ", ".join(f"{v:.2f}x" for v in value) if isinstance(value, list) else f"{value:5.2f}x"
        print(f"{name:72} {shown}")
    print(f"\nwritten to {args.out / 'crawl_bench.json'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_ingest":
        p = argparse.ArgumentParser()
        for flag in ("--urls", "--store", "--target", "--database", "--redis"):
            p.add_argument(flag, required=True)
        p.add_argument("--processes", type=int, required=True)
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--profile", action="store_true")
        ingest(p.parse_args(sys.argv[2:]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_put_only":
        p = argparse.ArgumentParser()
        for flag in ("--corpus", "--target"):
            p.add_argument(flag, required=True)
        p.add_argument("--processes", type=int, required=True)
        p.add_argument("--threads", type=int, required=True)
        put_only(p.parse_args(sys.argv[2:]))
    else:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        main()
