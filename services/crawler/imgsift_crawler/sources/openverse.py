"""Openverse (openly licensed images) through its public search API.

``GET /v1/images/?q=...&page=N&page_size=M`` returns ``{"result_count", "page_count",
"page_size", "page", "results": [...]}``; each result carries ``url``,
``foreign_landing_url``, ``title``, ``creator``, ``license``, ``license_version`` and
``license_url``. Anonymous clients get at most 20 results a page.
"""

from __future__ import annotations

from typing import Any

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage, get_json, query_of


def license_name(code: str | None, version: str | None) -> str | None:
    """Openverse's licence code as people write it: ``by-sa`` 2.0 -> ``CC BY-SA 2.0``."""
    if not code:
        return None
    name = {"cc0": "CC0", "pdm": "Public Domain Mark"}.get(code.lower(), f"CC {code.upper()}")
    return f"{name} {version}" if version else name


def parse_page(data: Any) -> tuple[list[Candidate], int | None]:
    """Candidates of one response page, and the number of pages the API reports."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise SourceError("openverse: response has no 'results' list; the API format may have changed")
    out = []
    for item in data["results"]:
        url = item.get("url") if isinstance(item, dict) else None
        if not url:
            continue
        license_code = item.get("license")
        out.append(
            Candidate(
                image_url=url,
                page_url=item.get("foreign_landing_url"),
                source=SourceKind.OPENVERSE,
                title=item.get("title"),
                license=license_name(license_code, item.get("license_version")),
                license_url=item.get("license_url"),
                author=item.get("creator"),
            )
        )
    page_count = data.get("page_count")
    return out, page_count if isinstance(page_count, int) else None


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    number = int(cursor) if cursor else 1
    params = {"q": query_of(ctx, "openverse"), "page": number, "page_size": ctx.settings.openverse_page_size}
    found, page_count = parse_page(get_json(ctx, ctx.settings.openverse_url, params, "openverse"))
    if not found or (page_count is not None and number >= page_count):
        return SourcePage(found, None)
    return SourcePage(found, str(number + 1))
