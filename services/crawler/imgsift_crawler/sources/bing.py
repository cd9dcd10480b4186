"""Bing image search, read from the HTML Bing serves its own result grid with.

``GET /images/async?q=...&first=N&count=M&mmasync=1`` (the request the results page makes
while you scroll; ``/images/search`` serves the same grid inside a whole page) returns
result tiles ``<a class="iusc" m="{...}">`` whose ``m`` attribute holds HTML-escaped JSON:
``murl`` the image, ``purl`` the page it is on, ``t`` its title, ``turl`` Bing's thumbnail.
Bing gives no licence or author. Pagination: ``first`` is the 1-based rank of the first
result, so the next page starts at ``first + count``. Past about 1,000 results Bing serves
pages it has served before (searxng's Bing engines stop at ``first=1991`` for this reason);
the cursor keeps a short hash of every image URL seen, and a page with nothing new ends the
stream.

Bing is asked as a browser asks (:func:`profiles.bing`: a browser User-Agent,
``Accept-Language`` and the market cookies searxng sets): Bing is reported to cut results for
unknown agents.

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
from imgsift_crawler.sources import profiles
from imgsift_crawler.sources.base import FormatChanged, SourceContext, SourcePage, query_of

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
        raise FormatChanged(
            f"bing: {unreadable} result tiles but none with a JSON 'm' attribute holding 'murl'; "
            "the source's format changed"
        )
    if _empty_grid(soup, html):
        return []
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    raise FormatChanged(
        'bing: the page has no image results (no <a class="iusc">)'
        + (f" (page title {title!r})" if title else "")
        + "; the source's format changed, or Bing answered with a captcha or consent page"
    )


def _empty_grid(soup: BeautifulSoup, html: bytes | str) -> bool:
    """An answer that means "no more results": an empty body, or Bing's result grid with nothing in it.

    A grid that holds items but no readable tile is not empty: its markup has changed.
    """
    if not html.strip():
        return True
    grid = soup.select_one(".dgControl, [id^=mmComponent_images]")
    return grid is not None and grid.find(["li", "img", "a"]) is None


def _key(url: str) -> str:
    """A short hash of a result URL: enough to tell pages apart, small enough for the cursor."""
    return hashlib.sha256(url.encode()).hexdigest()[:10]


MAX_SEEN = 3000  # hashes kept in the cursor (~33 kB); Bing repeats itself after about 1,000 results


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    state: dict[str, Any] = json.loads(cursor) if cursor else {"first": 1}
    seen: list[str] = state.get("seen", [])
    settings = ctx.settings
    params: dict[str, str | int] = {
        "q": query_of(ctx, "bing"),
        "first": state["first"],
        "count": settings.bing_page_size,
        "mmasync": 1,
        "adlt": settings.bing_safe_search,
    }
    got = ctx.get(
        "bing",
        settings.bing_url,
        params=params,
        accept="text/html,application/xhtml+xml",
        headers=profiles.bing(settings),
    )
    found = parse_page(got.content)
    known = set(seen)
    new = [c for c in found if _key(c.image_url) not in known]
    # Past its last result Bing serves an empty grid, or pages it has served before.
    if not new:
        return SourcePage([], None)
    seen = (seen + [_key(c.image_url) for c in new])[-MAX_SEEN:]
    return SourcePage(new, json.dumps({"first": state["first"] + settings.bing_page_size, "seen": seen}))
