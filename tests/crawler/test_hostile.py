"""A generated corpus of hostile files and responses, each refused with a recorded reason.

Over 200 cases served by the local test web and taken through the crawler's own stage
function (``fetch_and_store``: download, decode check, hashes, store): truncated, zero-byte
and garbage JPEG and PNG; decompression bombs (headers and real highly compressed images);
a huge declared Content-Length; servers that trickle bytes; endless redirects; HTML and SVG
served as image/jpeg; a GIF with thousands of frames; malformed and oversized EXIF; 1x1 and
other tiny images. None may be stored, none may raise, and the process's peak memory is
measured around the run (printed with ``-s``; docs/reliability.md).
"""

from __future__ import annotations

import io
import random
import resource
import struct
import zlib
from collections import Counter
from collections.abc import Callable

import pytest
from PIL import Image

from imgsift_common.messages import Candidate, DownloadOutcome, FailureReason, Job, JobSpec, SourceKind, SourceSpec
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.pipeline import fetch_and_store
from imgsift_crawler.settings import CrawlerSettings
from tests.support.coco import Coco128
from tests.support.web import Route, TestWeb

Case = tuple[str, Route, set[FailureReason]]


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int, real: bool) -> bytes:
    """A PNG header claiming width x height; with ``real``, all-zero rows compressed (a true bomb)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data = b""
    if real:
        rows = zlib.compressobj(9)
        row = b"\x00" * (width + 1)
        parts = [rows.compress(row) for _ in range(min(height, 2000))]
        data = _png_chunk(b"IDAT", b"".join(parts) + rows.flush())
    return b"\x89PNG\r\n\x1a\n" + header + data + _png_chunk(b"IEND", b"")


def _jpeg_with_app1(base: bytes, payload: bytes, declared: int | None = None) -> bytes:
    """``base`` JPEG with an APP1 (EXIF) segment inserted after SOI; ``declared`` can lie about its length."""
    length = declared if declared is not None else len(payload) + 2
    return base[:2] + b"\xff\xe1" + struct.pack(">H", min(length, 0xFFFF)) + payload + base[2:]


def _gif_frames(frames: int) -> bytes:
    images = [Image.new("L", (40, 40), i % 256) for i in range(frames)]  # each frame differs: none merged
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10, loop=0, optimize=False)


def corpus(coco: Coco128, rng: random.Random) -> list[Case]:
    """Every hostile case: (path, the route that serves it, the reasons it may be refused with)."""
    bad_image = {FailureReason.NOT_AN_IMAGE}
    photos = [p.read_bytes() for p in coco.images[:10]]
    pngs = [_encode(Image.open(io.BytesIO(p)).convert("RGB").resize((200, 150)), "PNG") for p in photos[:5]]
    cases: list[Case] = []

    def add(
        name: str, body: bytes, reasons: set[FailureReason], content_type: str = "image/jpeg", **kw: object
    ) -> None:
        cases.append((f"/hostile/{len(cases):03d}-{name}", Route(body, content_type, **kw), reasons))  # type: ignore[arg-type]

    for i, data in enumerate(photos):  # truncated JPEGs: 6 cuts each
        for cut in (0.05, 0.2, 0.5, 0.8, 0.95, 0.99):
            add(f"truncated-jpeg-{i}-{cut}", data[: int(len(data) * cut)], bad_image)
    for i, data in enumerate(pngs):  # truncated PNGs: 4 cuts each
        for cut in (0.1, 0.5, 0.9, 0.99):
            add(f"truncated-png-{i}-{cut}", data[: int(len(data) * cut)], bad_image, "image/png")
    for content_type in ("image/jpeg", "image/png", "image/gif", "image/webp", "application/octet-stream"):
        add("zero-bytes", b"", {FailureReason.EMPTY}, content_type)
    for i in range(30):  # garbage after a valid-looking signature
        magic = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"][i % 4]
        reasons = bad_image | {FailureReason.UNSUPPORTED_FORMAT, FailureReason.TOO_MANY_PIXELS}  # random "sizes"
        add(f"garbage-{i}", magic + rng.randbytes(rng.randint(10, 5000)), reasons)
    too_many = {FailureReason.TOO_MANY_PIXELS}
    for w, h in ((100_000, 100_000), (65_535, 65_535), (50_000, 20_000), (200_000, 1_000), (30_000, 30_000)):
        add(f"bomb-header-{w}x{h}", _png_bomb(w, h, real=False), too_many, "image/png")
    for w, h in ((20_000, 20_000), (40_000, 10_000), (12_000, 12_000)):
        add(f"bomb-real-{w}x{h}", _png_bomb(w, h, real=True), too_many, "image/png")
    big = {FailureReason.TOO_LARGE}
    for length in ("10000000000", "999999999999", "21000000", "50000000", "1000000000000000"):
        add(f"huge-content-length-{length}", b"\xff\xd8" + b"x" * 100, big, send_length=False,
            headers={"Content-Length": length})  # fmt: skip
    for i in range(5):  # more bytes than the cap, no length declared: cut while streaming
        add(f"endless-stream-{i}", b"\xff\xd8\xff\xe0" + b"\x00" * (8 * 1024 * 1024), big, send_length=False)
    for i in range(5):  # trickles 1 KiB every 0.2 s: hits the total timeout
        add(f"trickle-{i}", photos[i], {FailureReason.TIMEOUT}, trickle=0.2)
    html = b"<!doctype html><html><head><title>Not found</title></head><body>" + b"<p>nope</p>" * 50 + b"</body></html>"
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect/></svg>'
    for i in range(10):
        add(f"html-as-jpeg-{i}", html.replace(b"nope", str(i).encode()), bad_image)
        add(f"svg-as-jpeg-{i}", svg.replace(b"rect", b"rect id='%d'" % i), bad_image)
        add(f"svg-nodecl-as-png-{i}", svg.split(b"?>", 1)[1], bad_image, "image/png")
    frames = {FailureReason.TOO_MANY_FRAMES}
    for n in (1_500, 3_000):
        add(f"gif-{n}-frames", _gif_frames(n), frames, "image/gif")
    base = photos[0]
    for i, size in enumerate((60_000, 65_000)):  # EXIF segments that lie about their length, or are garbage
        add(f"exif-overrun-{i}", _jpeg_with_app1(base, b"Exif\x00\x00" + b"\x00" * 100, declared=size), bad_image)
    for i in range(4):
        tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 0xFFFF) + rng.randbytes(60_000)
        add(f"exif-huge-ifd-{i}", _jpeg_with_app1(b"\xff\xd8" + base[2:], b"Exif\x00\x00" + tiff[:65_000]),
            bad_image | {FailureReason.TOO_SMALL})  # fmt: skip
    tiny = {FailureReason.TOO_SMALL}
    formats = (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp"))
    for fmt, ct in (*formats, ("BMP", "image/bmp")):
        for size in ((1, 1), (1, 500), (500, 1), (8, 8), (31, 400)):
            add(f"tiny-{fmt}-{size[0]}x{size[1]}", _encode(Image.new("RGB", size, (200, 10, 10)), fmt), tiny, ct)
    for i in range(5):  # redirect loops and chains longer than the limit
        cases.append((f"/hostile/loop-{i}", Route(b"", status=302, headers={"Location": f"/hostile/loop-{i}"}),
                      {FailureReason.HTTP_ERROR}))  # fmt: skip
    return cases


@pytest.fixture
def hostile_settings(crawler_settings: CrawlerSettings) -> CrawlerSettings:
    return crawler_settings.model_copy(
        update={"total_timeout": 1.0, "max_image_bytes": 4 * 1024 * 1024, "max_pixels": 100_000_000, "max_frames": 1000}
    )


def test_every_hostile_file_and_response_is_refused_with_a_reason(
    web: TestWeb, coco128: Coco128, hostile_settings: CrawlerSettings, sqlite_state, local_store
) -> None:  # type: ignore[no-untyped-def]
    cases = corpus(coco128, random.Random(2026))
    assert len(cases) >= 200
    for path, route, _ in cases:
        web.routes[path] = route
    job = Job(id="hostile", spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="any"))
    sqlite_state.create_job(job)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[str, object, object]] = []
    fetch: Callable[..., object] = fetch_and_store
    with Fetcher(hostile_settings) as fetcher:
        for path, _, reasons in cases:
            candidate = Candidate(image_url=web.url(path), source=SourceKind.URLS)
            record, image = fetch(job, candidate, local_store, sqlite_state, hostile_settings, fetcher)  # type: ignore[misc]
            outcomes[record.reason.value if record.reason else record.outcome.value] += 1
            if record.outcome is not DownloadOutcome.FAILED or image is not None or record.reason not in reasons:
                wrong.append((path, record.outcome, record.reason))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{len(cases)} hostile cases: {dict(sorted(outcomes.items()))}; peak RSS grew {grown_mb:.0f} MB")
    assert not wrong, "\n".join(map(str, wrong))
    assert not any(local_store.list("jobs/hostile/")), "nothing hostile may be stored"
    assert grown_mb < 300  # the pixel and byte caps hold: no bomb is ever decoded
