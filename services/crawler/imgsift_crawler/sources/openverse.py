"""Openverse (openly licensed images) through its public search API.

``GET /v1/images/?q=...&page=N&page_size=M`` returns ``{"result_count", "page_count",
"page_size", "page", "results": [...]}``; each result carries ``url``,
``foreign_landing_url``, ``title``, ``creator``, ``license``, ``license_version`` and
``license_url``.

Limits of the service (its ``api/api/serializers/media_serializers.py`` and
``api/api/utils/pagination.py``): anonymous clients get at most 20 results a page (a larger
``page_size`` answers 401), pages past ``MAX_PAGINATION_DEPTH`` (20) answer 400 and
``page_count`` never says more than 20; anonymous clients may make about 20 requests a
minute, which the crawler keeps to (``openverse_requests_per_minute``, across all workers,
through the host limiter), and throttled requests answer 429 with ``Retry-After`` (Django
REST framework's throttles), which the pipeline waits out before the stream goes on.
"""

from __future__ import annotations

import json
from typing import Any

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources import profiles
from imgsift_crawler.sources.base import FormatChanged, SourceContext, SourceError, SourcePage, get_json, query_of


def license_name(code: str | None, version: str | None) -> str | None:
    """Openverse's licence code as people write it: ``by-sa`` 2.0 -> ``CC BY-SA 2.0``."""
    if not code:
        return None
    name = {"cc0": "CC0", "pdm": "Public Domain Mark"}.get(code.lower(), f"CC {code.upper()}")
    return f"{name} {version}" if version else name


def parse_page(data: Any) -> tuple[list[Candidate], int | None]:
    """Candidates of one response page, and the number of pages the API reports."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FormatChanged("openverse: response has no 'results' list; the source's format changed")
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
    settings = ctx.settings
    number = int(cursor) if cursor else 1
    if number > settings.openverse_max_pages:
        return SourcePage([], None)  # a cursor saved before the depth was lowered
    params = {"q": query_of(ctx, "openverse"), "page": number, "page_size": settings.openverse_page_size}
    try:
        pace = 60.0 / settings.openverse_requests_per_minute if settings.openverse_requests_per_minute else 0.0
        data = get_json(ctx, settings.openverse_url, params, "openverse", profiles.identified(settings), pace)
    except SourceError as exc:
        if number > 1 and _past_last_page(exc):
            return SourcePage([], None)  # the service's depth is lower than ours: its last page was the end
        raise
    found, page_count = parse_page(data)
    last = min(page_count or settings.openverse_max_pages, settings.openverse_max_pages)
    if not found or number >= last:
        return SourcePage(found, None)
    return SourcePage(found, str(number + 1))


def _past_last_page(exc: SourceError) -> bool:
    """Openverse's 400 for a page past its pagination depth: ``{"detail": {"page": [...]}}``."""
    cause = exc.__cause__
    if getattr(cause, "status", None) != 400:
        return False
    try:
        detail = json.loads(getattr(cause, "body", b"") or b"{}").get("detail")
    except (ValueError, AttributeError):
        return False
    return isinstance(detail, dict) and "page" in detail
