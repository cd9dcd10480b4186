"""A breadth-first crawl of web pages from start URLs, collecting the images they show or link.

Per page it takes what real page markup uses to show an image (``extract_page``):

- ``<img src>``, and the largest candidate of ``srcset``, on ``<img>`` and ``<picture><source>``;
- lazy loading, whose real URL sits in ``data-src``, ``data-lazy-src``, ``data-original``,
  ``data-srcset``, ``data-lazy-srcset`` (lazysizes, WP Rocket, jQuery lazyload...), on
  ``<img>`` and ``<source>``: when one is there, ``src`` is the placeholder and is skipped;
- ``og:image`` (and its ``:url`` / ``:secure_url``) and ``twitter:image`` (and ``:src``);
- CSS ``background`` / ``background-image`` ``url(...)`` in ``style`` attributes, ``<style>``
  blocks and stylesheets (``<link rel="stylesheet">``) on the crawled site, each fetched once;
- ``<a href>`` links to image files.

``srcset`` is parsed by the HTML standard's algorithm ("parse a srcset attribute"): a URL
runs to the next whitespace, so a CDN URL with commas in it (``/w_900,c_fill/a.jpg 900w``)
stays whole. It follows ``<a href>`` links to other pages up to ``max_depth`` and
``max_pages``, on the start URLs' sites only unless ``same_host`` is off; a site is its host
without a leading ``www.``, whatever the scheme, and a start URL that redirects (bare domain
to ``www.``, http to https, another host) adds where it landed.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

from bs4 import BeautifulSoup
from bs4.element import Tag

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.fetch import FetchError, Purpose
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
META_IMAGES = frozenset({"og:image", "og:image:url", "og:image:secure_url", "twitter:image", "twitter:image:src"})
LAZY_SRC = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url")
LAZY_SRCSET = ("data-srcset", "data-lazy-srcset")
STYLESHEETS_PER_PAGE = 5  # stylesheets of one page fetched for their background images

_WHITESPACE = " \t\n\f\r"
_WIDTH = re.compile(r"^\d+w$")
_DENSITY = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?x$")
_HEIGHT = re.compile(r"^\d+h$")
# A background declaration's value (background or background-image), then its url(...)s.
_BACKGROUND = re.compile(r"background(?:-image)?\s*:([^;}]*)", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"\s]*))\s*\)""", re.IGNORECASE)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def srcset_candidates(srcset: str) -> list[tuple[str, float | None, float | None]]:
    """``(url, width, density)`` of each candidate, by the HTML standard's srcset parser.

    Candidates with an invalid descriptor are dropped, as browsers drop them.
    """
    out: list[tuple[str, float | None, float | None]] = []
    pos, n = 0, len(srcset)
    while True:
        while pos < n and (srcset[pos] in _WHITESPACE or srcset[pos] == ","):
            pos += 1
        if pos >= n:
            return out
        start = pos
        while pos < n and srcset[pos] not in _WHITESPACE:
            pos += 1
        url = srcset[start:pos]
        descriptors: list[str] = []
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            pos = _tokenize_descriptors(srcset, pos, descriptors)
        candidate = _candidate(url, descriptors)
        if candidate is not None:
            out.append(candidate)


def _tokenize_descriptors(text: str, pos: int, descriptors: list[str]) -> int:
    """The standard's descriptor tokenizer from ``pos``; the position after the candidate."""
    n = len(text)
    while pos < n and text[pos] in _WHITESPACE:
        pos += 1
    current = ""
    state = "in descriptor"
    while True:
        c = text[pos] if pos < n else None
        if state == "in descriptor":
            if c is None:
                if current:
                    descriptors.append(current)
                return pos
            if c in _WHITESPACE:
                if current:
                    descriptors.append(current)
                current = ""
                state = "after descriptor"
            elif c == ",":
                if current:
                    descriptors.append(current)
                return pos + 1
            else:
                current += c
                if c == "(":
                    state = "in parens"
        elif state == "in parens":
            if c is None:
                descriptors.append(current)
                return pos
            current += c
            if c == ")":
                state = "in descriptor"
        else:  # after descriptor
            if c is None:
                return pos
            if c not in _WHITESPACE:
                state = "in descriptor"
                continue  # reconsume
        pos += 1


def _candidate(url: str, descriptors: list[str]) -> tuple[str, float | None, float | None] | None:
    width = density = None
    for descriptor in descriptors:
        if _WIDTH.match(descriptor) and width is None and density is None:
            width = float(descriptor[:-1])
        elif _DENSITY.match(descriptor) and width is None and density is None:
            density = float(descriptor[:-1])
        elif _HEIGHT.match(descriptor):
            continue  # a future-compat height hint: allowed beside a width
        else:
            return None
    return (url, width, density) if url else None


def parse_srcset(srcset: str) -> str | None:
    """The URL of the largest candidate in a ``srcset`` (by width, else density)."""
    best: tuple[float, str] | None = None
    for url, width, density in srcset_candidates(srcset):
        size = width if width is not None else 1000.0 * (density if density is not None else 1.0)
        if best is None or size > best[0]:
            best = (size, url)
    return best[1] if best else None


def css_background_urls(css: str) -> list[str]:
    """The ``url(...)``s of a stylesheet's or style attribute's ``background`` declarations, in order."""
    out = []
    for declaration in _BACKGROUND.finditer(_CSS_COMMENT.sub("", css)):
        for match in _CSS_URL.finditer(declaration.group(1)):
            url = next(g for g in match.groups() if g is not None).strip()
            if url:
                out.append(url)
    return out


def site_of(url: str) -> str:
    """The site a URL belongs to: its host and port, lower case, without a leading ``www.``."""
    netloc = urlsplit(url).netloc.lower().rsplit("@", 1)[-1]
    return netloc.removeprefix("www.")


def _is_image_link(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


def _http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


@dataclass
class PageFinds:
    images: list[Candidate]
    links: list[str]  # pages to crawl next
    stylesheets: list[str]  # stylesheets to read for background images


def extract_page(html: bytes | str, page_url: str) -> PageFinds:
    """Images, follow-up links and stylesheets of one page, as absolute URLs (pure: no I/O)."""
    soup = BeautifulSoup(html, "lxml")
    base = page_url
    if (tag := soup.find("base", href=True)) is not None:
        base = urljoin(page_url, str(tag["href"]))

    images: dict[str, Candidate] = {}

    def add(raw: str | None, title: str | None = None, relative_to: str = base) -> None:
        if not raw or raw.strip().startswith("data:"):
            return
        url = urldefrag(urljoin(relative_to, raw.strip())).url
        if _http(url) and url not in images:
            images[url] = Candidate(image_url=url, page_url=page_url, source=SourceKind.SITE, title=title or None)

    for meta in soup.find_all("meta", content=True):
        if str(meta.get("property") or meta.get("name") or "").lower() in META_IMAGES:
            add(str(meta["content"]))
    for element in soup.find_all(["img", "source"]):
        alt = str(element.get("alt") or "").strip() or None if element.name == "img" else None
        lazy = [str(element[a]) for a in LAZY_SRC if element.get(a)]
        lazy_sets = [str(element[a]) for a in LAZY_SRCSET if element.get(a)]
        for srcset in lazy_sets + ([str(element["srcset"])] if element.get("srcset") else []):
            add(parse_srcset(srcset), alt)
        for url in lazy:
            add(url, alt)
        if element.name == "img" and not lazy and not lazy_sets:
            add(str(element.get("src") or "") or None, alt)  # with lazy loading, src is the placeholder
    for styled in soup.find_all(style=True):
        for url in css_background_urls(str(styled["style"])):
            add(url)
    for block in soup.find_all("style"):
        for url in css_background_urls(block.get_text()):
            add(url)

    stylesheets: list[str] = []
    for link in soup.find_all("link", href=True):
        rel: Any = link.get("rel") or []  # bs4: a list for rel (a multi-valued attribute)
        rels = {r.lower() for r in (rel if isinstance(rel, list) else str(rel).split())}
        if "stylesheet" in rels:
            url = urldefrag(urljoin(base, str(link["href"]).strip())).url
            if _http(url) and url not in stylesheets:
                stylesheets.append(url)

    links: list[str] = []
    for anchor in soup.find_all("a", href=True):
        url = urldefrag(urljoin(base, str(anchor["href"]).strip())).url
        if not _http(url):
            continue
        if _is_image_link(url):
            add(url, _text(anchor))
        else:
            links.append(url)
    return PageFinds(list(images.values()), links, stylesheets)


def _text(tag: Tag) -> str | None:
    return tag.get_text(strip=True) or None


def extract(html: bytes | str, page_url: str) -> tuple[list[Candidate], list[str]]:
    """Images and follow-up links on one page, as absolute URLs (pure: no I/O)."""
    finds = extract_page(html, page_url)
    return finds.images, finds.links


def stylesheet_images(css: str, sheet_url: str, page_url: str) -> list[Candidate]:
    """Background images of a stylesheet, resolved against the stylesheet's own URL."""
    out: dict[str, Candidate] = {}
    for raw in css_background_urls(css):
        if raw.startswith("data:"):
            continue
        url = urldefrag(urljoin(sheet_url, raw)).url
        if _http(url) and url not in out:
            out[url] = Candidate(image_url=url, page_url=page_url, source=SourceKind.SITE)
    return list(out.values())


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    """Crawl up to ``site_pages_per_step`` pages from where the last step stopped.

    The cursor holds the crawl's own frontier: pages still to visit (with their depth), the
    pages and stylesheets already queued or read, the sites the crawl stays on, and how many
    pages were fetched.
    """
    start_urls = spec.start_urls or []
    state: dict[str, Any] = (
        json.loads(cursor) if cursor else {"queue": [[u, 0] for u in start_urls], "seen": start_urls, "pages": 0}
    )
    sites: set[str] = set(state.get("sites") or [site_of(u) for u in start_urls])
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
        if depth == 0:
            sites.add(site_of(got.url))  # a start URL that redirects (to www., to https): the same site
        if not _is_html(got.content_type, got.content):
            # A start URL or link that is itself an image is a candidate, not a page.
            if _is_image_link(got.url) or got.content_type.lower().startswith("image/"):
                found.append(Candidate(image_url=url, page_url=None, source=SourceKind.SITE))
            continue
        finds = extract_page(got.content, got.url)
        found += finds.images
        sheets = [s for s in finds.stylesheets if s not in seen and site_of(s) in sites][:STYLESHEETS_PER_PAGE]
        for sheet in sheets:
            seen.add(sheet)
            found += _stylesheet(ctx, sheet, got.url)
        if depth >= spec.max_depth:
            continue
        for link in finds.links:
            if link in seen or (spec.same_host and site_of(link) not in sites):
                continue
            seen.add(link)
            queue.append([link, depth + 1])
    if cursor is None and fetched_pages == 0 and failures and not queue:
        raise SourceError(f"site: no start page could be fetched ({'; '.join(failures[:3])})")
    if not queue or fetched_pages >= spec.max_pages:
        return SourcePage(found, None)
    return SourcePage(
        found,
        json.dumps({"queue": list(queue), "seen": sorted(seen), "pages": fetched_pages, "sites": sorted(sites)}),
    )


def _stylesheet(ctx: SourceContext, url: str, page_url: str) -> list[Candidate]:
    """Background images of a same-site stylesheet; none if it cannot be fetched (the page still counts)."""
    try:
        got = ctx.fetcher.get(url, purpose=Purpose.PAGE, accept="text/css,*/*;q=0.1")
    except FetchError:
        return []
    return stylesheet_images(got.content.decode("utf-8", errors="replace"), got.url, page_url)


def _is_html(content_type: str, content: bytes) -> bool:
    return "html" in content_type.lower() or content.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
