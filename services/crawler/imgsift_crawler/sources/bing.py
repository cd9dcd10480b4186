"""Bing image search, read from the HTML Bing serves its own result grid with.

``GET /images/async?q=...&first=N&count=M&mmasync=1`` (the request the results page makes
while you scroll; ``/images/search`` serves the same grid inside a whole page) returns
result tiles ``<a class="iusc" m="{...}">`` whose ``m`` attribute holds HTML-escaped JSON:
``murl`` the image, ``purl`` the page it is on, ``t`` its title, ``turl`` Bing's thumbnail.
Bing gives no licence or author. Pagination: ``first`` is the 1-based rank of the first
result, so the next page starts at ``first + count``.

The engine is queried like a search API (:attr:`Purpose.API`), not crawled: its terms of
use are the operator's to accept. When Bing answers with something that holds no tile
(a captcha, a consent page, new markup), the source fails with an error that says so
instead of reporting "no results".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bs4 import BeautifulSoup

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.fetch import FetchError, Purpose
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage, query_of

# Private-use characters Bing sometimes wraps matched words in, in titles.
_HIGHLIGHT = dict.fromkeys(map(ord, "\ue000\ue001"))


def _http(url: Any) -> bool:
    return isinstance(url, str) and url.startswith(("http://", "https://"))


def parse_page(html: bytes | str) -> list[Candidate]:
    """Candidates of one result page, in rank order (pure: no I/O).

    Raises :class:`SourceError` when the page is not an empty result grid and holds no
    readable tile: Bing changed its markup, or answered with a captcha or consent page.
    """
    soup = BeautifulSoup(html, "lxml")
    tiles = soup.select("a.iusc[m]")
    found: dict[str, Candidate] = {}
    unreadable = 0
    for tile in tiles:
        try:
            meta = json.loads(str(tile["m"]))
        except ValueError:
            unreadable += 1
            continue
        if not isinstance(meta, dict) or not _http(meta.get("murl")):
            unreadable += 1
            continue
        title = str(meta.get("t") or "").translate(_HIGHLIGHT).strip() or None
        url = meta["murl"]
        found.setdefault(
            url,
            Candidate(
                image_url=url,
                page_url=meta["purl"] if _http(meta.get("purl")) else None,
                source=SourceKind.BING,
                title=title,
            ),
        )
    if found:
        return list(found.values())
    if tiles:
        raise SourceError(
            f"bing: {unreadable} result tiles but none with a JSON 'm' attribute holding 'murl'; "
            "the markup may have changed"
        )
    if _empty_grid(soup, html):
        return []
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    raise SourceError(
        'bing: the page has no image results (no <a class="iusc">)'
        + (f" (page title {title!r})" if title else "")
        + "; the markup may have changed, or Bing answered with a captcha or consent page"
    )


def _empty_grid(soup: BeautifulSoup, html: bytes | str) -> bool:
    """An answer that means "no more results": an empty body, or Bing's result grid with nothing in it.

    A grid that holds items but no readable tile is not empty: its markup has changed.
    """
    if not html.strip():
        return True
    grid = soup.select_one(".dgControl, [id^=mmComponent_images]")
    return grid is not None and grid.find(["li", "img", "a"]) is None


def _fingerprint(found: list[Candidate]) -> str:
    return hashlib.sha256("\n".join(sorted(c.image_url for c in found)).encode()).hexdigest()[:16]


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    state: dict[str, Any] = json.loads(cursor) if cursor else {"first": 1, "last": None}
    settings = ctx.settings
    params: dict[str, str | int] = {
        "q": query_of(ctx, "bing"),
        "first": state["first"],
        "count": settings.bing_page_size,
        "mmasync": 1,
        "adlt": settings.bing_safe_search,
    }
    try:
        got = ctx.fetcher.get(
            settings.bing_url, purpose=Purpose.API, params=params, accept="text/html,application/xhtml+xml"
        )
    except FetchError as exc:
        raise SourceError(f"bing: request to {settings.bing_url} failed ({exc})") from exc
    found = parse_page(got.content)
    fingerprint = _fingerprint(found)
    # Past its last result Bing serves an empty grid, or the same last page again.
    if not found or fingerprint == state["last"]:
        return SourcePage([] if fingerprint == state["last"] else found, None)
    return SourcePage(found, json.dumps({"first": state["first"] + settings.bing_page_size, "last": fingerprint}))
