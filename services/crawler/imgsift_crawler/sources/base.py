"""The source interface: what every source gets, what it returns, and how it fails.

A source is a module with one function::

    def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage

``cursor`` is None for the first page; the returned ``cursor`` is an opaque string the
source reads back for the next page, or None when the source has nothing more. Cursors
are stored in the job state, so a crawl resumes where it stopped, in another process.

A source that cannot give a page raises :class:`SourceError`, *transient* (the same request
may succeed later: a 429, a 5xx, a service that says it is unavailable, an expired token) or
permanent (a refused key, a page past the service's last one, a format that changed). The
pipeline tries a transient failure again later from the same cursor and ends the stream
only on a permanent one.

Each source states the headers it sends (its *request profile*: User-Agent,
Accept-Language, Referer, fetch metadata) through :func:`SourceContext.get`, so every
request still goes through the Fetcher's address, robots and size rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgsift_common.messages import Candidate
from imgsift_crawler.fetch import Fetched, Fetcher, FetchError, Purpose
from imgsift_crawler.settings import CrawlerSettings


class SourceError(Exception):
    """A source failed (unreachable, refused, or its format changed); the job notes it.

    ``transient``: the same request may succeed later, so the stream is tried again from
    its cursor; ``retry_after``: seconds the service asked to wait (its ``Retry-After``).
    """

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class FormatChanged(SourceError):
    """The answer holds nothing the parser recognises: the service changed its format (permanent)."""


@dataclass(frozen=True)
class SourceContext:
    fetcher: Fetcher
    settings: CrawlerSettings
    query: str | None = None  # the query this page is for: the job's, a widened one, or the spec's own

    def get(
        self,
        source: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        accept: str,
        headers: Mapping[str, str] | None = None,
        min_interval: float = 0.0,
    ) -> Fetched:
        """GET a source's API or result page with its request profile; failures become :class:`SourceError`.

        ``min_interval``: seconds between requests to the service's host, its published rate limit.
        """
        try:
            return self.fetcher.get(
                url,
                purpose=Purpose.API,
                params=dict(params or {}),
                accept=accept,
                headers=headers,
                min_interval=min_interval,
            )
        except FetchError as exc:
            raise fetch_failed(source, url, exc) from exc


def fetch_failed(source: str, url: str, exc: FetchError) -> SourceError:
    """A failed request as a source error, transient or not as the answer says."""
    return SourceError(
        f"{source}: request to {url} failed ({exc})", transient=exc.transient, retry_after=exc.retry_after
    )


@dataclass(frozen=True)
class SourcePage:
    candidates: list[Candidate]
    cursor: str | None  # None: the source is exhausted


def get_json(
    ctx: SourceContext,
    url: str,
    params: Mapping[str, Any],
    source: str,
    headers: Mapping[str, str] | None = None,
    min_interval: float = 0.0,
) -> Any:
    """GET a JSON API page, turning every failure into a :class:`SourceError` that says which source."""
    fetched = ctx.get(source, url, params=params, accept="application/json", headers=headers, min_interval=min_interval)
    try:
        return json.loads(fetched.content)
    except ValueError as exc:
        raise FormatChanged(
            f"{source}: {url} did not return JSON ({fetched.content_type or 'no Content-Type'}); "
            "the source's format changed"
        ) from exc


def query_of(ctx: SourceContext, source: str) -> str:
    if not ctx.query:
        raise SourceError(f"{source}: no query; give the job a 'query'")
    return ctx.query
