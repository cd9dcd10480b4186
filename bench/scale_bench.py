"""Scaling and end to end: real jobs through the whole stack as local processes.

    .venv/bin/python bench/scale_bench.py                        # scaling: 600 images, 1 then 2 workers per stage
    .venv/bin/python bench/scale_bench.py --e2e --images 2000    # end to end: one 2,000-image job, compose topology
    # issue 18: the same job with the Siamese trunk in torch, then exported (OpenVINO, bf16)
    .venv/bin/python bench/scale_bench.py --e2e --images 2000 --siamese-export none,openvino-bf16 \
        --detector-export openvino

Both modes start what ``tests/support/stack.py`` starts for the system tests (the API under
uvicorn and Celery workers with docker-compose.yml's commands and environment, each its own
process group), after compose's one-shot migrate step, against a PostgreSQL of the bench's
own (in a temp dir; an empty database per run), a Redis server and moto's S3 server (a
separate process, so the bench's own threads do not share its interpreter) on free loopback
ports. The images are ``--images`` distinct JPEGs cut from real photos (COCO128: random
crops, flips, sizes and qualities, pairwise more than 10 perceptual-hash bits apart, so
nothing is dropped as a near-duplicate; ``crawl_bench.build_corpus``), served over HTTP on 127.0.0.1, and the job
lists their URLs (a ``urls`` source) with target ``--target`` (default ``any``: every object
YOLOv8n finds is cropped and scored). Politeness limits are lifted (one host serves
everything): per-host concurrency 64, no interval.

Scaling (the default): for 1 and for 2 worker processes (replicas, like ``docker compose up
--scale``) per stage, one job is run stage by stage: the crawler(s) first, alone, until every
URL has an outcome; then the detector(s), alone, over the queued images; then the Siamese
worker(s) over the queued crops. Each stage so has the whole machine, and its rate is read
from the job's counters in PostgreSQL (sampled every 0.2 s) from the first counted result to
the last, so worker start-up and model loading stay out of it. The crawler's stall re-sending is
switched off (``IMGSIFT_CRAWLER_STALL_SECONDS``) while later stages wait on purpose.

End to end (``--e2e``): every service starts at once (``--replicas`` per worker stage, 1 by
default: the compose file's topology), then one job runs with all stages overlapping; the
figure is stored images per second from job creation to completion. ``--siamese-export
none,openvino`` runs the same job once per value of ``IMGSIFT_SIAMESE_EXPORT`` (``openvino-bf16``: with
``IMGSIFT_SIAMESE_EXPORT_PRECISION=bf16``; each on a
database of its own, the same code, corpus and servers), one after the other, and prints the
images per second of each against the first; the export is made once beforehand (in
``--out``/siamese-exports), so no job waits for it.

Both report, per stage: items, images (or crops) per second, busy time (the sum of the
stage's task run times, from each worker's Prometheus histogram
``imgsift_task_duration_seconds``, scraped on its ``IMGSIFT_METRICS_PORT``), CPU seconds, and
the peak memory of each worker's process tree (the main process and its pool children;
resident set summed every 0.5 s, proportional set every 5 s: PSS counts pages the prefork
children share with their parent once). ``--e2e`` also reports the CPU seconds the bench's
servers spent during the job (PostgreSQL, Redis, moto: the job's work that no imgsift process
counts) and those of the whole machine (anything running on it, so whether the job left cores
idle). ``--env NAME=VALUE`` gives the services a setting as compose's ``.env`` would (e.g.
``IMGSIFT_DETECTOR_PIPELINE_STEP``), to compare settings on the same bench. Results go to
``--out`` (``bench-out/scale/``) as JSON and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from crawl_bench import build_corpus, free_port, postgres_server, redis_server, s3_server, web_server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imgsift_common.servicestate import ServiceStateStore  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.stack import Stack, compose_file  # noqa: E402

API_KEY = "isk_scalebench_0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STAGES = ("crawl", "detect", "siamese")
# The task whose run times are a stage's busy time (the crawler's discover ticks are reported apart).
STAGE_COUNTER = {"crawl": "downloaded", "detect": "detected", "siamese": "compared"}
STAGE_TASK = {"crawl": "crawler.download", "detect": "detector.detect", "siamese": "siamese.compare"}
SERVICE_OF = {"crawl": "crawler", "detect": "detector", "siamese": "siamese"}
UNIT = {"crawl": "images", "detect": "images", "siamese": "crops"}


# ============================================================================ sampling


def server_processes(ports: dict[str, int]) -> dict[str, psutil.Process]:
    """The root process of each server the bench started (PostgreSQL's postmaster, Redis, moto), found
    by the port on its command line: their CPU is the job's too, though no imgsift process spends it."""
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        command = " ".join(proc.info["cmdline"] or [])
        for name, port in ports.items():
            if name not in found and re.search(rf"(-p |--port |:){port}\b", command):
                found[name] = proc
    return found


def task_slots(service: str) -> int:
    """Tasks one worker of ``service`` runs at once: its compose command's ``--concurrency`` (crawler 4,
    detector 2 threads sharing one model, Siamese 1)."""
    command = compose_file()["services"][service]["command"]
    return int(command[command.index("--concurrency") + 1]) if "--concurrency" in command else 1


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent on anything (other engineers' work included)."""
    times = psutil.cpu_times()._asdict()
    # Linux counts guest time in user time already; idle, waiting on I/O and stolen by the host are not work.
    return sum(times.values()) - sum(times.get(k, 0.0) for k in ("idle", "iowait", "steal", "guest", "guest_nice"))


class Sampler(threading.Thread):
    """Peak memory and CPU time of each process tree of the stack and of the bench's servers, and the
    API's queue depths."""

    def __init__(self, stack: Stack, api: str, servers: dict[str, psutil.Process] | None = None) -> None:
        super().__init__(daemon=True)
        self.stack, self.api = stack, api
        self.servers = servers or {}
        self.done = threading.Event()
        self.peak_rss: dict[str, int] = {}
        self.peak_pss: dict[str, int] = {}
        self.cpu: dict[str, dict[int, float]] = {}  # name -> pid -> user+system seconds, last seen
        self.cpu_first: dict[str, dict[int, float]] = {}  # name -> pid -> user+system seconds, first seen
        self.peak_queue: dict[str, float] = {}

    def run(self) -> None:
        tick = 0
        while not self.done.is_set():
            full = tick % 10 == 0
            roots = [(name, proc.pid) for name, proc in list(self.stack.procs.items())]
            roots += [(name, proc.pid) for name, proc in self.servers.items()]
            for name, pid in roots:
                try:
                    root = psutil.Process(pid)
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                rss = pss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                        if full:
                            pss += p.memory_full_info().pss
                        times = p.cpu_times()
                        self.cpu.setdefault(name, {})[p.pid] = times.user + times.system
                        self.cpu_first.setdefault(name, {}).setdefault(p.pid, times.user + times.system)
                    except psutil.Error:
                        pass
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
                if full:
                    self.peak_pss[name] = max(self.peak_pss.get(name, 0), pss)
            if tick % 2 == 0:
                try:
                    metrics = scrape(f"{self.api}/metrics")
                    for (metric, labels), value in metrics.items():
                        if metric == "imgsift_queue_depth":
                            queue = dict(labels)["queue"]
                            self.peak_queue[queue] = max(self.peak_queue.get(queue, 0), value)
                except httpx.HTTPError:
                    pass
            tick += 1
            self.done.wait(0.5)

    def stop(self) -> None:
        self.done.set()
        self.join()

    def cpu_seconds(self, name: str) -> float:
        return sum(self.cpu.get(name, {}).values())

    def cpu_seconds_seen(self, name: str) -> float:
        """CPU seconds of a tree while sampled (a server's, which ran before this job)."""
        first = self.cpu_first.get(name, {})
        return sum(t - first.get(pid, t) for pid, t in self.cpu.get(name, {}).items())


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def worker_stage_metrics(stack: Stack) -> dict[str, dict[str, float]]:
    """Busy seconds and tasks per task, and items per stage, summed over the workers' Prometheus metrics."""
    busy: dict[str, float] = {}
    tasks: dict[str, float] = {}
    items: dict[str, float] = {}
    for name, port in stack.metrics_ports.items():
        if name not in stack.procs:
            continue
        for (metric, labels), value in scrape(f"http://127.0.0.1:{port}/metrics").items():
            tags = dict(labels)
            if metric == "imgsift_task_duration_seconds_sum":
                busy[tags["task"]] = busy.get(tags["task"], 0.0) + value
            elif metric == "imgsift_task_duration_seconds_count":
                tasks[tags["task"]] = tasks.get(tags["task"], 0.0) + value
            elif metric == "imgsift_stage_items_total":
                items[tags["stage"]] = items.get(tags["stage"], 0.0) + value
    out = {
        stage: {
            "busy_seconds": busy.get(STAGE_TASK[stage], 0.0),
            "tasks": tasks.get(STAGE_TASK[stage], 0.0),
            "task_items": items.get(stage, 0.0),
        }
        for stage in STAGES
    }
    out["crawl"]["discover_busy_seconds"] = busy.get("crawler.discover", 0.0)
    return out


# ============================================================================ the job


def references(photos: Path, n: int = 3) -> list[tuple[str, bytes]]:
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[-n:]
    return [(p.name, p.read_bytes()) for p in files]


def create_job(api: str, urls: list[str], args: argparse.Namespace) -> str:
    spec = {
        "target": args.target,
        "threshold": args.threshold,
        "sources": [{"kind": "urls", "urls": urls}],
        "limits": {"max_images": len(urls), "per_source": len(urls)},
    }
    files = [("references", (name, data, "image/jpeg")) for name, data in references(args.photos)]
    response = httpx.post(f"{api}/v1/jobs", data={"spec": json.dumps(spec)}, files=files, headers=AUTH, timeout=120)
    if response.status_code != 201:
        raise SystemExit(f"job not created: {response.status_code} {response.text[:2000]}")
    return str(response.json()["id"])


def url_outcomes(c: dict[str, int]) -> int:
    return c.get("downloaded", 0) + c.get("duplicates", 0) + c.get("failed", 0) + c.get("skipped", 0)


def compared(c: dict[str, int]) -> int:
    return c.get("compared", 0) + c.get("compare_failed", 0)


def watch(
    state: ServiceStateStore,
    stack: Stack,
    job_id: str,
    value: Callable[[dict[str, int]], int],
    target: Callable[[dict[str, int]], int],
    timeout: float,
) -> dict[str, float]:
    """Wait until ``value(counters) >= target(counters)``; the stage's rate from its counters.

    ``steady_per_second`` counts from the first result seen to the last, so the stage's
    start-up (worker imports, model loading, the first batch) stays out of it.
    """
    start = time.monotonic()
    initial = value(state.counters(job_id))
    first: tuple[float, int] | None = None
    while True:
        counters = state.counters(job_id)
        now, v = time.monotonic(), value(counters)
        if first is None and v > initial:
            first = (now, v)
        if v >= target(counters) and (first is not None or v > 0):
            break
        if now - start > timeout:
            raise SystemExit(f"stage not done after {timeout:.0f} s: {counters}")
        stack.check_alive()
        time.sleep(0.2)
    t_first, v_first = first or (now, v)
    steady = (v - v_first) / (now - t_first) if now > t_first and v > v_first else float("nan")
    return {
        "items": v,
        "seconds": now - start,
        "per_second": v / (now - start),
        "steady_seconds": now - t_first,
        "steady_per_second": steady,
    }


def wait_final(state: ServiceStateStore, stack: Stack, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = state.get_job(job_id)
        if job is not None and job.state.is_final:
            return str(job.state.value)
        stack.check_alive()
        time.sleep(0.2)
    raise SystemExit(f"job {job_id} not final after {timeout:.0f} s: {state.counters(job_id)}")


# ============================================================================ runs


def stack_env(database: str, redis: str, s3: str, tmp: Path, args: argparse.Namespace, staged: bool) -> dict[str, str]:
    env = {
        "IMGSIFT_DATABASE_URL": database,
        # Compose builds the URL above from it; the bench's server trusts local connections.
        "IMGSIFT_POSTGRES_PASSWORD": "unused",
        "IMGSIFT_REDIS_URL": redis,
        "IMGSIFT_S3_ACCESS_KEY": "bench",
        "IMGSIFT_S3_SECRET_KEY": "bench-secret",
        "IMGSIFT_S3_ENDPOINT": s3,
        "IMGSIFT_S3_BUCKET": "scale-bench",
        "IMGSIFT_API_BOOTSTRAP_KEY": API_KEY,
        "IMGSIFT_API_RATE_LIMIT": "100000/minute",
        "IMGSIFT_DETECTOR_WEIGHTS": str(args.weights),
        "IMGSIFT_DETECTOR_DEVICE": "cpu",
        "IMGSIFT_SIAMESE_DEVICE": "cpu",
        "IMGSIFT_CRAWLER_NETWORK_ALLOWLIST": '["127.0.0.1/32"]',
        "IMGSIFT_CRAWLER_PER_HOST_CONCURRENCY": "64",
        "IMGSIFT_CRAWLER_PER_HOST_INTERVAL": "0",
        "UVICORN_HOST": "127.0.0.1",
        "UVICORN_PORT": str(free_port()),
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    if args.store == "local":
        env.update(IMGSIFT_STORAGE="local", IMGSIFT_LOCAL_STORAGE_DIR=str(tmp / "objects"))
    if staged:  # later stages wait on purpose: no re-sending of their "stalled" work meanwhile
        env["IMGSIFT_CRAWLER_STALL_SECONDS"] = "86400"
    env.update(args.env)
    return env


def start(stack: Stack, service: str, replicas: int) -> None:
    for i in range(replicas):
        stack.start(service, name=service if replicas == 1 else f"{service}-{i + 1}")


def memory_report(stack_names: list[str], sampler: Sampler) -> dict[str, dict[str, float]]:
    return {
        name: {
            "peak_rss_mb": sampler.peak_rss.get(name, 0) / 2**20,
            "peak_pss_mb": sampler.peak_pss.get(name, 0) / 2**20,
            "cpu_seconds": sampler.cpu_seconds(name),
        }
        for name in stack_names
    }


def run_staged(replicas: int, urls: list[str], base_env: dict[str, str], tmp: Path, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    logdir = tmp / f"logs-staged-{replicas}"
    logdir.mkdir()
    stack = Stack(env={**base_env, "UVICORN_PORT": str(free_port())}, logdir=logdir)
    api = f"http://127.0.0.1:{stack.env['UVICORN_PORT']}"
    state = ServiceStateStore.connect(base_env["IMGSIFT_DATABASE_URL"], base_env["IMGSIFT_REDIS_URL"])
    sampler = Sampler(stack, api)
    names: list[str] = []
    try:
        stack.migrate()  # compose's one-shot step, before any service starts
        stack.start("api")
        start(stack, "crawler", replicas)
        stack.wait_ready(api, timeout=300)
        sampler.start()
        job_id = create_job(api, urls, args)
        print(f"  job {job_id}: crawl ({replicas} crawler worker(s)) ...", flush=True)
        stages: dict[str, dict[str, float]] = {}
        stages["crawl"] = watch(state, stack, job_id, url_outcomes, lambda c: len(urls), args.timeout)
        print(f"  detect ({replicas} detector worker(s)) ...", flush=True)
        start(stack, "detector", replicas)
        stages["detect"] = watch(
            state, stack, job_id, lambda c: c.get("detected", 0), lambda c: c.get("downloaded", 0), args.timeout
        )
        print(f"  siamese ({replicas} Siamese worker(s)) ...", flush=True)
        start(stack, "siamese", replicas)
        stages["siamese"] = watch(state, stack, job_id, compared, lambda c: c.get("crops", 0), args.timeout)
        final = wait_final(state, stack, job_id, args.timeout)
        busy = worker_stage_metrics(stack)
        names = list(stack.procs)
    finally:
        sampler.stop()
        stack.stop_all()
    counters = state.counters(job_id)
    state.close()
    for stage in STAGES:
        stages[stage].update(busy[stage])
        trees = [n for n in names if n.split("-")[0] == SERVICE_OF[stage]]
        stages[stage]["cpu_seconds"] = sum(sampler.cpu_seconds(n) for n in trees)
    return {
        "replicas": replicas,
        "job": job_id,
        "state": final,
        "counters": counters,
        "stages": stages,
        "processes": memory_report(names, sampler),
        "peak_queue_depth": sampler.peak_queue,
    }


def make_export(env: dict[str, str], module: str, expression: str, imports: str) -> None:
    """Make a stage's export into the cache its worker will read (loading its model as the worker does, with
    ``env``), in a process of its own, so that no job's time includes it."""
    code = f"from {module} import *; {imports}; print({expression})"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, capture_output=True)


def run_e2e(
    urls: list[str],
    base_env: dict[str, str],
    tmp: Path,
    args: argparse.Namespace,
    logs: str = "logs-e2e",
    server_ports: dict[str, int] | None = None,
) -> dict:  # type: ignore[type-arg]
    logdir = tmp / logs
    logdir.mkdir()
    stack = Stack(env=base_env, logdir=logdir)
    api = f"http://127.0.0.1:{stack.env['UVICORN_PORT']}"
    state = ServiceStateStore.connect(base_env["IMGSIFT_DATABASE_URL"], base_env["IMGSIFT_REDIS_URL"])
    servers = server_processes(server_ports or {})
    sampler = Sampler(stack, api, servers)
    try:
        stack.migrate()  # compose's one-shot step, before any service starts
        stack.start("api")
        for service in ("crawler", "detector", "siamese"):
            start(stack, service, args.replicas)
        stack.wait_ready(api, timeout=300)
        sampler.start()
        t0, machine0 = time.monotonic(), machine_busy_seconds()
        job_id = create_job(api, urls, args)
        print(f"  job {job_id}: every stage at once ...", flush=True)
        done: dict[str, float] = {}
        while True:
            c = state.counters(job_id)
            now = time.monotonic() - t0
            if "crawl" not in done and url_outcomes(c) >= len(urls):
                done["crawl"] = now
            if "crawl" in done and "detect" not in done and c.get("detected", 0) >= c.get("downloaded", 0):
                done["detect"] = now
            job = state.get_job(job_id)
            if job is not None and job.state.is_final:
                done["siamese"] = now
                final = job.state.value
                break
            if now > args.timeout:
                raise SystemExit(f"job not done after {args.timeout:.0f} s: {c}")
            stack.check_alive()
            time.sleep(0.2)
        wall, machine = time.monotonic() - t0, machine_busy_seconds() - machine0
        busy = worker_stage_metrics(stack)
        names = list(stack.procs)
    finally:
        sampler.stop()
        stack.stop_all()
    counters = state.counters(job_id)
    state.close()
    stages = {}
    for stage in STAGES:
        trees = [n for n in names if n.split("-")[0] == SERVICE_OF[stage]]
        workers = args.replicas * task_slots(SERVICE_OF[stage])  # busy time adds up every slot's
        stages[stage] = {
            "items": counters.get(STAGE_COUNTER[stage], 0),
            **busy[stage],
            "done_after_seconds": done.get(stage, float("nan")),
            "cpu_seconds": sum(sampler.cpu_seconds(n) for n in trees),
            "busy_fraction": busy[stage]["busy_seconds"] / (wall * workers),
        }
    return {
        "replicas": args.replicas,
        "job": job_id,
        "state": final,
        "counters": counters,
        "wall_seconds": wall,
        "images_per_second": counters.get("downloaded", 0) / wall,
        "stages": stages,
        "processes": memory_report(names, sampler),
        "peak_queue_depth": sampler.peak_queue,
        "server_cpu_seconds": {name: sampler.cpu_seconds_seen(name) for name in servers},
        "machine_cpu_seconds": machine,
    }


# ============================================================================ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--e2e", action="store_true", help="one job, every stage at once (default: the scaling runs)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--replicas", type=int, default=1, help="--e2e: worker processes per stage")
    parser.add_argument("--scale", default="1,2", help="scaling: worker processes per stage to compare")
    parser.add_argument("--target", default="any", help="the job's target (a class, a supercategory or 'any')")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--store", choices=("s3", "local"), default="s3", help="s3: moto's S3 server (default)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a stage (or the e2e job) may take")
    parser.add_argument(
        "--photos",
        type=Path,
        default=Path(os.environ.get("IMGSIFT_BENCH_PHOTOS", ROOT.parent / "shared" / "data" / "coco128" / "images")),
        help="real photos the images are cut from (default: ../shared/data/coco128/images)",
    )
    parser.add_argument("--weights", type=Path, default=ROOT.parent / "shared" / "models" / "yolov8n.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "scale")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the services, as compose's .env gives it (IMGSIFT_DETECTOR_BATCH_SIZE=4); repeatable",
    )
    parser.add_argument("--report", type=Path, help="print the tables of a JSON file this bench wrote, and stop")
    parser.add_argument(
        "--detector-export", default="none", help="IMGSIFT_DETECTOR_EXPORT of every run (made once beforehand)"
    )
    parser.add_argument(
        "--siamese-export",
        default="",
        help="--e2e: one job per IMGSIFT_SIAMESE_EXPORT, e.g. none,openvino,openvino-bf16",
    )
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return
    if not args.weights.is_file():
        raise SystemExit(f"no YOLO weights at {args.weights} (--weights)")

    args.out.mkdir(parents=True, exist_ok=True)
    # The corpus crawl_bench builds (2,000 images, 10 bits apart) serves any prefix: a subset of
    # pairwise-distinct images is pairwise distinct.
    corpus_dir = ROOT / "bench-out" / "corpus" if args.images <= 2000 else args.out / f"corpus-{args.images}"
    print(f"corpus: distinct JPEGs from {args.photos} in {corpus_dir} ...", flush=True)
    files = build_corpus(args.photos, corpus_dir, max(args.images, 2000), 10)[: args.images]
    load = os.getloadavg()
    report: dict[str, Any] = {
        "mode": "e2e" if args.e2e else "scaling",
        "images": len(files),
        "corpus_mb": sum(f.stat().st_size for f in files) / 2**20,
        "target": args.target,
        "store": args.store,
        "detector_export": args.detector_export,
        "env": args.env,
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp_name, ExitStack() as servers:
        tmp = Path(tmp_name)
        base, server = servers.enter_context(web_server(corpus_dir, tmp))
        postgres: PostgresServer = servers.enter_context(postgres_server())
        redis = servers.enter_context(redis_server(tmp))
        s3 = servers.enter_context(s3_server())
        report["server"] = server
        urls = [f"{base}/{f.name}" for f in files]
        if args.e2e:
            exports = [e for e in args.siamese_export.split(",") if e] or [""]
            report["runs_by_siamese_export"] = {}
            for export in exports:
                label = f", IMGSIFT_SIAMESE_EXPORT={export}" if export else ""
                print(f"end to end: {len(urls)} images, {args.replicas} worker(s) per stage{label}", flush=True)
                # An empty database: the stack's migrate step gives it its schema.
                env = stack_env(postgres.create_database(migrated=False), redis, s3, tmp, args, staged=False)
                if args.detector_export != "none":
                    env.update(
                        IMGSIFT_DETECTOR_EXPORT=args.detector_export,
                        IMGSIFT_DETECTOR_EXPORT_DIR=str(args.out / "detector-exports"),
                    )
                    make_export(env, "imgsift_detector.model", "detector_from_settings(DetectorSettings()).model_path",
                                "from imgsift_detector.settings import DetectorSettings")  # fmt: skip
                if export:
                    fmt, _, precision = export.partition("-")  # openvino-bf16: the OpenVINO trunk in bf16
                    env.update(IMGSIFT_SIAMESE_EXPORT=fmt, IMGSIFT_SIAMESE_EXPORT_DIR=str(args.out / "siamese-exports"))
                    if precision:
                        env["IMGSIFT_SIAMESE_EXPORT_PRECISION"] = precision
                    if export != "none":
                        make_export(env, "imgsift_siamese.embed", "get_embedder(SiameseSettings()).trunk.name",
                                    "from imgsift_siamese.settings import SiameseSettings")  # fmt: skip
                ports = {"postgres": postgres.port, "redis": int(redis.rsplit(":", 1)[1].split("/")[0])}
                if args.store == "s3":
                    ports["s3 (moto)"] = int(s3.rsplit(":", 1)[1])
                report["run"] = run_e2e(urls, env, tmp, args, f"logs-e2e-{export or 'default'}", ports)
                report["runs_by_siamese_export"][export or "default"] = report["run"]
        else:
            report["runs"] = {}
            for replicas in (int(r) for r in args.scale.split(",")):
                print(f"scaling: {len(urls)} images, {replicas} worker(s) per stage, one stage at a time", flush=True)
                database = postgres.create_database(migrated=False)  # each run's own, migrated by its stack
                env = stack_env(database, redis, s3, tmp, args, staged=True)
                report["runs"][str(replicas)] = run_staged(replicas, urls, env, tmp, args)
    report["load_average_at_end"] = os.getloadavg()
    name = "e2e_bench.json" if args.e2e else "scale_bench.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwritten to {args.out / name}")


def print_report(report: dict[str, Any]) -> None:
    load = report["load_average_at_start"][0]
    print(
        f"\n{report['images']} images ({report['corpus_mb']:.0f} MB), target {report['target']!r}, "
        f"store {report['store']}, {report['cpus']} CPUs, load average {load:.1f} at start, "
        f"{report['load_average_at_end'][0]:.1f} at the end"
    )
    if report["mode"] == "e2e":
        runs = report.get("runs_by_siamese_export") or {"default": report["run"]}
        first = next(iter(runs.values()))
        for label, run in runs.items():
            if len(runs) > 1:
                ratio = run["images_per_second"] / first["images_per_second"]
                print(f"\n== IMGSIFT_SIAMESE_EXPORT={label}: {ratio:.2f}x the images per second of {next(iter(runs))}")
            print_e2e(run)
        return
    runs = report["runs"]
    keys = list(runs)
    print(f"\n{'stage':8} {'unit':7} " + " ".join(f"{k + ' worker(s)/s':>14}" for k in keys) + f" {'ratio':>7}")
    for stage in STAGES:
        rates = [runs[k]["stages"][stage]["steady_per_second"] for k in keys]
        ratio = rates[-1] / rates[0] if len(rates) > 1 and rates[0] else float("nan")
        print(f"{stage:8} {UNIT[stage]:7} " + " ".join(f"{r:14.2f}" for r in rates) + f" {ratio:6.2f}x")
    for k in keys:
        print(f"\n{k} worker(s) per stage (cores: the stage's CPU seconds / its seconds, start-up included):")
        header = f"{'stage':8} {'items':>7} {'steady s':>9} {'stage s':>8} {'busy s':>8} {'CPU s':>8}"
        print(f"{header} {'CPU s/item':>11} {'cores':>6}")
        for stage, s in runs[k]["stages"].items():
            busy, cpu, items = s["busy_seconds"], s["cpu_seconds"], s["items"]
            print(
                f"{stage:8} {items:7.0f} {s['steady_seconds']:9.1f} {s['seconds']:8.1f} {busy:8.1f} {cpu:8.1f} "
                f"{cpu / max(items, 1):11.3f} {cpu / s['seconds']:6.2f}"
            )
        print_processes(runs[k])


def print_e2e(run: dict[str, Any]) -> None:
    c = run["counters"]
    print(
        f"job {run['state']} in {run['wall_seconds']:.1f} s: {run['images_per_second']:.2f} images/s "
        f"({c.get('downloaded', 0)} stored, {c.get('detected', 0)} detected, {c.get('crops', 0)} crops, "
        f"{c.get('compared', 0)} compared)"
    )
    print(f"\n{'stage':8} {'items':>7} {'done at s':>10} {'busy s':>8} {'busy %':>7} {'CPU s':>8} {'CPU s/item':>11}")
    for stage, s in run["stages"].items():
        print(
            f"{stage:8} {s['items']:7.0f} {s['done_after_seconds']:10.1f} {s['busy_seconds']:8.1f} "
            f"{100 * s['busy_fraction']:6.0f}% {s['cpu_seconds']:8.1f} {s['cpu_seconds'] / max(s['items'], 1):11.3f}"
        )
    print_processes(run)
    if "machine_cpu_seconds" in run:  # reports written before these were measured lack them
        servers = ", ".join(f"{name} {cpu:.1f}" for name, cpu in run["server_cpu_seconds"].items())
        cores = run["machine_cpu_seconds"] / run["wall_seconds"]
        print(f"servers' CPU s during the job: {servers or 'none found'}")
        print(
            f"the machine's CPU s during the job: {run['machine_cpu_seconds']:.1f} ({cores:.2f} cores busy, "
            "anything running on it included)"
        )


def print_processes(run: dict[str, Any]) -> None:
    print(f"\n{'process tree':14} {'peak RSS MB':>12} {'peak PSS MB':>12} {'CPU s':>8}")
    for name, p in run["processes"].items():
        print(f"{name:14} {p['peak_rss_mb']:12.0f} {p['peak_pss_mb']:12.0f} {p['cpu_seconds']:8.1f}")
    depth = ", ".join(f"{q} {int(n)}" for q, n in sorted(run["peak_queue_depth"].items()) if n)
    print(f"peak queue depths (messages): {depth or 'none seen'}")


if __name__ == "__main__":
    main()
