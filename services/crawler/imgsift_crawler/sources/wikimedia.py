"""Wikimedia Commons through the MediaWiki API: a full-text search over the File namespace.

``action=query&generator=search&gsrnamespace=6&prop=imageinfo&iiprop=url|size|mime|extmetadata``
returns ``query.pages`` (a map of page id to page, ordered by the ``index`` field) whose
``imageinfo[0]`` has ``url``, ``descriptionurl`` and ``extmetadata`` fields such as
``LicenseShortName``, ``LicenseUrl``, ``Artist`` and ``ObjectName``, each ``{"value": ...}``.
Pagination: merge the response's ``continue`` object into the next request's parameters.

Wikimedia's User-Agent policy asks for a way to reach the client's operator, and since 2025
its servers answer 403 ("Please set a user-agent and respect our robot policy
https://w.wiki/4wJS", phabricator T400119) to clients without one: the source requires
``IMGSIFT_CRAWLER_CONTACT`` (a job that names it is refused at creation without it).
The API's ``maxlag`` and ``ratelimited`` errors are transient.
"""

from __future__ import annotations

import json
from typing import Any

from bs4 import BeautifulSoup

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources import profiles
from imgsift_crawler.sources.base import FormatChanged, SourceContext, SourceError, SourcePage, get_json, query_of

TRANSIENT_ERRORS = frozenset({"maxlag", "ratelimited", "readonly", "internal_api_error_DBQueryTimeoutError"})
CONTACT_NEEDED = (
    "wikimedia: Wikimedia requires a contact in the User-Agent (its User-Agent policy; it answers 403 "
    "without one); set IMGSIFT_CRAWLER_CONTACT to a mail address or URL where you can be reached"
)


def _meta(extmetadata: dict[str, Any], name: str) -> str | None:
    value = (extmetadata.get(name) or {}).get("value")
    if not isinstance(value, str) or not value.strip():
        return None
    if "<" not in value:
        return value.strip()
    # Artist and descriptions are HTML fragments (links to user pages): keep the text.
    return BeautifulSoup(value, "lxml").get_text(" ", strip=True) or None


def parse_page(data: Any) -> tuple[list[Candidate], dict[str, str] | None]:
    """Candidates of one response, and the ``continue`` parameters for the next one (None at the end)."""
    if not isinstance(data, dict):
        raise FormatChanged("wikimedia: response is not a JSON object; the source's format changed")
    if "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {}
        code = str(error.get("code"))
        raise SourceError(f"wikimedia: API error {code}: {error.get('info')}", transient=code in TRANSIENT_ERRORS)
    if "query" not in data and "batchcomplete" not in data:
        # A search with no hits still says "batchcomplete"; an answer with neither is not a search result.
        raise FormatChanged("wikimedia: response has neither 'query' nor 'batchcomplete'; the source's format changed")
    pages = (data.get("query") or {}).get("pages") or {}
    if isinstance(pages, dict):
        pages = list(pages.values())
    if not isinstance(pages, list):
        raise FormatChanged("wikimedia: 'query.pages' has an unexpected shape; the source's format changed")
    out = []
    for page in sorted(pages, key=lambda p: p.get("index", 0)):
        info = (page.get("imageinfo") or [None])[0]
        if not info or not info.get("url"):
            continue
        if info.get("mime") and not str(info["mime"]).startswith("image/"):
            continue
        meta = info.get("extmetadata") or {}
        title = _meta(meta, "ObjectName") or str(page.get("title", "")).removeprefix("File:") or None
        out.append(
            Candidate(
                image_url=info["url"],
                page_url=info.get("descriptionurl"),
                source=SourceKind.WIKIMEDIA,
                title=title,
                license=_meta(meta, "LicenseShortName"),
                license_url=_meta(meta, "LicenseUrl"),
                author=_meta(meta, "Artist"),
            )
        )
    cont = data.get("continue")
    return out, {str(k): str(v) for k, v in cont.items()} if isinstance(cont, dict) else None


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    if not ctx.settings.contact:
        raise SourceError(CONTACT_NEEDED)
    params: dict[str, str | int] = {
        "action": "query",
        "format": "json",
        "formatversion": "2",
        "generator": "search",
        "gsrsearch": f"filetype:bitmap {query_of(ctx, 'wikimedia')}",
        "gsrnamespace": 6,
        "gsrlimit": ctx.settings.wikimedia_page_size,
        "prop": "imageinfo",
        "iiprop": "url|size|mime|extmetadata",
        "iiextmetadatafilter": "LicenseShortName|LicenseUrl|Artist|ObjectName",
    }
    cont = json.loads(cursor) if cursor else {}
    try:
        data = get_json(
            ctx, ctx.settings.wikimedia_url, {**params, **cont}, "wikimedia", profiles.wikimedia(ctx.settings)
        )
    except SourceError as exc:
        if (
            getattr(exc.__cause__, "status", None) == 403
            and b"user-agent" in getattr(exc.__cause__, "body", b"").lower()
        ):
            raise SourceError(f"{exc}; Wikimedia refused the User-Agent {ctx.settings.full_user_agent!r}") from exc
        raise
    found, next_cont = parse_page(data)
    return SourcePage(found, json.dumps(next_cont) if found and next_cont else None)
