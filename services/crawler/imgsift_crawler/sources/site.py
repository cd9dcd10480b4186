"""A breadth-first crawl of web pages from start URLs, collecting the images they show or link.

Per page it takes ``<img src>``, the largest ``srcset`` candidate of ``<img>`` and
``<picture><source>``, ``<a href>`` links to image files and ``og:image``. It follows
``<a href>`` links to other pages up to ``max_depth`` and ``max_pages``, on the start URL's
host only unless ``same_host`` is off.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

from bs4 import BeautifulSoup

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.fetch import FetchError, Purpose
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
_DESCRIPTOR = re.compile(r"^(\d+(?:\.\d+)?)([wx])$")


def parse_srcset(srcset: str) -> str | None:
    """The URL of the largest candidate in a ``srcset`` (by width, else density)."""
    best: tuple[float, str] | None = None
    for part in srcset.split(","):
        fields = part.strip().split()
        if not fields:
            continue
        size = 1.0
        if len(fields) > 1 and (m := _DESCRIPTOR.match(fields[1])):
            size = float(m.group(1)) * (1.0 if m.group(2) == "w" else 1000.0)
        if best is None or size > best[0]:
            best = (size, fields[0])
    return best[1] if best else None


def _is_image_link(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


def _http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def extract(html: bytes | str, page_url: str) -> tuple[list[Candidate], list[str]]:
    """Images and follow-up links on one page, as absolute URLs (pure: no I/O)."""
    soup = BeautifulSoup(html, "lxml")
    base = page_url
    if (tag := soup.find("base", href=True)) is not None:
        base = urljoin(page_url, str(tag["href"]))

    images: dict[str, Candidate] = {}

    def add(raw: str | None, title: str | None = None) -> None:
        if not raw or raw.startswith("data:"):
            return
        url = urldefrag(urljoin(base, raw.strip())).url
        if _http(url) and url not in images:
            images[url] = Candidate(image_url=url, page_url=page_url, source=SourceKind.SITE, title=title or None)

    for meta in soup.find_all("meta", content=True):
        if (meta.get("property") or meta.get("name")) in ("og:image", "og:image:url", "og:image:secure_url"):
            add(str(meta["content"]))
    for img in soup.find_all("img"):
        alt = str(img.get("alt") or "").strip() or None
        srcset = img.get("srcset")
        add(parse_srcset(str(srcset)) if srcset else None, alt)
        add(str(img.get("src") or "") or None, alt)
    for source in soup.select("picture source[srcset]"):
        add(parse_srcset(str(source["srcset"])))

    links: list[str] = []
    for anchor in soup.find_all("a", href=True):
        url = urldefrag(urljoin(base, str(anchor["href"]).strip())).url
        if not _http(url):
            continue
        if _is_image_link(url):
            add(url, anchor.get_text(strip=True) or None)
        else:
            links.append(url)
    return list(images.values()), links


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    """Crawl up to ``site_pages_per_step`` pages from where the last step stopped.

    The cursor holds the crawl's own frontier: pages still to visit (with their depth), the
    pages already queued, and how many were fetched.
    """
    start_urls = spec.start_urls or []
    hosts = {urlsplit(u).netloc.lower() for u in start_urls}
    state: dict[str, Any] = (
        json.loads(cursor) if cursor else {"queue": [[u, 0] for u in start_urls], "seen": start_urls, "pages": 0}
    )
    queue: deque[list[Any]] = deque(state["queue"])
    seen: set[str] = set(state["seen"])
    fetched_pages = state["pages"]
    found: list[Candidate] = []
    failures: list[str] = []
    attempts = 0
    while queue and fetched_pages < spec.max_pages and attempts < ctx.settings.site_pages_per_step:
        url, depth = queue.popleft()
        attempts += 1
        try:
            got = ctx.fetcher.get(url, purpose=Purpose.PAGE, accept="text/html,application/xhtml+xml")
        except FetchError as exc:
            failures.append(f"{url}: {exc}")
            continue
        fetched_pages += 1
        if not _is_html(got.content_type, got.content):
            # A start URL or link that is itself an image is a candidate, not a page.
            if _is_image_link(got.url) or got.content_type.lower().startswith("image/"):
                found.append(Candidate(image_url=url, page_url=None, source=SourceKind.SITE))
            continue
        images, links = extract(got.content, got.url)
        found += images
        if depth >= spec.max_depth:
            continue
        for link in links:
            if link in seen or (spec.same_host and urlsplit(link).netloc.lower() not in hosts):
                continue
            seen.add(link)
            queue.append([link, depth + 1])
    if cursor is None and fetched_pages == 0 and failures and not queue:
        raise SourceError(f"site: no start page could be fetched ({'; '.join(failures[:3])})")
    if not queue or fetched_pages >= spec.max_pages:
        return SourcePage(found, None)
    return SourcePage(found, json.dumps({"queue": list(queue), "seen": sorted(seen), "pages": fetched_pages}))


def _is_html(content_type: str, content: bytes) -> bool:
    return "html" in content_type.lower() or content.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
