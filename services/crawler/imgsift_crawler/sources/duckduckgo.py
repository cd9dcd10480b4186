"""DuckDuckGo image search, through the JSON its results page loads.

Two requests, as the site makes them:

1. ``GET /?q=...`` returns the search page; a script in it sets the ``vqd`` token that
   DuckDuckGo ties to the query (``vqd='3-1234...-5678...'``; other versions write
   ``vqd="4-..."`` or ``vqd=4-...&``).
2. ``GET /i.js?l=us-en&o=json&q=...&vqd=...&f=,,,&p=1`` returns ``{"query", "results":
   [{"image", "url", "title", "thumbnail", "width", "height", "source"}], "next":
   "i.js?q=...&s=100&..."}``; ``next`` (relative, without the token) is the next page, and
   is absent on the last one.

The cursor keeps the token and ``next``, so later pages skip step 1. DuckDuckGo gives no
licence or author. Like Bing, it is queried as a search API (:attr:`Purpose.API`), with a
browser's request profile (:mod:`.profiles`): ``i.js`` carries ``Referer`` and
``Sec-Fetch-Mode: cors``, without which it answers "403 Ratelimit" (deedy5/ddgs#309).

``i.js`` answers 403 both when it rate-limits and when the token is no longer valid (a job
resumed hours later). A resumed stream that gets a 403 asks for a fresh token once and tries
the same page again; a 403 with a fresh token is a rate limit: transient, the pipeline tries
again later from the same cursor.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources import profiles
from imgsift_crawler.sources.base import FormatChanged, SourceContext, SourceError, SourcePage, get_json, query_of

_VQD = re.compile(r"""vqd\s*[=:]\s*["']?(\d+-[\d-]+)""")


def find_vqd(html: bytes | str) -> str | None:
    """The query's ``vqd`` token in DuckDuckGo's search page, if there is one."""
    text = html.decode("utf-8", errors="replace") if isinstance(html, bytes) else html
    match = _VQD.search(text)
    return match.group(1) if match else None


def _http(url: Any) -> bool:
    return isinstance(url, str) and url.startswith(("http://", "https://"))


def parse_page(data: Any) -> tuple[list[Candidate], str | None]:
    """Candidates of one ``i.js`` response, and its ``next`` path (None on the last page)."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FormatChanged("duckduckgo: i.js response has no 'results' list; the source's format changed")
    out = []
    for item in data["results"]:
        if not isinstance(item, dict) or not _http(item.get("image")):
            continue
        out.append(
            Candidate(
                image_url=item["image"],
                page_url=item["url"] if _http(item.get("url")) else None,
                source=SourceKind.DUCKDUCKGO,
                title=str(item.get("title") or "").strip() or None,
            )
        )
    following = data.get("next")
    return out, following if isinstance(following, str) and following else None


def _token(ctx: SourceContext, query: str) -> str:
    settings = ctx.settings
    params: dict[str, str | int] = {"q": query, "iax": "images", "ia": "images", "kl": settings.duckduckgo_region}
    got = ctx.get(
        "duckduckgo",
        settings.duckduckgo_url,
        params=params,
        accept="text/html,application/xhtml+xml",
        headers=profiles.duckduckgo_page(settings),
    )
    vqd = find_vqd(got.content)
    if not vqd:
        raise FormatChanged(
            "duckduckgo: no vqd token in the search page; the source's format changed, "
            "or DuckDuckGo answered with a challenge page"
        )
    return vqd


def _refused(exc: SourceError) -> bool:
    return getattr(exc.__cause__, "status", None) == 403


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    settings = ctx.settings
    base = settings.duckduckgo_url
    query = query_of(ctx, "duckduckgo")
    if cursor:
        state = json.loads(cursor)
        vqd, path = state["vqd"], state["next"]
        # ``next`` carries every parameter but the token.
        split = urlsplit(urljoin(base, path))
        url = split._replace(query="").geturl()
        params: dict[str, str | int] = dict(parse_qsl(split.query, keep_blank_values=True))
    else:
        vqd = _token(ctx, query)
        url = urljoin(base, "i.js")
        params = {
            "l": settings.duckduckgo_region,
            "o": "json",
            "q": query,
            "f": ",,,",
            "p": settings.duckduckgo_safe_search,
        }
    headers = profiles.duckduckgo_images(settings)
    try:
        data = get_json(ctx, url, {**params, "vqd": vqd}, "duckduckgo", headers)
    except SourceError as exc:
        if not _refused(exc):
            raise
        if cursor:  # the saved token may have expired: a fresh one, and the same page again
            vqd = _token(ctx, query)
            try:
                data = get_json(ctx, url, {**params, "vqd": vqd}, "duckduckgo", headers)
            except SourceError as again:
                if not _refused(again):
                    raise
                raise _rate_limited(again) from again.__cause__
        else:
            raise _rate_limited(exc) from exc.__cause__
    found, following = parse_page(data)
    if not found or not following:
        return SourcePage(found, None)
    return SourcePage(found, json.dumps({"vqd": vqd, "next": following}))


def _rate_limited(exc: SourceError) -> SourceError:
    return SourceError(
        f"{exc}; DuckDuckGo answers 403 to i.js when it rate-limits (ddgs reports it as '403 Ratelimit')",
        transient=True,
        retry_after=exc.retry_after,
    )
