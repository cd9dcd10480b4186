"""Wikimedia Commons through the MediaWiki API: a full-text search over the File namespace.

``action=query&generator=search&gsrnamespace=6&prop=imageinfo&iiprop=url|size|mime|extmetadata``
returns ``query.pages`` (a map of page id to page, ordered by the ``index`` field) whose
``imageinfo[0]`` has ``url``, ``descriptionurl`` and ``extmetadata`` fields such as
``LicenseShortName``, ``LicenseUrl``, ``Artist`` and ``ObjectName``, each ``{"value": ...}``.
Pagination: merge the response's ``continue`` object into the next request's parameters.
"""

from __future__ import annotations

import json
from typing import Any

from bs4 import BeautifulSoup

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage, get_json, query_of


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
        raise SourceError("wikimedia: response is not a JSON object")
    if "error" in data:
        raise SourceError(f"wikimedia: API error {data['error'].get('code')}: {data['error'].get('info')}")
    pages = (data.get("query") or {}).get("pages") or {}
    if isinstance(pages, dict):
        pages = list(pages.values())
    if not isinstance(pages, list):
        raise SourceError("wikimedia: 'query.pages' has an unexpected shape; the API format may have changed")
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
    found, next_cont = parse_page(get_json(ctx, ctx.settings.wikimedia_url, {**params, **cont}, "wikimedia"))
    return SourcePage(found, json.dumps(next_cont) if found and next_cont else None)
