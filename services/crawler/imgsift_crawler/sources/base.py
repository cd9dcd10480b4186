"""The source interface: what every source gets, what it returns, and how it fails.

A source is a module with one function::

    def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage

``cursor`` is None for the first page; the returned ``cursor`` is an opaque string the
source reads back for the next page, or None when the source has nothing more. Cursors
are stored in the job state, so a crawl resumes where it stopped, in another process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from imgsift_common.messages import Candidate
from imgsift_crawler.fetch import Fetcher, FetchError, Purpose
from imgsift_crawler.settings import CrawlerSettings


class SourceError(Exception):
    """A source failed (unreachable, refused, or its format changed); the job notes it and goes on."""


@dataclass(frozen=True)
class SourceContext:
    fetcher: Fetcher
    settings: CrawlerSettings
    query: str | None = None  # the query this page is for: the job's, a widened one, or the spec's own


@dataclass(frozen=True)
class SourcePage:
    candidates: list[Candidate]
    cursor: str | None  # None: the source is exhausted


def get_json(ctx: SourceContext, url: str, params: dict[str, Any], source: str) -> Any:
    """GET a JSON API page, turning every failure into a :class:`SourceError` that says which source."""
    try:
        fetched = ctx.fetcher.get(url, purpose=Purpose.API, params=params, accept="application/json")
    except FetchError as exc:
        raise SourceError(f"{source}: request to {url} failed ({exc})") from exc
    try:
        return json.loads(fetched.content)
    except ValueError as exc:
        raise SourceError(f"{source}: {url} did not return JSON ({fetched.content_type or 'no Content-Type'})") from exc


def query_of(ctx: SourceContext, source: str) -> str:
    if not ctx.query:
        raise SourceError(f"{source}: no query; give the job a 'query'")
    return ctx.query
